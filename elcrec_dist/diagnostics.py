"""Measures beside the main metrics: a most-popular baseline and intent recovery.

Both answer "did training learn anything real?" on the planted-intent synthetic data: the model
must beat ranking by popularity, and its centres must group users by their planted intent better
than chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from elcrec_dist.clustering import assign, normalized_mutual_info
from elcrec_dist.data import Split, eval_batch, left_pad, train_pairs
from elcrec_dist.evaluation import answer_ranks, finalize, metric_sums
from elcrec_dist.model import ELCRec


def item_counts(sequences: Sequence[np.ndarray], *, num_items: int) -> np.ndarray:
    """How often each item occurs in the training inputs: [N + 1] float64."""
    counts = np.zeros(num_items + 1, dtype=np.float64)
    for seq in sequences:
        np.add.at(counts, train_pairs(seq)[0], 1.0)
    return counts


def popularity_sums(
    sequences: Sequence[np.ndarray], counts: np.ndarray, *, split: Split, ks: Sequence[int]
) -> dict[str, float]:
    """Metric sums of ranking every item by ``counts``, same protocol as the model."""
    scores_row = torch.from_numpy(counts)
    totals = {name: 0.0 for name in [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")] + ["MRR"]}
    for start in range(0, len(sequences), 1024):
        batch = eval_batch(sequences[start : start + 1024], split, max_len=1)
        scores = scores_row.expand(len(batch.answers), -1)
        for name, value in metric_sums(answer_ranks(scores, batch.answers, batch.history), ks).items():
            totals[name] += value
    return totals


def popularity_metrics(
    sequences: Sequence[np.ndarray], *, num_items: int, split: Split, ks: Sequence[int] = (5, 10, 20)
) -> dict[str, float]:
    """Most-popular baseline over users held in memory."""
    counts = item_counts(sequences, num_items=num_items)
    return finalize(popularity_sums(sequences, counts, split=split, ks=ks), len(sequences))


def popularity_metrics_sharded(data: Any, config: Any, *, rank: int, world: int, device: torch.device) -> dict[str, float]:
    """Most-popular baseline on test over a ``StreamingDataset``: each rank counts items of its
    share, counts are summed over ranks, each rank ranks its users, sums are reduced."""
    from elcrec_dist import distributed as dist_utils

    counts = np.zeros(data.info.num_items + 1, dtype=np.float64)
    for chunk in data.eval_sequences(rank=rank, world=world):
        counts += item_counts(chunk.sequences, num_items=data.info.num_items)
    counts = dist_utils.global_sum(torch.from_numpy(counts).to(device)).cpu().numpy()
    totals: dict[str, float] = {}
    users = 0
    for chunk in data.eval_sequences(rank=rank, world=world):
        for name, value in popularity_sums(chunk.sequences, counts, split="test", ks=config.eval.ks).items():
            totals[name] = totals.get(name, 0.0) + value
        users += len(chunk)
    reduced = dist_utils.all_reduce_sums({**totals, "__count": float(users)}, device)
    return finalize(reduced, int(reduced.pop("__count")))


@torch.no_grad()
def intent_recovery(
    model: ELCRec, sequences: Sequence[np.ndarray], planted: np.ndarray, *, seed: int = 0
) -> dict[str, float]:
    """NMI between planted intents and each user's nearest learned centre.

    Users are embedded as in the cluster loss (mean-pooled training input, L2-normalised) and
    assigned to the nearest normalised centre. Chance is the NMI of the same assignment against
    the planted labels randomly permuted over users (mean of 5 permutations).
    """
    was_training = model.training
    model.eval()
    device = model.item_embeddings.weight.device
    pooled = []
    for start in range(0, len(sequences), 1024):
        chunk = [train_pairs(s)[0] for s in sequences[start : start + 1024]]
        pooled.append(model.pooled(model(left_pad(chunk, model.config.max_len).to(device))).float().cpu())
    model.train(was_training)
    users = F.normalize(torch.cat(pooled), dim=-1)
    centres = F.normalize(model.cluster_centers.detach().float().cpu(), dim=-1)
    assigned = assign(users, centres).numpy()
    rng = np.random.default_rng(seed)
    chance = float(np.mean([normalized_mutual_info(rng.permutation(planted), assigned) for _ in range(5)]))
    return {
        "intent_nmi": normalized_mutual_info(planted, assigned),
        "intent_nmi_chance": chance,
        "centres_used": float(len(np.unique(assigned))),
    }
