"""Full-ranking evaluation (spec: "Evaluation").

Every item 1..N is a candidate; the padding id 0 never is. Items of the user's input history are
excluded (they never count as ranked above the answer), except the answer itself when it also
occurs in the history, which keeps its score: a repeated purchase stays rankable instead of
becoming an automatic miss. The reference run wrote 0 into excluded scores instead; on the
benchmark files (no test answer repeats a history item in Beauty) this gives the same metrics.

Ties are broken pessimistically: the answer's 0-based rank is the number of *other* candidates
whose score is >= its own, so a model that scores everything equal gets no credit.

Metrics are returned as sums plus a user count so that ranks (or shards) can be added up before
dividing: HR@k = 1[rank < k], NDCG@k = 1/log2(rank + 2) if rank < k, MRR = 1/(rank + 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from elcrec_dist.data import EvalBatch, Split, eval_batch
from elcrec_dist.model import ELCRec


def answer_ranks(scores: torch.Tensor, answers: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of each answer among the candidates.

    scores: [B, N + 1] (column 0 is padding); answers: [B]; history: [B, L] item ids to exclude,
    0 where empty. Returns [B] int64. ``scores`` is not modified.

    One pass over the score matrix: count every column scoring >= the answer, then take back
    the padding column and the distinct history items (other than the answer) that were
    counted, which are found in the small [B, L] history instead of writing -inf into [B, N+1].
    """
    answer_scores = scores.gather(1, answers[:, None])  # [B, 1]
    at_least = (scores >= answer_scores).sum(dim=1)  # includes the answer itself
    ordered = history.sort(dim=1).values  # [B, L]
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    excluded = (ordered > 0) & ~repeated & (ordered != answers[:, None])
    counted = excluded & (scores.gather(1, ordered) >= answer_scores)
    padding = scores[:, 0] >= answer_scores[:, 0]
    return at_least - 1 - counted.sum(dim=1) - padding.long()


def naive_answer_rank(scores: Sequence[float], answer: int, history: Iterable[int]) -> int:
    """Readable reference for one user: the same rule as ``answer_ranks``, by a plain loop."""
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


@torch.no_grad()
def evaluate_batch(model: ELCRec, batch: EvalBatch, ks: Sequence[int]) -> dict[str, float]:
    """Metric sums for one batch, model in whatever mode the caller set (eval for ranking)."""
    device = model.item_embeddings.weight.device
    hidden = model(batch.inputs.to(device), last_only=True)  # [B, 1, D]
    scores = model.score_all(model.user_vector(hidden)).float()  # [B, N + 1]
    ranks = answer_ranks(scores, batch.answers.to(device), batch.history.to(device))
    return metric_sums(ranks, ks)


@torch.no_grad()
def evaluate_sums(
    model: ELCRec,
    sequences: Sequence[np.ndarray],
    *,
    split: Split,
    ks: Sequence[int] = (5, 10, 20),
    batch_size: int = 1024,
    progress: bool = False,
) -> tuple[dict[str, float], int]:
    """Full-rank metric sums and user count over ``sequences`` for ``split`` (eval mode)."""
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
            sums = evaluate_batch(model, eval_batch(chunk, split, model.config.max_len), ks)
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value
    finally:
        model.train(was_training)
    return totals, len(sequences)


def evaluate(model: ELCRec, sequences: Sequence[np.ndarray], **kwargs: object) -> dict[str, float]:
    """Mean full-rank metrics (see ``evaluate_sums`` for the arguments)."""
    sums, count = evaluate_sums(model, sequences, **kwargs)  # type: ignore[arg-type]
    return finalize(sums, count)
