"""Full-ranking evaluation and top-K recommendation (spec: "Evaluation").

Two rules for the items of the user's input history (``eval.history_items``):

- ``exclude`` (the default): every item 1..N is a candidate and the padding id 0 never is.
  History items are excluded (they never count as ranked above the answer), except the answer
  itself when it also occurs in the history, which keeps its score: a repeated purchase stays
  rankable instead of becoming an automatic miss, and no rank depends on the sign of a score.
- ``score_zero``: the reference run's rule, which produced the paper's Table 1. Every history
  item's score is set to 0, the answer's included when it repeats a history item, and every id
  0..N stays a candidate (the padding row with its own score). An answer scoring below 0 then
  falls behind the whole history, and a repeated answer competes at 0. Where no answer repeats
  a history item and answers ranked in the top K score above 0 (the Amazon benchmark files) the
  two rules give the same metrics; on Yelp 6.7 % of test answers repeat a history item and they
  do not. (The reference run's table also had one unused extra id, always a sampled negative;
  our tables do not, and it could only count where an answer scores that low.)

Ties are broken pessimistically: the answer's 0-based rank is the number of *other* candidates
whose score is >= its own, so a model that scores everything equal gets no credit.

Metrics are returned as sums plus a user count so that ranks (or shards) can be added up before
dividing: HR@k = 1[rank < k], NDCG@k = 1/log2(rank + 2) if rank < k, MRR = 1/(rank + 1).

Scoring in item tiles. A dense [B, N + 1] score matrix grows with the catalogue (1,024 users x
10 M items is 41 GB). ``tiled_answer_ranks`` and ``top_k_items`` score ``tile_items`` items at a
time (``users @ table[lo:hi].T``) and fold each tile into a running rank count or a running
top-K, so memory follows B x tile_items. The dense functions (``answer_ranks``, ``dense_top_k``;
``tile_items=None`` in ``evaluate_batch``) stay as the readable reference, and tests hold the two
equal. Each decision compares the same float32 dot products as the dense matrix holds, so the
results are equal wherever the matrix product rounds a dot product the same whatever the shape of
the product it sits in: always for integer-valued tables (exact arithmetic, any tile size); with
trained weights on this machine's MKL for tiles of 1,000 items or more and batches of 64 users or
more. Narrower products (a few users or items) may go through other kernels whose last bit
differs, as the dense path's scores already differ between batch sizes.

Top-K order: score descending, ties by item id ascending (-0.0 and 0.0 are one score). Scores
must not be NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from elcrec_dist.config import HISTORY_ITEMS, EvalConfig, HistoryItems
from elcrec_dist.data import EvalBatch, Split, eval_batch
from elcrec_dist.model import ELCRec

DEFAULT_TILE_ITEMS = EvalConfig.tile_items


def _check_history_items(history_items: str) -> None:
    if history_items not in HISTORY_ITEMS:
        raise ValueError(f"history_items must be one of {HISTORY_ITEMS}, got {history_items!r}")


def _excluded_history(
    history: torch.Tensor, answers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The history sorted [B, L] and a mask [B, L] of the entries to exclude: each distinct item
    once, never padding (0) and never the answer itself."""
    ordered = history.sort(dim=1).values  # [B, L]
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return ordered, (ordered > 0) & ~repeated & (ordered != answers[:, None])


def answer_ranks(
    scores: torch.Tensor,
    answers: torch.Tensor,
    history: torch.Tensor,
    *,
    history_items: HistoryItems = "exclude",
) -> torch.Tensor:
    """0-based pessimistic rank of each answer among the candidates (dense reference).

    scores: [B, N + 1] (column 0 is padding); answers: [B]; history: [B, L] item ids, 0 where
    empty. Returns [B] int64. ``scores`` is not modified.

    ``exclude``: one pass over the score matrix: count every column scoring >= the answer, then
    take back the padding column and the distinct history items (other than the answer) that
    were counted, which are found in the small [B, L] history instead of writing -inf into
    [B, N+1]. ``score_zero``: a copy with 0 written over the history items, as the reference run
    did, and every column but the answer's own counted against it.
    """
    _check_history_items(history_items)
    if history_items == "score_zero":
        zeroed = scores.clone()
        rows = torch.arange(history.shape[0], device=history.device)[:, None].expand_as(history)
        real = history > 0
        zeroed[rows[real], history[real]] = 0.0
        target = zeroed.gather(1, answers[:, None])  # [B, 1]
        return (zeroed >= target).sum(dim=1) - 1  # the answer's own column always counts
    answer_scores = scores.gather(1, answers[:, None])  # [B, 1]
    at_least = (scores >= answer_scores).sum(dim=1)  # includes the answer itself
    ordered, excluded = _excluded_history(history, answers)
    counted = excluded & (scores.gather(1, ordered) >= answer_scores)
    padding = scores[:, 0] >= answer_scores[:, 0]
    return at_least - 1 - counted.sum(dim=1) - padding.long()


