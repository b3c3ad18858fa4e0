"""Evaluation over a streamed dataset, sharded over ranks: each rank ranks its share of the
users, metric sums and user counts are added over ranks, then divided. The ranking itself
(full ranking in item tiles of ``eval.tile_items``, history items by ``eval.history_items``,
pessimistic ties) is
``elcrec_dist.evaluation``'s; this module is the one loop that runs it over a dataset, for the
model and for the popularity baseline.

What scales with the dataset, and what bounds it:

- validation users: ``eval.valid_users`` takes a seeded fixed sample of that many (the same
  users every epoch and at every world size: ``StreamingDataset.sample_sequences``, each rank
  holding its part of the sample); null means every user. The test pass always ranks every
  user, streamed in chunks of ``eval.batch_size``;
- the catalogue: scored ``eval.tile_items`` items at a time, so memory follows
  batch x tile, not batch x catalogue;
- sampled-negative metrics (``eval.sampled_negatives`` > 0, ``elcrec_dist.sampled_metrics``):
  reported beside the full-ranking ones under names that say they are sampled
  (``sampled_uni100/NDCG@10``), never used to select the best model. Popularity sampling reads
  every user's sequence once per evaluation to count the training inputs (no model pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.data import Split
from elcrec_dist.diagnostics import item_counts, popularity_ranking, popularity_sums
from elcrec_dist.evaluation import evaluate_sums, finalize
from elcrec_dist.model import ELCRec
from elcrec_dist.runlog import logger, progress
from elcrec_dist.sampled_metrics import NegativeSampler, metric_prefix, sampled_sums
from elcrec_dist.stream import StreamingDataset, UserRows

# one chunk of users (ids and full sequences) -> (metric sums, number of users)
ChunkSums = Callable[[UserRows], tuple[dict[str, float], int]]

# first word of the validation sample's seed: another sample than the k-means start's
_SEED_VALID_SAMPLE = 0x7A11D


def metric_names(ks: Sequence[int]) -> list[str]:
    """The metrics every evaluation reports: HR@k and NDCG@k for each cut-off, and MRR."""
    return [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")] + ["MRR"]


def valid_sample_seed(seed: int) -> int:
    """Seed of the validation users' sample (``eval.valid_users``) for ``train.seed``."""
    state = np.random.SeedSequence([_SEED_VALID_SAMPLE, seed]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> 1)


def user_chunks(
    data: StreamingDataset, config: ExperimentConfig, *, split: Split
) -> Iterator[UserRows]:
    """This rank's users for ``split`` in chunks of ``eval.batch_size``: every user, or for
    ``valid`` with ``eval.valid_users`` set (and smaller than the dataset) this rank's part of
    the seeded sample. Disjoint over ranks; together every user (or the sample) once."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    batch_size, count = config.eval.batch_size, config.eval.valid_users
    if split == "test" or count is None or count >= data.num_users:
        yield from data.eval_sequences(rank=rank, world=world, batch_size=batch_size)
        return
    sample = data.sample_sequences(rank=rank, world=world, count=count,
                                   seed=valid_sample_seed(config.train.seed))
    for start in range(0, len(sample), batch_size):
        yield UserRows(sample.user_ids[start : start + batch_size],
                       sample.sequences[start : start + batch_size])


def sharded_metrics(
    chunks: Iterable[UserRows], sums_of: ChunkSums, *, names: Sequence[str], device: torch.device,
    desc: str,
) -> dict[str, float]:
    """Mean metrics over the users of every rank's ``chunks``: sums and counts reduced over
    ranks (every rank gets the result). ``names``: every metric ``sums_of`` returns."""
    totals = dict.fromkeys(names, 0.0)
    count = 0
    for chunk in progress(chunks, desc=desc, main=dist_utils.is_main(), total=None):
        sums, n = sums_of(chunk)
        for name, value in sums.items():
            totals[name] += value
        count += n
    reduced = dist_utils.all_reduce_sums({**totals, "__count": float(count)}, device)
    return finalize(reduced, int(reduced.pop("__count")))


def training_popularity(data: StreamingDataset, *, device: torch.device) -> np.ndarray:
    """How often each item occurs in the training inputs of every user: [N + 1] float64, the
    same on every rank (each rank counts its share, summed over ranks)."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    counts = np.zeros(data.info.num_items + 1, dtype=np.float64)
    for chunk in data.eval_sequences(rank=rank, world=world):
        counts += item_counts(chunk.sequences, num_items=data.info.num_items)
    return dist_utils.global_sum(torch.from_numpy(counts).to(device)).cpu().numpy()


