"""Where the intents (cluster centres) come from, chosen by name (``model.intents``), and how
healthy they are.

An intent source is one object with hooks the trainer calls at fixed points:

- ``start``: before the engine exists, on a fresh run (never on a resume);
- ``epoch_start``: at the start of every epoch that starts from its first step;
- ``after_step``: after every optimizer step;
- ``trainable``: whether the optimizer updates the centres;
- ``normalised_assignment``: whether users are assigned to the L2-normalised centres.

``learned`` (ELCRec): the centres are a parameter, started once by k-means on a bounded sample
and re-projected onto the unit sphere after every step. ``epoch_kmeans`` (the ICLRec baseline
that ELCRec replaces): k-means over every training user at each epoch start, centres frozen.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from elcrec_dist import distributed as dist_utils
from elcrec_dist.clustering import kmeans
from elcrec_dist.config import ConfigError, ExperimentConfig
from elcrec_dist.embed import pooled_embeddings
from elcrec_dist.model import ELCRec
from elcrec_dist.stream import StreamingDataset


class IntentSource:
    """The hooks' defaults: nothing to do."""

    name: ClassVar[str]
    trainable: ClassVar[bool]
    normalised_assignment: ClassVar[bool]

    def start(
        self, model: ELCRec, data: StreamingDataset, config: ExperimentConfig
    ) -> dict[str, float] | None:
        """Set the centres before the first step of a fresh run; returns what to log, or None
        when there was nothing to do."""
        return None

    def epoch_start(self, model: ELCRec, data: StreamingDataset, config: ExperimentConfig, *,
                    epoch: int) -> dict[str, float] | None:
        """Set the centres at the start of ``epoch``; returns what to log, or None."""
        return None

    def after_step(self, engine: Any) -> None:
        """Called after every optimizer step."""


class LearnedIntents(IntentSource):
    """ELCRec: centres learned end to end (spec: "Centres: start and keep-up")."""

    name = "learned"
    trainable = True
    normalised_assignment = True

    def start(
        self, model: ELCRec, data: StreamingDataset, config: ExperimentConfig
    ) -> dict[str, float]:
        return init_centres(model, data, config)

    def after_step(self, engine: Any) -> None:
        project_centres(engine)


class EpochKMeansIntents(IntentSource):
    """ICLRec-style intents: k-means over **all** training users at the start of every epoch."""

    name = "epoch_kmeans"
    trainable = False
    normalised_assignment = False  # centroids are assigned to as k-means left them

    def epoch_start(self, model: ELCRec, data: StreamingDataset, config: ExperimentConfig, *,
                    epoch: int) -> dict[str, float]:
        return refresh_intents(model, data, config, epoch=epoch)


INTENT_SOURCES: dict[str, IntentSource] = {
    source.name: source for source in (LearnedIntents(), EpochKMeansIntents())
}


def intent_source(name: str) -> IntentSource:
    """The intent source called ``name`` (``model.intents``)."""
    try:
        return INTENT_SOURCES[name]
    except KeyError:
        raise ConfigError(f"model.intents: unknown intent source {name!r} "
                          f"(known: {', '.join(INTENT_SOURCES)})") from None


def init_centres(
    model: ELCRec, data: StreamingDataset, config: ExperimentConfig
) -> dict[str, float]:
    """``learned``: k-means start on a bounded sample gathered from every rank (its size does not
    grow with the data). This runs before the engine exists, so the parameter written here is
    the value every optimizer copy starts from."""
    km, k = config.kmeans, model.config.num_clusters
    rank, world = dist_utils.rank(), dist_utils.world_size()
    sample = data.sample_sequences(
        rank=rank, world=world, count=km.sample_users, seed=config.train.seed
    )
    device = model.cluster_centers.device
    local = F.normalize(
        pooled_embeddings(model, sample.sequences, batch_size=km.batch_size), dim=-1
    ).to(device)
    embeddings = dist_utils.gather_rows(
        local, dist_utils.row_counts(local.shape[0], device)
    )  # [S, D]
    if embeddings.shape[0] < k:
        raise ValueError(f"k-means start needs at least model.num_clusters={k} users, "
                         f"the sample has {embeddings.shape[0]}")
    inertia = centres_from_kmeans(
        model, embeddings, config, seed=config.train.seed, on_cpu=True, normalize=True
    )
    return {"kmeans/inertia": inertia, "kmeans/sample_users": float(embeddings.shape[0])}