class SharedScores:
    """Ranks under one score row shared by every user (a most-popular baseline), without the
    [B, N + 1] matrix: the row is sorted once, and each user's count of candidates scoring >= its
    answer is a binary search in it; the history is then corrected in the small [B, L] history,
    as ``tiled_answer_ranks`` does per tile. Equal to ``answer_ranks`` on the expanded row
    exactly (the same comparisons of the same values)."""

    def __init__(self, scores: torch.Tensor) -> None:
        """scores: [N + 1] (column 0 is padding), any float dtype, no NaN."""
        self.scores = scores
        self._sorted_items = scores[1:].sort().values  # the candidates 1..N

    def ranks(
        self, answers: torch.Tensor, history: torch.Tensor, *, history_items: HistoryItems
    ) -> torch.Tensor:
        """answers [B], history [B, L] (0 where empty) -> [B] int64, the rule of
        ``answer_ranks``."""
        _check_history_items(history_items)
        zero = history_items == "score_zero"
        ordered, excluded = _excluded_history(history, answers)  # distinct, not the answer
        own = self.scores[answers]  # [B]
        target = own
        if zero:
            repeats = (ordered == answers[:, None]).any(dim=1)
            target = torch.where(repeats, torch.zeros_like(own), own)
        items = self._sorted_items
        at_least = items.numel() - torch.searchsorted(items, target)  # items scoring >= it
        if zero:  # the padding column is a candidate too
            at_least += (self.scores[0] >= target).long()
        rank = at_least - (own >= target).long()  # the answer's own column, when it counted
        rank -= (excluded & (self.scores[ordered] >= target[:, None])).sum(dim=1)
        if zero:  # each other history item counts again, by its score of 0
            rank += (excluded & (target[:, None] <= 0.0)).sum(dim=1)
        return rank


def tile_ranges(num_items: int, tile_items: int) -> Iterator[tuple[int, int]]:
    """Item id ranges [lo, hi) covering the candidates 1..num_items, ``tile_items`` at a time."""
    if tile_items < 1:
        raise ValueError(f"tile_items must be >= 1, got {tile_items}")
    for lo in range(1, num_items + 1, tile_items):
        yield lo, min(lo + tile_items, num_items + 1)


