"""The training loop: centre start, step, epoch, validation, checkpoints, early stopping, test.

Loop, step and evaluation are separate functions. One place (``build_engine``) calls
``deepspeed.initialize``; the model knows nothing of engines or ranks. Data arrive through
``elcrec_dist.stream.StreamingDataset``: each rank reads only its share of the row groups.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elcrec_dist import checkpoint as ckpt
from elcrec_dist import distributed as dist_utils
from elcrec_dist.batching import make_train_batch
from elcrec_dist.clustering import kmeans
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.data import left_pad, train_pairs
from elcrec_dist.evaluation import evaluate_sums, finalize
from elcrec_dist.losses import BatchShard, TrainBatch, elcrec_terms, weighted_total
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import DatasetInfo
from elcrec_dist.runlog import RunLogger, logger
from elcrec_dist.stream import StreamingDataset


class ELCRecObjective(nn.Module):
    """What the engine runs: the model plus the configured objective, returning named terms."""

    def __init__(self, model: ELCRec, config: ExperimentConfig) -> None:
        super().__init__()
        self.model = model
        self.loss_config = config.loss

    def forward(self, batch: TrainBatch, shard: BatchShard, record: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return elcrec_terms(self.model, batch, self.loss_config, shard, record=record)


def deepspeed_config(config: ExperimentConfig, world: int) -> dict[str, Any]:
    """The engine's JSON config, derived from the ``train`` and ``deepspeed`` sections."""
    train, ds = config.train, config.deepspeed
    if train.batch_size % world:
        raise ValueError(f"train.batch_size ({train.batch_size}) must be divisible by the world size ({world})")
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // world,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                "torch_adam": ds.torch_adam,
                "adam_w_mode": False,
            },
        },
        "zero_optimization": {
            "stage": ds.zero_stage,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size,
            "overlap_comm": ds.overlap_comm,
        },
        "bf16": {"enabled": ds.bf16},
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: ELCRec, config: ExperimentConfig) -> Any:
    """The DeepSpeed engine over the objective. With ``model.intents: epoch_kmeans`` the centres
    are frozen (set by k-means each epoch, never by the optimizer) and left out of it."""
    import deepspeed

    if config.model.intents == "epoch_kmeans":
        model.cluster_centers.requires_grad_(False)
    objective = ELCRecObjective(model, config)
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=[p for p in objective.parameters() if p.requires_grad],
        config=deepspeed_config(config, dist_utils.world_size()),
    )
    return engine


def use_deterministic_kernels(device: torch.device, enabled: bool) -> None:
    """Switch torch's deterministic kernels on or off for this process (``train.deterministic``).

    On CPU every op of the training step has a deterministic kernel (``tests/test_train.py``
    checks a step's gradients bitwise at two threads); without them the backward of gathered
    rows accumulates in a thread-dependent order. On other devices an op without a
    deterministic kernel warns instead of stopping the run, and CUDA's cuBLAS gets the fixed
    workspace it needs (``CUBLAS_WORKSPACE_CONFIG``, unless already set); not verified on a GPU.
    """
    if enabled and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=device.type != "cpu")


