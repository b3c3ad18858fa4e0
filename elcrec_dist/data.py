"""Splits and batches derived from full user sequences (spec: "Data and splits").

Leave-one-out, computed at read time from the one stored sequence ``seq`` of each user:

- train: input ``seq[:-3]``, targets ``seq[1:-2]`` (every position is a training position);
- valid: input ``seq[:-2]``, answer ``seq[-2]``;
- test:  input ``seq[:-1]``, answer ``seq[-1]``.

Inputs are left-padded with 0 and truncated to the newest ``max_len`` items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Split = Literal["valid", "test"]
HELD_OUT = {"valid": 2, "test": 1}  # how many trailing items the split's input drops


def left_pad(sequences: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """Newest ``max_len`` items of each sequence, left-padded with 0: -> [B, max_len] int64."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        if len(tail):
            out[row, max_len - len(tail) :] = tail
    return torch.from_numpy(out)


def train_pairs(seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input, targets) of the training split: ``seq[:-3]``, ``seq[1:-2]``."""
    return seq[:-3], seq[1:-2]


def eval_pair(seq: np.ndarray, split: Split) -> tuple[np.ndarray, int]:
    """(input history, answer) of the valid or test split."""
    cut = HELD_OUT[split]
    return seq[:-cut], int(seq[-cut])


@dataclass(frozen=True)
class EvalBatch:
    """One batch of evaluation users.

    inputs: [B, T] left-padded newest items of the history; answers: [B];
    history: [B, L] every item of the (untruncated) history, right-padded with 0, for exclusion.
    """

    inputs: torch.Tensor
    answers: torch.Tensor
    history: torch.Tensor


def eval_batch(sequences: Sequence[np.ndarray], split: Split, max_len: int) -> EvalBatch:
    pairs = [eval_pair(seq, split) for seq in sequences]
    histories = [h for h, _ in pairs]
    width = max(len(h) for h in histories)
    history = np.zeros((len(histories), width), dtype=np.int64)
    for row, h in enumerate(histories):
        history[row, : len(h)] = h
    return EvalBatch(
        inputs=left_pad(histories, max_len),
        answers=torch.tensor([a for _, a in pairs], dtype=torch.int64),
        history=torch.from_numpy(history),
    )
