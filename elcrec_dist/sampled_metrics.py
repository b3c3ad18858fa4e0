"""Sampled-negative metrics: each user's answer ranked against a few drawn items, not the catalogue.

RecBole's ``uni100`` / ``pop100`` evaluation modes: the answer and ``N`` negatives, items the
user never interacted with, drawn uniformly (``uniform``) or in proportion to their popularity
in the training inputs (``popularity``). They are cheap (``N + 1`` scores per user instead of
the catalogue) but are not the full-ranking metrics and do not rank models the same way
(Krichene and Rendle, "On Sampled Metrics for Item Recommendation", KDD 2020), so they are
reported only beside the full-ranking ones, under names that say so:
``sampled_uni100/NDCG@10``, ``sampled_pop100/HR@20`` (``metric_prefix``).

The draw. A user's negatives are ``N`` distinct items outside everything the user ever
interacted with (the whole stored sequence, answer included). They are a function of
(seed, split, user id) only, through a counter-based hash (splitmix64): the same on every
rank, in every batch and at every epoch, whatever the world size, as RecBole fixes its
negatives once. Draw ``j`` of round ``r`` hashes (seed, split, user, r, j); a draw that hits the
history or repeats an earlier one is redrawn in the next round.

Ranks are pessimistic, as in the full ranking: negatives scoring at least the answer count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from elcrec_dist.data import Split, eval_batch
from elcrec_dist.evaluation import metric_sums, user_vectors
from elcrec_dist.model import ELCRec

Distribution = Literal["uniform", "popularity"]
MAX_ROUNDS = 100
_SPLIT_CODE = {"valid": 1, "test": 2}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def metric_prefix(distribution: Distribution, negatives: int) -> str:
    """The name every sampled metric carries: ``sampled_uni100`` or ``sampled_pop100``."""
    short = {"uniform": "uni", "popularity": "pop"}[distribution]
    return f"sampled_{short}{negatives}"


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of ``x`` (uint64, any shape): a bijection that mixes every bit."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return z ^ (z >> np.uint64(31))


def draw_hashes(
    seed: int, split: Split, user_ids: np.ndarray, round_: int, count: int
) -> np.ndarray:
    """Hashes of draws 0..count-1 of ``round_`` for each user: [U] int64 -> [U, count] uint64."""
    with np.errstate(over="ignore"):
        first = np.asarray([seed], dtype=np.uint64) ^ (
            np.uint64(_SPLIT_CODE[split]) << np.uint64(56)
        )
        key = splitmix64(first)  # [1]
        key = splitmix64(key ^ np.asarray(user_ids, dtype=np.int64).view(np.uint64))  # [U]
        key = splitmix64(key ^ np.uint64(round_))
        draws = np.arange(count, dtype=np.uint64)
        return splitmix64(key[:, None] ^ draws[None, :])


class NegativeSampler:
    """Draws each user's sampled negatives from a fixed distribution over items 1..N.

    ``uniform``: every item alike. ``popularity``: ``weights`` [N + 1] (index 0 ignored), e.g.
    each item's count in the training inputs; items of weight 0 are never drawn.
    """

    def __init__(self, *, num_items: int, negatives: int, distribution: Distribution, seed: int,
                 weights: np.ndarray | None = None) -> None:
        if negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {negatives}")
        if distribution == "popularity":
            if weights is None or len(weights) != num_items + 1:
                raise ValueError(f"popularity sampling needs weights for items 0..{num_items}")
            self.cdf: np.ndarray | None = np.cumsum(np.asarray(weights[1:], dtype=np.float64))
            if self.cdf[-1] <= 0:
                raise ValueError("popularity sampling: every item has weight 0")
        else:
            self.cdf = None
        self.num_items, self.negatives, self.distribution = num_items, negatives, distribution
        self.seed = seed

    def _items(self, hashes: np.ndarray) -> np.ndarray:
        """Item ids 1..N for hashes [U, n]."""
        if self.cdf is None:
            return (hashes % np.uint64(self.num_items)).astype(np.int64) + 1
        # 53 random bits as a uniform in [0, 1): the item whose cumulative weight passes it
        u = (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53 * self.cdf[-1]
        return np.searchsorted(self.cdf, u, side="right").astype(np.int64) + 1

    def draw(
        self, user_ids: np.ndarray, sequences: Sequence[np.ndarray], split: Split
    ) -> np.ndarray:
        """Each user's negatives: [U, negatives] int64, distinct per user, none in the user's
        sequence. Raises ``ValueError`` naming a user for whom none can be found."""
        n = self.negatives
        seen = _padded(sequences)  # [U, L], -1 where empty
        out = self._items(draw_hashes(self.seed, split, user_ids, 0, n))
        for round_ in range(1, MAX_ROUNDS + 1):
            bad = _clashes(out, seen)
            if not bad.any():
                return out
            fresh = self._items(draw_hashes(self.seed, split, user_ids, round_, n))
            out = np.where(bad, fresh, out)
        row = int(np.flatnonzero(_clashes(out, seen).any(axis=1))[0])
        raise ValueError(
            f"sampled metrics: could not draw {n} distinct unseen items for user "
            f"{int(user_ids[row])} ({self.distribution}); lower eval.sampled_negatives"
        )


def _padded(sequences: Sequence[np.ndarray]) -> np.ndarray:
    width = max((len(s) for s in sequences), default=0)
    out = np.full((len(sequences), max(width, 1)), -1, dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out


def _clashes(draws: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """[U, n] True where a draw is in the user's sequence or repeats an earlier draw of its row."""
    in_history = (draws[:, :, None] == seen[:, None, :]).any(axis=2)
    order = np.argsort(draws, axis=1, kind="stable")
    ordered = np.take_along_axis(draws, order, axis=1)
    repeat_sorted = np.zeros_like(ordered, dtype=bool)
    repeat_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # the later of equal draws
    repeat = np.zeros_like(repeat_sorted)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    return in_history | repeat


def sampled_ranks(users: torch.Tensor, table: torch.Tensor, answers: torch.Tensor,
                  negatives: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of each answer among its negatives: users [B, D], table
    [N + 1, D], answers [B], negatives [B, n] -> [B] int64 (negatives scoring >= the answer)."""
    candidates = torch.cat([answers[:, None], negatives], dim=1)  # [B, n + 1]
    scores = torch.bmm(table[candidates], users[:, :, None])[:, :, 0].float()  # [B, n + 1]
    return (scores[:, 1:] >= scores[:, :1]).sum(dim=1)


@torch.no_grad()
def sampled_sums(
    model: ELCRec,
    user_ids: np.ndarray,
    sequences: Sequence[np.ndarray],
    *,
    split: Split,
    sampler: NegativeSampler,
    ks: Sequence[int],
    batch_size: int = 1024,
) -> dict[str, float]:
    """Sums of the sampled metrics over users [U] (ids and full sequences), eval mode, named
    ``metric_prefix(...)/HR@k`` etc."""
    prefix = metric_prefix(sampler.distribution, sampler.negatives)
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            batch = eval_batch(chunk, split, model.config.max_len)
            users = user_vectors(model, batch.inputs)
            negatives = torch.from_numpy(
                sampler.draw(user_ids[start : start + batch_size], chunk, split)
            )
            ranks = sampled_ranks(
                users,
                model.item_embeddings.weight,
                batch.answers.to(users.device),
                negatives.to(users.device),
            )
            for name, value in metric_sums(ranks, ks).items():
                totals[f"{prefix}/{name}"] = totals.get(f"{prefix}/{name}", 0.0) + value
    finally:
        model.train(was_training)
    return totals
