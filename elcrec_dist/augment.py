"""The two augmented views of each training input (spec: "Losses", item 3).

Each view of each user independently applies one method, chosen uniformly from
``AugmentConfig.methods``, to the *untruncated* training input of ``n`` items; the result is then
left-padded with 0 / truncated to the newest ``max_len`` items, exactly like a plain input:

- crop:    keep a random contiguous window of ``max(1, floor(crop_ratio * n))`` items, the start
           uniform over all ``n - w + 1`` valid starts;
- mask:    set exactly ``floor(mask_ratio * n)`` distinct positions, chosen uniformly, to 0 (the
           padding id); the length is unchanged;
- reorder: shuffle (uniform permutation) a random contiguous window of
           ``floor(reorder_ratio * n)`` items; everything outside the window is unchanged.

Where windows start (``augment.window_starts``): the reference run draws a crop or reorder start
from ``0 .. n - w - 1`` whenever ``w = floor(ratio * n) >= 1``, so the newest window is never
chosen (a crop of ``floor(ratio * n) = 0`` keeps one item from any start); ``"reference"``
reproduces that draw, except that a window as long as the input (ratio 1.0, where the reference
fails) has its one start. The default ``"all"`` draws every valid start, newest window included.
``floor`` is taken in float64, like Python's ``int(ratio * n)`` in the reference.

``two_views`` is the batched path the trainer uses (torch ops over the whole batch, randomness
from one ``torch.Generator``). ``naive_crop`` / ``naive_mask`` / ``naive_reorder`` are the readable
per-sequence reference the tests hold it against.

Shapes: B users, L = longest untruncated input in the batch, max_len = model window.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from elcrec_dist.config import AugmentConfig

# --------------------------------------------------------------------------------------------
# Readable per-sequence reference
# --------------------------------------------------------------------------------------------


def _naive_last_start(n: int, width: int, reference: bool) -> int:
    """Largest start drawn for a window of ``width`` (>= 1 in the reference rule) of n items."""
    return max(0, n - width - 1) if reference else n - width


def naive_crop(
    seq: list[int], ratio: float, rng: random.Random, *, reference_starts: bool = False
) -> list[int]:
    """A random contiguous window of ``max(1, floor(ratio * n))`` items of ``seq``."""
    n = len(seq)
    raw = math.floor(ratio * n)
    width = max(1, raw)
    start = rng.randint(0, _naive_last_start(n, width, reference_starts and raw >= 1))  # inclusive
    return seq[start : start + width]


def naive_mask(seq: list[int], ratio: float, rng: random.Random) -> list[int]:
    """``seq`` with exactly ``floor(ratio * n)`` distinct positions set to 0."""
    out = list(seq)
    for position in rng.sample(range(len(seq)), k=math.floor(ratio * len(seq))):
        out[position] = 0
    return out


def naive_reorder(
    seq: list[int], ratio: float, rng: random.Random, *, reference_starts: bool = False
) -> list[int]:
    """``seq`` with a random contiguous window of ``floor(ratio * n)`` items shuffled."""
    n = len(seq)
    width = math.floor(ratio * n)
    start = rng.randint(0, _naive_last_start(n, width, reference_starts and width >= 1))
    window = seq[start : start + width]
    rng.shuffle(window)
    return seq[:start] + window + seq[start + width :]


# --------------------------------------------------------------------------------------------
# Batched path
# --------------------------------------------------------------------------------------------
# Every method works on a [R, L] block of rows, left-padded like the input: row r holds its
# n_r real items in columns L - n_r .. L - 1. Methods return a block of the same width, still
# left-padded; ``_fit`` cuts or pads the result to max_len afterwards.


def _floor_count(ratio: float, lengths: torch.Tensor) -> torch.Tensor:
    """``floor(ratio * n)`` per row in float64, matching ``math.floor(ratio * n)``. -> [R] int64."""
    return torch.floor(lengths.to(torch.float64) * ratio).to(torch.int64)


def _uniform_start(
    lengths: torch.Tensor,
    widths: torch.Tensor,
    generator: torch.Generator,
    *,
    newest: torch.Tensor | bool = True,
) -> torch.Tensor:
    """Start uniform over ``0 .. n - w`` per row, or ``0 .. n - w - 1`` where ``newest`` is False
    (at least the one start 0). -> [R] int64."""
    choices = lengths - widths + 1  # >= 1
    if newest is not True:
        choices = torch.where(
            torch.as_tensor(newest, device=choices.device), choices, (choices - 1).clamp(min=1)
        )
    u = torch.rand(lengths.shape, dtype=torch.float64, generator=generator, device=lengths.device)
    # The clamp guards the (measure-zero) rounding of u * choices up to choices.
    return torch.minimum((u * choices).to(torch.int64), choices - 1)


def _crop(
    rows: torch.Tensor, lengths: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    raw = _floor_count(config.crop_ratio, lengths)  # [R]
    width = raw.clamp(min=1)
    # reference: only 1-item crops reach it
    newest = True if config.window_starts == "all" else raw < 1
    start = _uniform_start(lengths, width, generator, newest=newest)  # [R]
    total = rows.shape[1]
    columns = torch.arange(total, device=rows.device)[None, :]  # [1, L]
    # Output column c holds window item (w - 1) - (L - 1 - c); its column in the input is
    # (L - n) + start + that index = c - n + start + w.
    source = columns - lengths[:, None] + start[:, None] + width[:, None]  # [R, L]
    keep = columns >= total - width[:, None]
    picked = rows.gather(1, source.clamp(0, total - 1))
    return torch.where(keep, picked, torch.zeros_like(picked))


def _mask(
    rows: torch.Tensor, lengths: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    count = _floor_count(config.mask_ratio, lengths)  # [R]
    total = rows.shape[1]
    columns = torch.arange(total, device=rows.device)[None, :]
    real = columns >= total - lengths[:, None]  # [R, L]
    # The `count` real positions with the smallest i.i.d. uniform keys form a uniform subset.
    keys = torch.rand(rows.shape, dtype=torch.float64, generator=generator, device=rows.device)
    keys = torch.where(real, keys, torch.full_like(keys, 2.0))  # padding sorts last
    order = keys.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, columns.expand_as(order))
    return torch.where(rank < count[:, None], torch.zeros_like(rows), rows)


def _reorder(
    rows: torch.Tensor, lengths: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    width = _floor_count(config.reorder_ratio, lengths)  # [R], may be 0 (then a no-op)
    newest = True if config.window_starts == "all" else width < 1
    start = _uniform_start(lengths, width, generator, newest=newest)
    total = rows.shape[1]
    columns = torch.arange(total, device=rows.device)[None, :]
    first = total - lengths[:, None] + start[:, None]  # first window column, [R, 1]
    inside = (columns >= first) & (columns < first + width[:, None])
    # Sort keys: a column outside the window keeps its own index; a column inside gets
    # first + u, u ~ U[0, 1). Outside keys are <= first - 1 or >= first + w >= first + 1, so the
    # sort leaves them in place and puts the window's items back in the window in a uniformly
    # random order (ties among the u have probability ~0).
    u = torch.rand(rows.shape, dtype=torch.float64, generator=generator, device=rows.device)
    keys = torch.where(inside, first.to(torch.float64) + u, columns.to(torch.float64))
    return rows.gather(1, keys.argsort(dim=1))


_METHODS: dict[
    str,
    Callable[[torch.Tensor, torch.Tensor, AugmentConfig, torch.Generator], torch.Tensor],
] = {"crop": _crop, "mask": _mask, "reorder": _reorder}


def _fit(rows: torch.Tensor, max_len: int) -> torch.Tensor:
    """Newest ``max_len`` columns of left-padded rows, left-padding with 0 if narrower."""
    total = rows.shape[1]
    if total >= max_len:
        return rows[:, total - max_len :]
    return torch.nn.functional.pad(rows, (max_len - total, 0), value=0)


def two_views(
    inputs: torch.Tensor,
    lengths: torch.Tensor,
    config: AugmentConfig,
    *,
    max_len: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Two independently augmented views of every training input.

    inputs: [B, L] int64, each row a full training input LEFT-padded with 0 (L = longest in the
    batch, rows are untruncated); lengths: [B] number of real items per row (>= 1).
    Returns [2B, max_len] int64 left-padded views: rows 0..B-1 are view 1, rows B..2B-1 view 2.
    """
    if inputs.dim() != 2:
        raise ValueError(f"inputs must be [B, L], got shape {tuple(inputs.shape)}")
    if lengths.shape != inputs.shape[:1]:
        raise ValueError(
            f"lengths must be [B] = [{inputs.shape[0]}], got shape {tuple(lengths.shape)}"
        )
    if inputs.shape[0] and (lengths.min() < 1 or lengths.max() > inputs.shape[1]):
        raise ValueError(f"lengths must be in [1, {inputs.shape[1]}], got {lengths.tolist()}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")

    rows = inputs.to(torch.int64).repeat(2, 1)  # [2B, L]: view 1 then view 2
    row_lengths = lengths.to(torch.int64).repeat(2)  # [2B]
    # [2B]: one method per view and user, drawn independently
    choice = torch.randint(
        len(config.methods), row_lengths.shape, generator=generator, device=rows.device
    )
    out = torch.zeros_like(rows)
    for index, name in enumerate(config.methods):
        chosen = (choice == index).nonzero().squeeze(1)
        if chosen.numel():
            out[chosen] = _METHODS[name](rows[chosen], row_lengths[chosen], config, generator)
    return _fit(out, max_len)
