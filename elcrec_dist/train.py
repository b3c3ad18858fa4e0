"""The training loop: centre start, step, epoch, validation, early stopping, final test.

Loop, step and evaluation are separate functions. One place (``build_engine``) calls
``deepspeed.initialize``; the model itself knows nothing of engines or ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elcrec_dist import distributed as dist_utils
from elcrec_dist.batching import make_train_batch
from elcrec_dist.checkpoint import save_model
from elcrec_dist.clustering import kmeans
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.data import left_pad, train_pairs
from elcrec_dist.evaluation import evaluate_sums, finalize
from elcrec_dist.losses import BatchShard, TrainBatch, elcrec_terms, weighted_total
from elcrec_dist.model import ELCRec
from elcrec_dist.runlog import RunLogger, logger


class ELCRecObjective(nn.Module):
    """What the engine runs: the model plus the configured objective, returning named terms."""

    def __init__(self, model: ELCRec, config: ExperimentConfig) -> None:
        super().__init__()
        self.model = model
        self.loss_config = config.loss

    def forward(self, batch: TrainBatch, shard: BatchShard) -> dict[str, torch.Tensor]:
        return elcrec_terms(self.model, batch, self.loss_config, shard)


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
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.bf16},
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: ELCRec, config: ExperimentConfig) -> Any:
    import deepspeed

    objective = ELCRecObjective(model, config)
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=objective.parameters(),
        config=deepspeed_config(config, dist_utils.world_size()),
    )
    return engine


@torch.no_grad()
def pooled_embeddings(model: ELCRec, sequences: Sequence[np.ndarray], *, batch_size: int) -> torch.Tensor:
    """Mean-pooled embeddings of the training inputs (eval mode): -> [U, D] float32 on CPU."""
    was_training = model.training
    model.eval()
    device = model.item_embeddings.weight.device
    out = []
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = [train_pairs(seq)[0] for seq in sequences[start : start + batch_size]]
            hidden = model(left_pad(chunk, model.config.max_len).to(device))
            out.append(model.pooled(hidden).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def init_centres(model: ELCRec, sequences: Sequence[np.ndarray], config: ExperimentConfig) -> dict[str, float]:
    """k-means start of the centres on a bounded sample (spec: "Centres: start and keep-up").

    Runs before the engine exists, so writing the parameter here is the initial value every
    optimizer copy starts from. Rank 0's result is broadcast so all ranks start identical.
    """
    km = config.kmeans
    k = model.config.num_clusters
    generator = torch.Generator().manual_seed(config.train.seed)
    count = min(km.sample_users, len(sequences))
    if count < k:
        raise ValueError(f"k-means start needs at least model.num_clusters={k} users, the sample has {count}")
    chosen = torch.randperm(len(sequences), generator=generator)[:count].sort().values.tolist()
    embeddings = F.normalize(pooled_embeddings(model, [sequences[i] for i in chosen], batch_size=km.batch_size), dim=-1)
    result = kmeans(embeddings, k, iterations=km.iterations, restarts=km.restarts, generator=generator)
    centres = F.normalize(result.centres, dim=-1).to(model.cluster_centers.device, model.cluster_centers.dtype)
    dist_utils.broadcast_(centres)
    with torch.no_grad():
        model.cluster_centers.copy_(centres)
    return {"kmeans/inertia": result.inertia, "kmeans/sample_users": float(count)}


@torch.no_grad()
def project_centres(engine: Any) -> None:
    """Re-project the centres onto the unit sphere after an optimizer step.

    The reference overwrote ``param.data``. Here the new value is written where the optimizer
    keeps its master copy too: under ZeRO 1/2 or bf16 DeepSpeed holds an fp32 partition that a
    plain ``param.data`` write never reaches, so the fp32 value is read and written through
    DeepSpeed's full-parameter accessors (collectives every rank calls) and the working copy
    is set from the same value. All ranks compute the same value from identical inputs.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    param = engine.module.model.cluster_centers
    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        full = safe_get_full_fp32_param(param)
        value = F.normalize(full.float(), dim=-1)
        safe_set_full_fp32_param(param, value)
        param.data.copy_(value.to(param.dtype))
    else:  # plain fp32 data parallel: the parameter is the optimizer's copy
        param.data.copy_(F.normalize(param.data.float(), dim=-1).to(param.dtype))


def train_step(engine: Any, batch: TrainBatch, config: ExperimentConfig) -> dict[str, float]:
    """One optimizer step on this rank's share of the global batch.

    Returns the loss terms of the *global* batch (the same numbers on every rank).
    """
    device = engine.device
    shard = dist_utils.batch_shard(
        batch.inputs.shape[0], device=device, local_negatives=config.loss.negatives == "local"
    )
    batch = TrainBatch(
        inputs=batch.inputs.to(device),
        targets=batch.targets.to(device),
        negatives=batch.negatives.to(device),
        views=batch.views.to(device),
    )
    terms = engine(batch, shard)  # this rank's contributions; they sum over ranks to the terms
    total = weighted_total(terms, config.loss)
    # DeepSpeed averages gradients over ranks; the global loss is the *sum* of contributions.
    engine.backward(total * shard.world)
    engine.step()
    project_centres(engine)
    names = [*terms, "total"]
    values = torch.stack([*(t.detach().float() for t in terms.values()), total.detach().float()])
    values = dist_utils.global_sum(values).tolist()
    return {f"loss/{name}": value for name, value in zip(names, values, strict=True)}