def negative_sampler(data: StreamingDataset, config: ExperimentConfig, *,
                     device: torch.device) -> NegativeSampler | None:
    """The sampled-metrics sampler ``eval.sampled_*`` asks for, or None when they are off."""
    ev = config.eval
    if ev.sampled_negatives == 0:
        return None
    weights = (training_popularity(data, device=device)
               if ev.sampled_distribution == "popularity" else None)
    return NegativeSampler(num_items=data.info.num_items, negatives=ev.sampled_negatives,
                           distribution=ev.sampled_distribution, seed=config.train.seed,
                           weights=weights)


def evaluate_sharded(
    model: ELCRec, data: StreamingDataset, config: ExperimentConfig, *, split: Split,
    device: torch.device,
) -> dict[str, float]:
    """The model's full-ranking metrics on ``split`` (eval mode): ``valid`` over the
    ``eval.valid_users`` sample (every user by default), ``test`` over every user; plus the
    sampled-negative metrics when ``eval.sampled_negatives`` > 0 (named ``sampled_...``)."""
    ev = config.eval
    sampler = negative_sampler(data, config, device=device)
    names = metric_names(ev.ks)
    if sampler is not None:
        names += [f"{sampled_prefix(config)}/{name}" for name in metric_names(ev.ks)]

    def sums_of(chunk: UserRows) -> tuple[dict[str, float], int]:
        sums, n = evaluate_sums(model, chunk.sequences, split=split, ks=ev.ks,
                                batch_size=ev.batch_size, tile_items=ev.tile_items,
                                history_items=ev.history_items)
        if sampler is not None:
            sums.update(sampled_sums(model, chunk.user_ids, chunk.sequences, split=split,
                                     sampler=sampler, ks=ev.ks, batch_size=ev.batch_size))
        return sums, n

    chunks = user_chunks(data, config, split=split)
    result = sharded_metrics(chunks, sums_of, names=names, device=device, desc=f"eval {split}")
    if split == "valid" and ev.valid_users is not None and ev.valid_users < data.num_users:
        logger.info("validation on a sample of %d of %d users", ev.valid_users, data.num_users)
    return result


def sampled_prefix(config: ExperimentConfig) -> str:
    """``sampled_uni100`` etc.: the prefix of the sampled metrics under ``config``."""
    return metric_prefix(config.eval.sampled_distribution, config.eval.sampled_negatives)


def popularity_sharded(
    data: StreamingDataset, config: ExperimentConfig, *, device: torch.device
) -> dict[str, float]:
    """A most-popular baseline on test: items ranked by how often they occur in the training
    inputs (each rank counts its share, counts summed over ranks), same protocol as the model."""
    ranking = popularity_ranking(training_popularity(data, device=device))
    ks = config.eval.ks

    def sums_of(chunk: UserRows) -> tuple[dict[str, float], int]:
        return popularity_sums(chunk.sequences, ranking, split="test", ks=ks,
                               history_items=config.eval.history_items), len(chunk)

    rank, world = dist_utils.rank(), dist_utils.world_size()
    chunks = data.eval_sequences(rank=rank, world=world, batch_size=1024)
    return sharded_metrics(chunks, sums_of, names=metric_names(ks), device=device,
                           desc="popularity test")
