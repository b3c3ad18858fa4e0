"""Evaluation over a streamed dataset, sharded over ranks: each rank ranks its share of the
users, metric sums and user counts are added over ranks, then divided. The ranking itself
(full ranking, history excluded, pessimistic ties) is ``elcrec_dist.evaluation``'s; this module
is the one loop that runs it over a dataset, for the model and for the popularity baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.data import Split
from elcrec_dist.diagnostics import item_counts, popularity_sums
from elcrec_dist.evaluation import evaluate_sums, finalize
from elcrec_dist.model import ELCRec
from elcrec_dist.runlog import progress
from elcrec_dist.stream import StreamingDataset

# one chunk of users' full sequences -> (metric sums, number of users)
ChunkSums = Callable[[Sequence[np.ndarray]], tuple[dict[str, float], int]]


def metric_names(ks: Sequence[int]) -> list[str]:
    """The metrics every evaluation reports: HR@k and NDCG@k for each cut-off, and MRR."""
    return [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")] + ["MRR"]


def sharded_metrics(
    data: StreamingDataset, sums_of: ChunkSums, *, ks: Sequence[int], batch_size: int,
    device: torch.device, desc: str,
) -> dict[str, float]:
    """Mean metrics over every user of ``data``: this rank's users in chunks of ``batch_size``
    through ``sums_of``, sums and counts reduced over ranks (every rank gets the result)."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    totals = dict.fromkeys(metric_names(ks), 0.0)
    count = 0
    chunks = data.eval_sequences(rank=rank, world=world, batch_size=batch_size)
    for chunk in progress(chunks, desc=desc, main=dist_utils.is_main(), total=None):
        sums, n = sums_of(chunk.sequences)
        for name, value in sums.items():
            totals[name] += value
        count += n
    reduced = dist_utils.all_reduce_sums({**totals, "__count": float(count)}, device)
    return finalize(reduced, int(reduced.pop("__count")))


def evaluate_sharded(
    model: ELCRec, data: StreamingDataset, config: ExperimentConfig, *, split: Split,
    device: torch.device,
) -> dict[str, float]:
    """The model's full-ranking metrics on ``split`` over every user (eval mode)."""
    ks, batch_size = config.eval.ks, config.eval.batch_size

    def sums_of(sequences: Sequence[np.ndarray]) -> tuple[dict[str, float], int]:
        return evaluate_sums(model, sequences, split=split, ks=ks, batch_size=batch_size)

    return sharded_metrics(data, sums_of, ks=ks, batch_size=batch_size, device=device,
                           desc=f"eval {split}")


def popularity_sharded(
    data: StreamingDataset, config: ExperimentConfig, *, device: torch.device
) -> dict[str, float]:
    """A most-popular baseline on test: items ranked by how often they occur in the training
    inputs (each rank counts its share, counts summed over ranks), same protocol as the model."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    counts = np.zeros(data.info.num_items + 1, dtype=np.float64)
    for chunk in data.eval_sequences(rank=rank, world=world):
        counts += item_counts(chunk.sequences, num_items=data.info.num_items)
    counts = dist_utils.global_sum(torch.from_numpy(counts).to(device)).cpu().numpy()
    ks = config.eval.ks

    def sums_of(sequences: Sequence[np.ndarray]) -> tuple[dict[str, float], int]:
        return popularity_sums(sequences, counts, split="test", ks=ks), len(sequences)

    return sharded_metrics(data, sums_of, ks=ks, batch_size=1024, device=device,
                           desc="popularity test")