def epoch_batches(num_users: int, *, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Global batches of user indices for one epoch: a permutation fixed by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_users)
    return [order[i : i + batch_size] for i in range(0, num_users, batch_size)]


def rank_share(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's rows of a global batch (strided, so shares differ by at most one)."""
    return indices[rank::world]


@dataclass
class FitResult:
    best_epoch: int
    best_valid: float
    epochs_run: int
    test: dict[str, float]
    valid_history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def evaluate_sharded(model: ELCRec, sequences: Sequence[np.ndarray], config: ExperimentConfig, *, split: str, device: torch.device) -> dict[str, float]:
    """Each rank ranks its users; sums and counts are added over ranks before dividing."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    mine = sequences[rank::world]
    sums, count = evaluate_sums(
        model, mine, split=split, ks=config.eval.ks, batch_size=config.eval.batch_size,  # type: ignore[arg-type]
        progress=dist_utils.is_main(),
    )
    if not sums:
        sums = {name: 0.0 for name in _metric_names(config)}
    totals = dist_utils.all_reduce_sums({**sums, "__count": float(count)}, device)
    n = int(totals.pop("__count"))
    return finalize(totals, n)


def _metric_names(config: ExperimentConfig) -> list[str]:
    return [f"{m}@{k}" for k in config.eval.ks for m in ("HR", "NDCG")] + ["MRR"]


def fit(
    config: ExperimentConfig,
    sequences: Sequence[np.ndarray],
    *,
    num_items: int,
    device: torch.device,
    run_log: RunLogger,
) -> tuple[FitResult, ELCRec]:
    """Train with early stopping on validation, then evaluate the best model on test."""
    started = time.time()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    torch.manual_seed(config.train.seed + rank)  # dropout differs per rank, fixed per seed
    model = ELCRec(config.model, num_items=num_items).to(device)
    stats = init_centres(model, sequences, config)
    run_log.log(stats, step=0)
    engine = build_engine(model, config)
    data_gen = torch.Generator().manual_seed(config.train.seed * 1_000_003 + rank)
    run_dir = Path(config.train.run_dir)
    best_path = run_dir / "best_model.pt"
    select = config.eval.select_metric
    best, best_epoch, bad, step = -math.inf, -1, 0, 0
    history: list[float] = []
    best_state: dict[str, torch.Tensor] | None = None
    epoch = 0
    need_views = config.loss.seq_cl_weight > 0 or config.loss.intent_cl_weight > 0
    progress = _progress(range(config.train.epochs), main=dist_utils.is_main())
    for epoch in progress:
        model.train()
        epoch_start, seen = time.time(), 0
        for global_batch in epoch_batches(len(sequences), batch_size=config.train.batch_size, seed=config.train.seed, epoch=epoch):
            mine = rank_share(global_batch, rank, world)
            if len(mine) < 2 or len(global_batch) < 2 * world:
                continue  # a tail too small for in-batch negatives on every rank
            batch = make_train_batch(
                [sequences[i] for i in mine], num_items=num_items, max_len=config.model.max_len,
                augment=config.augment, generator=data_gen, with_views=need_views,
            )
            terms = train_step(engine, batch, config)
            step += 1
            seen += len(global_batch)
            if step % config.train.log_every == 0:
                run_log.log({**terms, "lr": config.train.lr}, step=step)
        run_log.log({"train/sequences_per_s": seen / max(time.time() - epoch_start, 1e-9), "train/epoch": epoch}, step=step)
        if (epoch + 1) % config.train.eval_every and epoch + 1 != config.train.epochs:
            continue
        valid = evaluate_sharded(model, sequences, config, split="valid", device=device)
        run_log.log({f"valid/{k}": v for k, v in valid.items()}, step=step)
        history.append(valid[select])
        logger.info("epoch %d: valid %s = %.4f (best %.4f)", epoch, select, valid[select], max(best, valid[select]))
        if valid[select] > best:
            best, best_epoch, bad = valid[select], epoch, 0
            # Every rank keeps the best weights in memory (the model is small), so the final
            # test pass needs no shared file system; rank 0 also writes them to the run folder.
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if dist_utils.is_main():
                save_model(best_path, state=model.state_dict(), config=config.to_dict(), meta={"epoch": epoch, select: best})
        else:
            bad += 1
            if bad >= config.train.patience:
                logger.info("early stop after epoch %d: no better %s for %d evaluations", epoch, select, bad)
                break
    dist_utils.barrier()
    if best_state is not None:
        model.load_state_dict(best_state)
    test = evaluate_sharded(model, sequences, config, split="test", device=device)
    run_log.log({f"test/{k}": v for k, v in test.items()}, step=step)
    result = FitResult(best_epoch=best_epoch, best_valid=best, epochs_run=epoch + 1, test=test,
                       valid_history=history, seconds=time.time() - started)
    return result, model


def _progress(iterable: range, *, main: bool) -> Any:
    if not main:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc="epochs", unit="epoch")