def step_seed(seed: int, rank: int, global_step: int) -> int:
    """The seed of one rank's step: batches, augmentations and dropout depend on nothing else,
    which makes a resumed run draw exactly what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, rank, global_step]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def pooled_embeddings(model: ELCRec, sequences: list[np.ndarray], *, batch_size: int) -> torch.Tensor:
    """Mean-pooled embeddings of the training inputs (eval mode): -> [U, D] float32 on CPU."""
    was_training = model.training
    model.eval()
    device = model.item_embeddings.weight.device
    out = [torch.zeros(0, model.config.hidden_size)]
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = [train_pairs(seq)[0] for seq in sequences[start : start + batch_size]]
            hidden = model(left_pad(chunk, model.config.max_len).to(device))
            out.append(model.pooled(hidden).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def init_centres(model: ELCRec, data: StreamingDataset, config: ExperimentConfig) -> dict[str, float]:
    """k-means start of the centres (spec: "Centres: start and keep-up").

    Each rank embeds its part of a bounded sample (its size does not grow with the data); the
    embeddings are gathered, rank 0 clusters them and broadcasts the centres. This runs before
    the engine exists, so the parameter written here is the value every optimizer copy starts
    from.
    """
    km, k = config.kmeans, model.config.num_clusters
    rank, world = dist_utils.rank(), dist_utils.world_size()
    sample = data.sample_sequences(rank=rank, world=world, count=km.sample_users, seed=config.train.seed)
    device = model.cluster_centers.device
    local = F.normalize(pooled_embeddings(model, sample.sequences, batch_size=km.batch_size), dim=-1).to(device)
    counts = dist_utils.row_counts(local.shape[0], device)
    embeddings = dist_utils.gather_rows(local, counts)  # [S, D] on every rank
    if embeddings.shape[0] < k:
        raise ValueError(f"k-means start needs at least model.num_clusters={k} users, the sample has {embeddings.shape[0]}")
    inertia = _centres_from_kmeans(model, embeddings, config, seed=config.train.seed, on_cpu=True, normalize=True)
    return {"kmeans/inertia": inertia, "kmeans/sample_users": float(embeddings.shape[0])}


def _centres_from_kmeans(model: ELCRec, embeddings: torch.Tensor, config: ExperimentConfig, *,
                         seed: int, on_cpu: bool, normalize: bool) -> float:
    """Rank 0 clusters ``embeddings`` [M, D] (the same on every rank) into the model's k centres
    (``kmeans.iterations``, ``kmeans.restarts``, a CPU generator seeded with ``seed``; on the CPU
    or on the embeddings' device), optionally L2-normalised; they are broadcast and written into
    the centre parameter on every rank. Returns the k-means inertia."""
    km, device = config.kmeans, model.cluster_centers.device
    centres = torch.empty(model.cluster_centers.shape, dtype=torch.float32, device=device)
    inertia = torch.zeros((), dtype=torch.float64, device=device)
    if dist_utils.is_main():
        generator = torch.Generator().manual_seed(seed)
        points = embeddings.cpu() if on_cpu else embeddings
        result = kmeans(points, model.config.num_clusters, iterations=km.iterations, restarts=km.restarts, generator=generator)
        centres.copy_(F.normalize(result.centres, dim=-1) if normalize else result.centres)
        inertia.fill_(result.inertia)
    dist_utils.broadcast_(centres)
    dist_utils.broadcast_(inertia)
    with torch.no_grad():
        model.cluster_centers.copy_(centres)
    return float(inertia)


def epoch_kmeans_seed(seed: int, epoch: int) -> int:
    """Seed of the k-means of ``epoch`` (``model.intents: epoch_kmeans``), the same on every rank."""
    return int(np.random.SeedSequence([seed, 0x6B6D, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def all_user_embeddings(model: ELCRec, data: StreamingDataset, config: ExperimentConfig) -> torch.Tensor:
    """L2-normalised pooled embeddings of every training input, gathered in rank order.

    Each rank embeds its evaluation share (disjoint shares that hold every user once):
    -> [U, D] float32 on the model's device, identical on every rank.
    """
    rank, world = dist_utils.rank(), dist_utils.world_size()
    device = model.cluster_centers.device
    parts = [torch.zeros(0, model.config.hidden_size)]
    for chunk in data.eval_sequences(rank=rank, world=world, batch_size=config.kmeans.batch_size):
        parts.append(pooled_embeddings(model, chunk.sequences, batch_size=config.kmeans.batch_size))
    local = F.normalize(torch.cat(parts), dim=-1).to(device)
    return dist_utils.gather_rows(local, dist_utils.row_counts(local.shape[0], device))


def refresh_intents(model: ELCRec, data: StreamingDataset, config: ExperimentConfig, *, epoch: int) -> dict[str, float]:
    """ICLRec-style intents (``model.intents: epoch_kmeans``): k-means over **all** training
    users at the start of ``epoch``.

    Every rank embeds its share; the embeddings are gathered, rank 0 runs k-means
    (``kmeans.iterations``, ``kmeans.restarts``, seeded by (seed, epoch)) and broadcasts the
    centroids, which become the (frozen) centres for the epoch, unnormalised, exactly as k-means
    returned them. Cost grows with the number of users: this is what ELCRec's learned centres
    avoid.
    """
    k = model.config.num_clusters
    embeddings = all_user_embeddings(model, data, config)  # [U, D]
    if embeddings.shape[0] < k:
        raise ValueError(f"epoch k-means needs at least model.num_clusters={k} users, the dataset has {embeddings.shape[0]}")
    # on the model's device (ICLRec ran faiss on the GPU); centroids kept as k-means returns them
    inertia = _centres_from_kmeans(model, embeddings, config, seed=epoch_kmeans_seed(config.train.seed, epoch), on_cpu=False, normalize=False)
    return {"kmeans/inertia": inertia, "kmeans/users": float(embeddings.shape[0])}


@torch.no_grad()
def project_centres(engine: Any) -> None:
    """Re-project the centres onto the unit sphere after an optimizer step.

    The reference overwrote ``param.data``. Under ZeRO 1/2 or bf16 DeepSpeed keeps an fp32
    master partition that such a write never reaches, so the fp32 value is read and written
    through DeepSpeed's full-parameter accessors (collectives every rank calls) and the working
    copy is set from the same value. Every rank computes it from identical inputs.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    param = engine.module.model.cluster_centers
    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        value = F.normalize(safe_get_full_fp32_param(param).float(), dim=-1)
        safe_set_full_fp32_param(param, value)
        param.data.copy_(value.to(param.dtype))
    elif param.dtype == torch.float32 and any(param is p for group in engine.optimizer.param_groups for p in group["params"]):
        # plain fp32 data parallel: the parameter is the optimizer's own copy
        param.data.copy_(F.normalize(param.data, dim=-1))
    else:  # never leave a master copy behind silently
        raise RuntimeError(f"cannot re-project the centres: {type(engine.optimizer).__name__} keeps a master copy this code cannot reach")


def train_step(engine: Any, batch: TrainBatch, config: ExperimentConfig, *, record: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """One optimizer step on this rank's share of the global batch.

    Returns the loss terms of the *global* batch (the same numbers on every rank).
    """
    device = engine.device
    shard = dist_utils.batch_shard(batch.inputs.shape[0], device=device, local_negatives=config.loss.negatives == "local")
    batch = TrainBatch(*(t.to(device) for t in (batch.inputs, batch.targets, batch.negatives, batch.views)))
    terms = engine(batch, shard, record)  # this rank's contributions; they sum over ranks to the terms
    total = weighted_total(terms, config.loss)
    # DeepSpeed averages gradients over ranks; the global loss is the *sum* of contributions.
    engine.backward(total * shard.world)
    engine.step()
    if config.model.intents == "learned":
        project_centres(engine)
    names = [*terms, "total"]
    values = torch.stack([*(t.detach().float() for t in terms.values()), total.detach().float()])
    summed = dist_utils.global_sum(values).tolist()
    return {f"loss/{name}": value for name, value in zip(names, summed, strict=True)}


def evaluate_sharded(model: ELCRec, data: StreamingDataset, config: ExperimentConfig, *, split: str, device: torch.device) -> dict[str, float]:
    """Each rank ranks its share of the users; sums and counts are added over ranks."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    totals = {name: 0.0 for name in metric_names(config)}
    count = 0
    chunks = data.eval_sequences(rank=rank, world=world, batch_size=config.eval.batch_size)
    for chunk in _progress(chunks, desc=f"eval {split}", main=dist_utils.is_main(), total=None):
        sums, n = evaluate_sums(model, chunk.sequences, split=split, ks=config.eval.ks, batch_size=config.eval.batch_size)  # type: ignore[arg-type]
        for name, value in sums.items():
            totals[name] += value
        count += n
    reduced = dist_utils.all_reduce_sums({**totals, "__count": float(count)}, device)
    return finalize(reduced, int(reduced.pop("__count")))


def metric_names(config: ExperimentConfig) -> list[str]:
    return [f"{m}@{k}" for k in config.eval.ks for m in ("HR", "NDCG")] + ["MRR"]


@torch.no_grad()
def centre_stats(centres: torch.Tensor, wins: torch.Tensor) -> dict[str, float]:
    """Centre health: mean pairwise cosine (off-diagonal), norm of the mean of the normalised
    centres (the only thing the published cluster loss sees), share of centres that won no user,
    and the largest centre's share of the users (1.0 when every user picks one centre: collapse).
    Their spread: the effective rank (exp of the entropy of the normalised centres' squared
    singular values; 1 when all lie on one line, up to D when spread evenly) and the share of
    pairs pointing apart (cosine < -0.5). Centres folded onto two opposite groups show a mean
    cosine that looks healthy but an effective rank near 2 and many opposed pairs.

    centres [k, D]; wins [k] users assigned to each centre over the last epoch.
    """
    c = F.normalize(centres.float(), dim=-1)
    k = c.shape[0]
    cos = c @ c.T
    pairs = max(k * (k - 1), 1)
    off_diagonal = (cos.sum() - cos.diagonal().sum()) / pairs
    energy = torch.linalg.svdvals(c).pow(2)
    share = energy[energy > 0] / energy.sum()
    return {
        "centres/mean_pairwise_cosine": float(off_diagonal),
        "centres/norm_of_mean": float(c.mean(0).norm()),
        "centres/dead_fraction": float((wins == 0).float().mean()),
        "centres/largest_share": float(wins.max() / wins.sum()) if float(wins.sum()) > 0 else 0.0,
        "centres/effective_rank": float(torch.exp(-(share * share.log()).sum())),
        "centres/opposed_pair_fraction": float((cos < -0.5).sum()) / pairs,  # the diagonal is 1
    }


@dataclass
class FitResult:
    best_epoch: int
    best_valid: float
    epochs_run: int
    test: dict[str, float]
    valid_history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    global_step: int = 0
    time_split: dict[str, float] = field(default_factory=dict)  # clustering / train / eval seconds
    peak_memory: dict[str, float | None] = field(default_factory=dict)


def fit(
    config: ExperimentConfig,
    data: StreamingDataset,
    *,
    device: torch.device,
    run_log: RunLogger,
    resume: str | None = None,
) -> tuple[FitResult, ELCRec]:
    """Train with early stopping on validation, then evaluate the best model on test.

    ``resume="required"`` restores the newest complete checkpoint of the run folder (an error
    if there is none); ``"auto"`` restores it if there is one and starts afresh otherwise.
    """
    started = time.time()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    num_items = data.info.num_items
    run_dir = Path(config.train.run_dir)
    use_deterministic_kernels(device, config.train.deterministic)
    torch.manual_seed(config.train.seed)  # the same initial model on every rank
    model = ELCRec(config.model, num_items=num_items).to(device)
    state = ckpt.TrainState(world_size=world)
    found = ckpt.latest_checkpoint(run_dir) if resume and dist_utils.is_main() else None
    found = dist_utils.broadcast_object(found)  # every rank resumes from rank 0's choice
    if resume == "required" and found is None:
        raise ckpt.CheckpointError(f"--resume: no complete checkpoint under {run_dir / ckpt.CHECKPOINTS}")
    resuming = found is not None
    if found is not None:
        folder, committed = found
        changes = ckpt.check_resume(folder, committed, config=config.to_dict(), dataset=data.info.fingerprint(), world=world)
        if changes.unrecorded and dist_utils.is_main():
            logger.warning("%s does not record %s (written before they existed); continuing with this run's values",
                           folder, ", ".join(changes.unrecorded))
        if changes.dropped and dist_utils.is_main():
            logger.warning("%s records %s, which this version no longer has", folder, ", ".join(changes.dropped))
        state = ckpt.TrainState.from_dict(committed["state"])
    elif config.model.intents == "learned":  # epoch_kmeans sets the centres at every epoch start
        t0 = time.perf_counter()
        start = init_centres(model, data, config)
        start_s = time.perf_counter() - t0
        state.seconds["clustering"] += start_s
        run_log.log({**start, "time/kmeans_start_s": start_s}, step=0)
    engine = build_engine(model, config)
    if resuming:
        engine.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False)
        logger.info("resumed from %s (epoch %d, step %d of the epoch)", folder, state.epoch, state.step_in_epoch)
        run_log.rewind(state.global_step)
        dist_utils.barrier()
        if dist_utils.is_main():
            ckpt.prune(run_dir, keep=config.train.keep_checkpoints)  # drops partial saves of the killed run

    select = config.eval.select_metric
    steps_per_epoch = data.steps_per_epoch(config.train.batch_size)
    need_views = config.loss.seq_cl_weight > 0 or config.loss.intent_cl_weight > 0
    every = config.train.checkpoint_every
    best_path = run_dir / "best_model.pt"
    wins = torch.zeros(config.model.num_clusters, dtype=torch.float64, device=device)
    if state.centre_wins and dist_utils.is_main():  # mid-epoch resume: the counts so far, once
        wins += torch.tensor(state.centre_wins, dtype=torch.float64, device=device)
    # A run killed after its last checkpoint (early stop already reached) only has the test
    # evaluation left; training on would add epochs the uninterrupted run never trained.
    stopped_early = resuming and state.bad_evals >= config.train.patience
    if stopped_early:
        logger.info("training had stopped early (best epoch %d); evaluating the best model on test", state.best_epoch)
    last = state.epoch if stopped_early else config.train.epochs
    epochs = _progress(range(state.epoch, last), desc="epochs", main=dist_utils.is_main(), total=max(last - state.epoch, 0))
    for epoch in epochs:
        state.epoch = epoch
        clustering_s = 0.0
        if config.model.intents == "epoch_kmeans" and state.step_in_epoch == 0:
            t0 = time.perf_counter()  # (mid-epoch, the checkpoint holds this epoch's centres)
            refreshed = refresh_intents(model, data, config, epoch=epoch)
            clustering_s = time.perf_counter() - t0
            state.seconds["clustering"] += clustering_s
            run_log.log(refreshed, step=state.global_step)
        model.train()
        epoch_start, seen = time.time(), 0
        batches = data.train_batches(epoch=epoch, rank=rank, world=world, batch_size=config.train.batch_size, seed=config.train.seed, start_step=state.step_in_epoch)
        for step_in_epoch, users in batches:
            seed = step_seed(config.train.seed, rank, state.global_step)
            torch.manual_seed(seed)  # dropout
            batch = make_train_batch(users.sequences, num_items=num_items, max_len=config.model.max_len,
                                     augment=config.augment, generator=torch.Generator().manual_seed(seed), with_views=need_views)
            record: dict[str, torch.Tensor] = {}
            terms = train_step(engine, batch, config, record=record)
            if "assignment" in record:
                wins += torch.bincount(record["assignment"], minlength=wins.numel()).to(wins)
            state.global_step += 1
            state.step_in_epoch = step_in_epoch + 1
            seen += len(users)
            if state.global_step % config.train.log_every == 0:
                run_log.log({**terms, "lr": config.train.lr}, step=state.global_step)
            if every and state.global_step % every == 0 and state.step_in_epoch < steps_per_epoch:
                state.centre_wins = [int(n) for n in dist_utils.global_sum(wins).tolist()]
                save_checkpoint(engine, config, state, run_dir, dataset=data.info)
        seconds = max(time.time() - epoch_start, 1e-9)
        state.seconds["train"] += seconds
        total_seen = dist_utils.all_reduce_sums({"seen": float(seen)}, device)["seen"]
        run_log.log({"train/sequences_per_s": total_seen / seconds, "train/epoch": epoch,
                     "time/clustering_s": clustering_s, "time/train_s": seconds}, step=state.global_step)
        wins = dist_utils.global_sum(wins)
        run_log.log(centre_stats(model.cluster_centers.detach(), wins), step=state.global_step)
        run_log.histogram("centres/users_per_centre", wins.cpu(), step=state.global_step)
        wins.zero_()
        state.epoch, state.step_in_epoch, state.centre_wins = epoch + 1, 0, []
        if (epoch + 1) % config.train.eval_every == 0 or epoch + 1 == config.train.epochs:
            t0 = time.perf_counter()
            valid = evaluate_sharded(model, data, config, split="valid", device=device)
            eval_s = time.perf_counter() - t0
            state.seconds["eval"] += eval_s
            run_log.log({**{f"valid/{k}": v for k, v in valid.items()}, "time/eval_s": eval_s}, step=state.global_step)
            state.valid_history.append(valid[select])
            logger.info("epoch %d: valid %s = %.4f (best %.4f)", epoch, select, valid[select], max(state.best_metric, valid[select]))
            if valid[select] > state.best_metric:
                state.best_metric, state.best_epoch, state.bad_evals = valid[select], epoch, 0
                if dist_utils.is_main():
                    save_model_file(best_path, model, config, {"epoch": epoch, select: valid[select], "global_step": state.global_step})
            else:
                state.bad_evals += 1
                stopped_early = state.bad_evals >= config.train.patience
        save_checkpoint(engine, config, state, run_dir, dataset=data.info)
        if stopped_early:
            logger.info("early stop after epoch %d: no better %s for %d evaluations", epoch, select, state.bad_evals)
            break

    dist_utils.barrier()
    if best_path.exists():  # the run folder is shared by all ranks (checkpoints need that too)
        model.load_state_dict(ckpt.load_model(best_path)["model"])
    test = evaluate_sharded(model, data, config, split="test", device=device)
    run_log.log({f"test/{k}": v for k, v in test.items()}, step=state.global_step)
    state.finished = True
    result = FitResult(state.best_epoch, state.best_metric, state.epoch, test, state.valid_history, time.time() - started,
                       state.global_step, time_split=dict(state.seconds), peak_memory=peak_memory(device))
    return result, model


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak memory of the busiest rank: resident set (MiB) and, on CUDA, the allocator's peak."""
    import resource

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else -1.0
    peak = dist_utils.all_reduce_max({"rss_mib": rss_mib, "cuda_mib": cuda_mib}, device)
    return {"rss_mib": peak["rss_mib"], "cuda_max_allocated_mib": peak["cuda_mib"] if peak["cuda_mib"] >= 0 else None}


def save_model_file(path: Path, model: ELCRec, config: ExperimentConfig, meta: dict[str, Any]) -> None:
    ckpt.save_model(path, state=model.state_dict(), config=config.to_dict(), meta=meta)


def save_checkpoint(engine: Any, config: ExperimentConfig, state: ckpt.TrainState, run_dir: Path, *, dataset: DatasetInfo) -> None:
    """Every rank writes its engine state; after a barrier rank 0 commits (manifest last) and prunes."""
    folder = run_dir / ckpt.CHECKPOINTS / ckpt.tag_of(state.global_step)
    engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state={}, save_latest=False)
    dist_utils.barrier()
    if dist_utils.is_main():
        ckpt.commit(folder, state=state, config=config.to_dict(), dataset=dataset.fingerprint())
        ckpt.prune(run_dir, keep=config.train.keep_checkpoints)
    dist_utils.barrier()


def _progress(iterable: Any, *, desc: str, main: bool, total: int | None) -> Any:
    if not main:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=desc == "epochs")


def popularity_and_recovery(model: ELCRec, data: StreamingDataset, config: ExperimentConfig, *, device: torch.device) -> dict[str, Any]:
    """Diagnostics for results.json: a most-popular baseline (test) and, on planted-intent data,
    how well the centres recover the planted intents (on the bounded k-means sample)."""
    from elcrec_dist.diagnostics import intent_recovery, popularity_metrics_sharded
    from elcrec_dist.planted import read_planted

    rank, world = dist_utils.rank(), dist_utils.world_size()
    out: dict[str, Any] = {"popularity_test": popularity_metrics_sharded(data, config, rank=rank, world=world, device=device)}
    planted = read_planted(data.url)
    if planted is not None and dist_utils.is_main():
        sample = data.sample_sequences(rank=0, world=1, count=config.kmeans.sample_users, seed=config.train.seed + 1)
        labels = np.asarray(planted.for_users(sample.user_ids))
        out["intent_recovery"] = intent_recovery(model, sample.sequences, labels, seed=config.train.seed)
    return out

