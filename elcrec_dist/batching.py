"""Training batches: inputs, targets, sampled negatives and the two augmented views.

Everything random is drawn from an explicit ``torch.Generator`` so that a batch is a pure
function of (users, generator state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from elcrec_dist.augment import two_views
from elcrec_dist.config import AugmentConfig
from elcrec_dist.data import left_pad, train_pairs

MAX_RESAMPLE_ROUNDS = 100


@dataclass(frozen=True)
class TrainBatch:
    """One training batch of B users.

    inputs:    [B, T] int64, left-padded newest items of ``seq[:-3]``;
    targets:   [B, T] int64, the next item at every position (0 where the input is padding);
    negatives: [B, T] int64, one item per position the user never interacted with;
    views:     [2B, T] int64, two augmented views of every input (rows 0..B-1 view 1, B..2B-1
               view 2), from ``elcrec_dist.augment.two_views``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    negatives: torch.Tensor
    views: torch.Tensor


def padded_right(sequences: Sequence[np.ndarray], *, fill: int) -> torch.Tensor:
    """Sequences right-padded with ``fill`` into [B, L] int64 (L = longest)."""
    width = max(len(s) for s in sequences)
    out = np.full((len(sequences), width), fill, dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return torch.from_numpy(out)


def sample_negatives(
    targets: torch.Tensor,
    sequences: Sequence[np.ndarray],
    num_items: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One negative per non-padded target position, uniform over items the user never had.

    targets: [B, T] (0 = padding); returns [B, T] with 0 at padded positions.
    """
    # Each user's items sorted (padding num_items + 1 sorts last and matches no draw): a draw
    # is looked up by binary search, not compared with all L items of its row.
    seen = padded_right(sequences, fill=num_items + 1).sort(dim=1).values  # [B, L]
    last = seen.shape[1] - 1
    negatives = torch.randint(1, num_items + 1, targets.shape, generator=generator)
    todo = targets > 0
    for _ in range(MAX_RESAMPLE_ROUNDS):
        found = seen.gather(1, torch.searchsorted(seen, negatives).clamp_(max=last)) == negatives
        clash = found & todo  # [B, T]
        if not clash.any():
            break
        fresh = torch.randint(1, num_items + 1, targets.shape, generator=generator)
        negatives = torch.where(clash, fresh, negatives)
    else:  # pragma: no cover - needs a user who has seen almost every item
        raise RuntimeError(
            "could not sample negatives: a user has interacted with nearly every item"
        )
    return torch.where(todo, negatives, torch.zeros_like(negatives))


def make_train_batch(
    sequences: Sequence[np.ndarray],
    *,
    num_items: int,
    max_len: int,
    augment: AugmentConfig,
    generator: torch.Generator,
    with_views: bool = True,
) -> TrainBatch:
    """Build one batch from full user sequences (each of length >= 4)."""
    pairs = [train_pairs(seq) for seq in sequences]
    full_inputs = [inp for inp, _ in pairs]
    inputs = left_pad(full_inputs, max_len)  # [B, T]
    targets = left_pad([tgt for _, tgt in pairs], max_len)  # [B, T]
    negatives = sample_negatives(targets, sequences, num_items, generator)
    if with_views:
        lengths = torch.tensor([len(x) for x in full_inputs], dtype=torch.int64)
        untruncated = left_pad(full_inputs, int(lengths.max()))  # [B, L]
        views = two_views(untruncated, lengths, augment, max_len=max_len, generator=generator)
    else:
        views = torch.zeros((0, max_len), dtype=torch.int64)
    return TrainBatch(inputs=inputs, targets=targets, negatives=negatives, views=views)
