"""Measures beside the main metrics: a most-popular baseline and intent recovery.

Both answer "did training learn anything real?" on the planted-intent synthetic data: the model
must beat ranking by popularity, and its centres must group users by their planted intent better
than chance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from elcrec_dist.clustering import nearest_centre, normalized_mutual_info
from elcrec_dist.data import Split, eval_batch, train_pairs
from elcrec_dist.embed import pooled_embeddings
from elcrec_dist.evaluation import HistoryItems, SharedScores, finalize, metric_sums
from elcrec_dist.model import ELCRec


def item_counts(sequences: Sequence[np.ndarray], *, num_items: int) -> np.ndarray:
    """How often each item occurs in the training inputs: [N + 1] float64."""
    counts = np.zeros(num_items + 1, dtype=np.float64)
    for seq in sequences:
        np.add.at(counts, train_pairs(seq)[0], 1.0)
    return counts


def popularity_ranking(counts: np.ndarray) -> SharedScores:
    """The most-popular ranking of ``counts`` [N + 1] (``item_counts``), sorted once for every
    batch of users it ranks."""
    return SharedScores(torch.from_numpy(counts))


def popularity_sums(
    sequences: Sequence[np.ndarray],
    ranking: SharedScores,
    *,
    split: Split,
    ks: Sequence[int],
    history_items: HistoryItems = "exclude",
) -> dict[str, float]:
    """Metric sums of ranking every item by ``ranking`` (``popularity_ranking``), same protocol
    as the model (history items by ``history_items``). Memory follows the users' histories and
    the catalogue once, never users x catalogue."""
    totals = {name: 0.0 for name in [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")] + ["MRR"]}
    for start in range(0, len(sequences), 1024):
        batch = eval_batch(sequences[start : start + 1024], split, max_len=1)
        ranks = ranking.ranks(batch.answers, batch.history, history_items=history_items)
        for name, value in metric_sums(ranks, ks).items():
            totals[name] += value
    return totals


def popularity_metrics(
    sequences: Sequence[np.ndarray],
    *,
    num_items: int,
    split: Split,
    ks: Sequence[int] = (5, 10, 20),
) -> dict[str, float]:
    """Most-popular baseline over users held in memory."""
    ranking = popularity_ranking(item_counts(sequences, num_items=num_items))
    return finalize(popularity_sums(sequences, ranking, split=split, ks=ks), len(sequences))


@torch.no_grad()
def intent_recovery(
    model: ELCRec, sequences: Sequence[np.ndarray], planted: np.ndarray, *, seed: int = 0
) -> dict[str, float]:
    """NMI between planted intents and each user's nearest learned centre.

    Users are embedded as in the cluster loss (mean-pooled training input, L2-normalised) and
    assigned to the nearest normalised centre. Chance is the NMI of the same assignment against
    the planted labels randomly permuted over users (mean of 5 permutations).
    """
    users = F.normalize(pooled_embeddings(model, sequences, batch_size=1024), dim=-1)
    centres = F.normalize(model.cluster_centers.detach().float().cpu(), dim=-1)
    assigned = nearest_centre(users, centres).numpy()
    rng = np.random.default_rng(seed)
    chance = float(
        np.mean([normalized_mutual_info(rng.permutation(planted), assigned) for _ in range(5)])
    )
    return {
        "intent_nmi": normalized_mutual_info(planted, assigned),
        "intent_nmi_chance": chance,
        "centres_used": float(len(np.unique(assigned))),
    }