def score_tile(users: torch.Tensor, table: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Scores of items lo..hi-1: users [B, D], table [N + 1, D] -> [B, hi - lo] float32. The
    same product as ``ELCRec.score_all`` restricted to those rows."""
    return (users @ table[lo:hi].T).float()


# Users per block when scoring each user's answer alone: a [block, block] product of which the
# diagonal is kept, so memory stays bounded for any batch size.
_ANSWER_BLOCK = 1024


def answer_scores(users: torch.Tensor, table: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Each user's score of its own answer: users [B, D], answers [B] -> [B] float32.

    A matrix product (the diagonal of users @ table[answers].T) rather than a row-wise sum, so
    the dot product is computed like the tiles' (a row-wise sum rounds differently)."""
    parts = []
    for start in range(0, users.shape[0], _ANSWER_BLOCK):
        block = slice(start, start + _ANSWER_BLOCK)
        parts.append((users[block] @ table[answers[block]].T).float().diagonal())
    return torch.cat(parts)


def tiled_answer_ranks(
    users: torch.Tensor,
    table: torch.Tensor,
    answers: torch.Tensor,
    history: torch.Tensor,
    *,
    tile_items: int,
    history_items: HistoryItems = "exclude",
) -> torch.Tensor:
    """``answer_ranks`` without the [B, N + 1] matrix: users [B, D], table [N + 1, D] (row 0
    padding), answers [B], history [B, L] (0 where empty) -> [B] int64.

    Per tile of items: count those scoring >= the answer, then take back the history items and
    the answer itself that lie in the tile (found in the small [B, L] history). Under
    ``score_zero`` the answer's score is 0 when it repeats a history item, each history item in
    the tile counts again by its score of 0, and the padding row counts by its own score."""
    _check_history_items(history_items)
    zero = history_items == "score_zero"
    ordered, excluded = _excluded_history(history, answers)
    threshold = answer_scores(users, table, answers)[:, None]  # [B, 1]
    count = torch.zeros(users.shape[0], dtype=torch.int64, device=users.device)
    if zero:
        repeats = (ordered == answers[:, None]).any(dim=1)  # [B]
        threshold = torch.where(repeats[:, None], 0.0, threshold)
        count += (score_tile(users, table, 0, 1)[:, 0] >= threshold[:, 0]).long()
        history_counts = threshold[:, 0] <= 0.0  # [B]: does a history item's 0 reach the answer
    for lo, hi in tile_ranges(table.shape[0] - 1, tile_items):
        at_least = score_tile(users, table, lo, hi) >= threshold  # [B, T]
        count += at_least.sum(dim=1, dtype=torch.int32)  # half the time of an int64 sum
        inside = excluded & (ordered >= lo) & (ordered < hi)  # [B, L]
        taken = inside & at_least.gather(1, torch.where(inside, ordered - lo, 0))
        count -= taken.sum(dim=1)
        if zero:
            count += (inside & history_counts[:, None]).sum(dim=1)
        own = (answers >= lo) & (answers < hi)  # [B]
        itself = at_least.gather(1, torch.where(own, answers - lo, 0)[:, None])[:, 0]
        count -= (own & itself).long()
    return count


@dataclass(frozen=True)
class TopK:
    """The K best items per user, best first: items [B, K] int64 and their scores [B, K] float32.

    Where fewer than K candidates remain (a history covering nearly the whole catalogue), the
    trailing entries are item 0 with score -inf."""

    items: torch.Tensor
    scores: torch.Tensor


# A float32 score and an item id packed into one int64 whose order is (score desc, id asc) under
# a descending top-k: the high 32 bits are the score's bits made order-preserving as a signed
# integer, the low 32 bits are 2**32 - 1 - id. Keys are then unique per row, so torch.topk's
# unspecified order among equal values never decides anything.
_ID_SPAN = 1 << 32
_MISSING = torch.iinfo(torch.int64).min  # an excluded item: below every packed key


def _pack(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 scores and their item ids (same shape, or ids broadcast) -> int64 keys."""
    scores = scores.masked_fill(scores == 0, 0.0)  # -0.0 == 0.0: one score, one key
    bits = scores.view(torch.int32).to(torch.int64)
    # A negative float's magnitude grows with its bits; flipping the 31 low bits reverses that.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits * _ID_SPAN + (_ID_SPAN - 1 - ids)


def _unpack(keys: torch.Tensor) -> TopK:
    """int64 keys [B, K] -> TopK (missing keys become item 0, score -inf)."""
    high = torch.div(keys, _ID_SPAN, rounding_mode="floor")
    items = _ID_SPAN - 1 - (keys - high * _ID_SPAN)
    bits = torch.where(high < 0, high ^ 0x7FFFFFFF, high).to(torch.int32)
    missing = keys == _MISSING
    return TopK(
        items=items.masked_fill(missing, 0),
        scores=bits.view(torch.float32).masked_fill(missing, -math.inf),
    )


def _check_k(k: int, num_items: int) -> None:
    if not 1 <= k <= num_items:
        raise ValueError(f"k must be in 1..{num_items} (the catalogue), got {k}")
    if num_items >= _ID_SPAN - 1:
        raise ValueError(f"top-K packs item ids into 32 bits; {num_items} items do not fit")


def _exclude(values: torch.Tensor, lo: int, history: torch.Tensor, mark: float | int) -> None:
    """Write ``mark`` over the history's items in a tile [B, T] of items lo.. (in place).
    A history id that occurs twice is written twice with the same mark: the order of the writes
    cannot change the result."""
    inside = (history >= lo) & (history < lo + values.shape[1])  # [B, L]; padding never inside
    rows = torch.arange(history.shape[0], device=history.device)[:, None].expand_as(history)
    values[rows[inside], history[inside] - lo] = mark


def _tile_best(
    scores: torch.Tensor, lo: int, history: torch.Tensor, *, k: int, keep_history: bool
) -> torch.Tensor:
    """The best min(k, T) keys of one tile scores [B, T] of items lo.., in any order.

    A float top-(k + 1) finds each row's k-th and (k + 1)-th best scores. Where they differ, the
    k items it picked are the only ones scoring >= the k-th, and only those are packed. Rows
    where they are equal (a tie across the cut, which torch.topk settles in no defined order),
    or where the k-th is -inf (excluded items there), are packed whole instead, so the cut
    falls by item id and excluded items become ``_MISSING``."""
    width = scores.shape[1]
    kk = min(k, width)
    if not keep_history:
        _exclude(scores, lo, history, -math.inf)
    values, index = scores.topk(min(k + 1, width), dim=1)  # [B, kk or kk + 1]
    crowded = values[:, kk - 1] == -math.inf  # [B]
    if values.shape[1] > kk:
        crowded |= values[:, kk] == values[:, kk - 1]
        values, index = values[:, :kk], index[:, :kk]
    keys = _pack(values, index + lo)
    if bool(crowded.any()):
        rows = crowded.nonzero()[:, 0]
        ids = torch.arange(lo, lo + width, device=scores.device)
        whole = _pack(scores[rows], ids)  # [R, T]
        if not keep_history:
            _exclude(whole, lo, history[rows], _MISSING)
        keys[rows] = whole.topk(kk, dim=1).values
    return keys


def top_k_items(
    users: torch.Tensor,
    table: torch.Tensor,
    history: torch.Tensor,
    *,
    k: int,
    keep_history: bool = False,
    tile_items: int = DEFAULT_TILE_ITEMS,
) -> TopK:
    """The ``k`` best items 1..N for each user, scored ``tile_items`` at a time.

    users [B, D], table [N + 1, D] (row 0 padding, never returned), history [B, L] item ids
    (0 where empty), excluded unless ``keep_history``. Order: score descending, ties by item id
    ascending. Memory: a tile of B x tile_items scores plus a running [B, k]."""
    num_items = table.shape[0] - 1
    _check_k(k, num_items)
    running = torch.full((users.shape[0], k), _MISSING, dtype=torch.int64, device=users.device)
    for lo, hi in tile_ranges(num_items, tile_items):
        best = _tile_best(score_tile(users, table, lo, hi), lo, history, k=k,
                          keep_history=keep_history)
        running = torch.cat([running, best], dim=1).topk(k, dim=1).values
    return _unpack(running)


def dense_top_k(
    scores: torch.Tensor, history: torch.Tensor, *, k: int, keep_history: bool = False
) -> TopK:
    """Readable reference for ``top_k_items`` on a dense scores [B, N + 1] (column 0 padding):
    sort every item by score, descending, with a stable sort (ties stay in id order), then move
    the excluded ones (padding, and the history unless kept) behind the rest, stably again."""
    _check_k(k, scores.shape[1] - 1)
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    if not keep_history:
        excluded.scatter_(1, history, True)
    excluded[:, 0] = True
    order = scores.sort(dim=1, descending=True, stable=True).indices
    last = excluded.gather(1, order).to(torch.int8).sort(dim=1, stable=True).indices
    top = order.gather(1, last)[:, :k]  # [B, k]
    dropped = excluded.gather(1, top)
    values = scores.gather(1, top)
    return TopK(
        items=top.masked_fill(dropped, 0),
        scores=values.masked_fill(values == 0, 0.0).masked_fill(dropped, -math.inf),
    )


def naive_answer_rank(
    scores: Sequence[float],
    answer: int,
    history: Iterable[int],
    history_items: HistoryItems = "exclude",
) -> int:
    """Readable reference for one user: the same rules as ``answer_ranks``, by a plain loop."""
    _check_history_items(history_items)
    if history_items == "score_zero":
        zeroed = list(scores)
        for item in history:
            if item > 0:
                zeroed[item] = 0.0
        return sum(1 for item in range(len(zeroed)) if item != answer
                   and zeroed[item] >= zeroed[answer])
    excluded = set(history) - {answer}
    target = scores[answer]
    rank = 0
    for item in range(1, len(scores)):
        if item == answer or item in excluded:
            continue
        if scores[item] >= target:
            rank += 1
    return rank


def metric_sums(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Sums of HR@k, NDCG@k and MRR over a batch of 0-based ranks [B]."""
    r = ranks.to(torch.float64)
    sums: dict[str, float] = {}
    for k in ks:
        hit = r < k
        sums[f"HR@{k}"] = float(hit.sum())
        sums[f"NDCG@{k}"] = float((hit / torch.log2(r + 2.0)).sum())
    sums["MRR"] = float((1.0 / (r + 1.0)).sum())
    return sums


def finalize(sums: dict[str, float], count: int) -> dict[str, float]:
    """Divide summed metrics by the user count."""
    if count == 0:
        raise ValueError("no users were evaluated")
    return {name: value / count for name, value in sums.items()}


def ndcg_of_rank(rank: int) -> float:
    return 1.0 / math.log2(rank + 2)


def user_vectors(model: ELCRec, inputs: torch.Tensor) -> torch.Tensor:
    """Prediction vectors of left-padded inputs [B, T] -> [B, D] on the model's device, in
    whatever mode the caller set (eval for ranking)."""
    device = model.item_embeddings.weight.device
    return model.user_vector(model(inputs.to(device), last_only=True))


@torch.no_grad()
def batch_ranks(
    model: ELCRec,
    batch: EvalBatch,
    *,
    tile_items: int | None = DEFAULT_TILE_ITEMS,
    history_items: HistoryItems = "exclude",
) -> torch.Tensor:
    """0-based rank of each user's answer in one batch -> [B] int64, model in whatever mode the
    caller set (eval for ranking). ``tile_items=None`` ranks on the dense [B, N + 1] score
    matrix (the reference)."""
    users = user_vectors(model, batch.inputs)  # [B, D]
    answers, history = batch.answers.to(users.device), batch.history.to(users.device)
    if tile_items is None:
        return answer_ranks(model.score_all(users).float(), answers, history,
                            history_items=history_items)
    table = model.item_embeddings.weight
    return tiled_answer_ranks(users, table, answers, history, tile_items=tile_items,
                              history_items=history_items)


def evaluate_batch(
    model: ELCRec,
    batch: EvalBatch,
    ks: Sequence[int],
    *,
    tile_items: int | None = DEFAULT_TILE_ITEMS,
    history_items: HistoryItems = "exclude",
) -> dict[str, float]:
    """Metric sums for one batch (``batch_ranks``)."""
    return metric_sums(
        batch_ranks(model, batch, tile_items=tile_items, history_items=history_items), ks
    )


@torch.no_grad()
def recommend(
    model: ELCRec,
    inputs: torch.Tensor,
    history: torch.Tensor,
    *,
    k: int,
    keep_history: bool = False,
    tile_items: int = DEFAULT_TILE_ITEMS,
) -> TopK:
    """Top-``k`` items for users with left-padded inputs [B, T] and history [B, L] (0 where
    empty; excluded unless ``keep_history``), model in whatever mode the caller set."""
    users = user_vectors(model, inputs)
    return top_k_items(
        users,
        model.item_embeddings.weight,
        history.to(users.device),
        k=k,
        keep_history=keep_history,
        tile_items=tile_items,
    )


@torch.no_grad()
def evaluate_sums(
    model: ELCRec,
    sequences: Sequence[np.ndarray],
    *,
    split: Split,
    ks: Sequence[int] = (5, 10, 20),
    batch_size: int = 1024,
    tile_items: int | None = DEFAULT_TILE_ITEMS,
    history_items: HistoryItems = "exclude",
    progress: bool = False,
) -> tuple[dict[str, float], int]:
    """Full-rank metric sums and user count over ``sequences`` for ``split`` (eval mode),
    the catalogue scored ``tile_items`` items at a time (None: the dense reference), history
    items treated by ``history_items`` (module docstring)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    starts = range(0, len(sequences), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"eval {split}", unit="batch", leave=False)
    try:
        for start in starts:
            chunk = sequences[start : start + batch_size]
            batch = eval_batch(chunk, split, model.config.max_len)
            sums = evaluate_batch(model, batch, ks, tile_items=tile_items,
                                  history_items=history_items)
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value
    finally:
        model.train(was_training)
    return totals, len(sequences)


def evaluate(model: ELCRec, sequences: Sequence[np.ndarray], **kwargs: object) -> dict[str, float]:
    """Mean full-rank metrics (see ``evaluate_sums`` for the arguments)."""
    sums, count = evaluate_sums(model, sequences, **kwargs)  # type: ignore[arg-type]
    return finalize(sums, count)