def refresh_intents(model: ELCRec, data: StreamingDataset, config: ExperimentConfig, *,
                    epoch: int) -> dict[str, float]:
    """``epoch_kmeans``: k-means over all training users at the start of ``epoch``.

    Every rank embeds its share; the embeddings are gathered, rank 0 runs k-means
    (``kmeans.iterations``, ``kmeans.restarts``, seeded by (seed, epoch)) and broadcasts the
    centroids, which become the frozen centres for the epoch, unnormalised, exactly as
    k-means returned them. Cost grows with the number of users: this is what ELCRec's
    learned centres avoid."""
    k = model.config.num_clusters
    embeddings = all_user_embeddings(model, data, config)  # [U, D]
    if embeddings.shape[0] < k:
        raise ValueError(f"epoch k-means needs at least model.num_clusters={k} users, "
                         f"the dataset has {embeddings.shape[0]}")
    # on the model's device (ICLRec ran faiss on the GPU)
    inertia = centres_from_kmeans(
        model,
        embeddings,
        config,
        seed=epoch_kmeans_seed(config.train.seed, epoch),
        on_cpu=False,
        normalize=False,
    )
    return {"kmeans/inertia": inertia, "kmeans/users": float(embeddings.shape[0])}


def centres_from_kmeans(model: ELCRec, embeddings: torch.Tensor, config: ExperimentConfig, *,
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
        result = kmeans(
            points,
            model.config.num_clusters,
            iterations=km.iterations,
            restarts=km.restarts,
            generator=generator,
        )
        centres.copy_(F.normalize(result.centres, dim=-1) if normalize else result.centres)
        inertia.fill_(result.inertia)
    dist_utils.broadcast_(centres)
    dist_utils.broadcast_(inertia)
    with torch.no_grad():
        model.cluster_centers.copy_(centres)
    return float(inertia)


def epoch_kmeans_seed(seed: int, epoch: int) -> int:
    """Seed of the k-means of ``epoch`` (``model.intents: epoch_kmeans``), the same on every
    rank."""
    state = np.random.SeedSequence([seed, 0x6B6D, epoch]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> 1)


@torch.no_grad()
def all_user_embeddings(
    model: ELCRec, data: StreamingDataset, config: ExperimentConfig
) -> torch.Tensor:
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
    owned = any(param is p for group in engine.optimizer.param_groups for p in group["params"])
    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        value = F.normalize(safe_get_full_fp32_param(param).float(), dim=-1)
        safe_set_full_fp32_param(param, value)
        param.data.copy_(value.to(param.dtype))
    elif param.dtype == torch.float32 and owned:
        # plain fp32 data parallel: the parameter is the optimizer's own copy
        param.data.copy_(F.normalize(param.data, dim=-1))
    else:  # never leave a master copy behind silently
        raise RuntimeError(f"cannot re-project the centres: {type(engine.optimizer).__name__} "
                           "keeps a master copy this code cannot reach")


class CentreWins:
    """Users won by each centre so far in the epoch, summed over ranks at the epoch's end.

    A run resumed mid-epoch restores the counts its checkpoint recorded (on rank 0 only, so the
    sum over ranks counts them once).
    """

    def __init__(self, k: int, device: torch.device, *, restored: list[int]) -> None:
        self.counts = torch.zeros(k, dtype=torch.float64, device=device)
        if restored and dist_utils.is_main():
            self.counts += torch.tensor(restored, dtype=torch.float64, device=device)

    def add(self, assignment: torch.Tensor) -> None:
        """assignment [B] int64: each user's nearest centre in one step."""
        self.counts += torch.bincount(assignment, minlength=self.counts.numel()).to(self.counts)

    def snapshot(self) -> list[int]:
        """The counts so far, summed over ranks (for a mid-epoch checkpoint). Collective."""
        return [int(n) for n in dist_utils.global_sum(self.counts).tolist()]

    def close_epoch(self) -> torch.Tensor:
        """The epoch's counts summed over ranks [k]; counting restarts from zero. Collective."""
        total = dist_utils.global_sum(self.counts).clone()
        self.counts.zero_()
        return total


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
