"""The batched augmentations against the spec ("Losses", item 3) and the naive reference.

Random streams of ``two_views`` and the naive functions differ, so they are compared through
properties every output must have and through the distributions of many draws.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import pytest
import torch

from elcrec_dist.augment import naive_crop, naive_mask, naive_reorder, two_views
from elcrec_dist.config import AugmentConfig

CROP = AugmentConfig(methods=("crop",))
MASK = AugmentConfig(methods=("mask",))
REORDER = AugmentConfig(methods=("reorder",))


def left_padded(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    rows = [[0] * (width - len(s)) + s for s in sequences]
    return torch.tensor(rows, dtype=torch.int64), torch.tensor([len(s) for s in sequences])


def real_items(row: torch.Tensor) -> list[int]:
    """Strip left padding; raise if a zero appears after the first real item (crop/reorder)."""
    values = row.tolist()
    first = next((i for i, v in enumerate(values) if v != 0), len(values))
    body = values[first:]
    assert 0 not in body, f"padding inside a crop/reorder output: {values}"
    return body


def tail(seq: list[int], max_len: int) -> list[int]:
    """What the trainer's left-pad/truncate does to a plain sequence."""
    kept = seq[-max_len:]
    return [0] * (max_len - len(kept)) + kept


def random_sequences(
    count: int, rng: random.Random, low: int = 1, high: int = 23
) -> list[list[int]]:
    # Distinct positive items per sequence, so positions can be traced in the output.
    return [rng.sample(range(1, 200), rng.randint(low, high)) for _ in range(count)]


# --- properties, each checked on both the naive reference and the batched path --------------


def check_crop(seq: list[int], out: list[int], ratio: float) -> int:
    """A contiguous window of length max(1, floor(ratio·n)); returns its start."""
    width = max(1, math.floor(ratio * len(seq)))
    assert len(out) == width
    start = seq.index(out[0])
    assert seq[start : start + width] == out
    return start


def check_mask(seq: list[int], out: list[int], ratio: float) -> frozenset[int]:
    """Same length; exactly floor(ratio·n) positions zeroed, the rest unchanged."""
    assert len(out) == len(seq)
    zeroed = frozenset(i for i, (s, o) in enumerate(zip(seq, out, strict=True)) if o != s)
    assert all(out[i] == 0 for i in zeroed)
    assert len(zeroed) == math.floor(ratio * len(seq))
    return zeroed


def check_reorder(seq: list[int], out: list[int], ratio: float) -> tuple[int, ...]:
    """Same multiset; changed positions fit in one window of floor(ratio·n). Returns out."""
    width = math.floor(ratio * len(seq))
    assert len(out) == len(seq) and sorted(out) == sorted(seq)
    changed = [i for i, (s, o) in enumerate(zip(seq, out, strict=True)) if o != s]
    if changed:
        assert changed[-1] - changed[0] < width
    return tuple(out)


def test_naive_reference_properties() -> None:
    rng = random.Random(0)
    config = AugmentConfig()
    for seq in random_sequences(300, rng):
        check_crop(seq, naive_crop(seq, config.crop_ratio, rng), config.crop_ratio)
        check_mask(seq, naive_mask(seq, config.mask_ratio, rng), config.mask_ratio)
        check_reorder(seq, naive_reorder(seq, config.reorder_ratio, rng), config.reorder_ratio)


@pytest.mark.parametrize(
    ("config", "check", "ratio"),
    [
        (CROP, check_crop, CROP.crop_ratio),
        (MASK, check_mask, MASK.mask_ratio),
        (REORDER, check_reorder, REORDER.reorder_ratio),
        (AugmentConfig(crop_ratio=0.5, methods=("crop",)), check_crop, 0.5),
        (AugmentConfig(reorder_ratio=1.0, methods=("reorder",)), check_reorder, 1.0),
        (AugmentConfig(mask_ratio=0.3, methods=("mask",)), check_mask, 0.3),
    ],
)
def test_batched_properties_on_mixed_lengths(
    config: AugmentConfig, check: Callable[[list[int], list[int], float], object], ratio: float
) -> None:
    rng = random.Random(1)
    sequences = random_sequences(400, rng)
    inputs, lengths = left_padded(sequences)
    max_len = inputs.shape[1]  # nothing is truncated here
    views = two_views(
        inputs, lengths, config, max_len=max_len, generator=torch.Generator().manual_seed(0)
    )
    assert views.shape == (2 * len(sequences), max_len) and views.dtype == torch.int64
    for row, seq in enumerate(sequences * 2):
        out = views[row]
        if check is check_mask:
            # Positions are kept: the output is the masked sequence, left-padded in place.
            assert out[: max_len - len(seq)].eq(0).all()
            check(seq, out[max_len - len(seq) :].tolist(), ratio)
        else:
            check(seq, real_items(out), ratio)


def crop_start_counts(
    seq: list[int], config: AugmentConfig, *, draws: int, seed: int
) -> tuple[Counter[int], Counter[int]]:
    """How often each crop start occurs in ``draws`` crops of ``seq``: (batched path, naive
    reference)."""
    inputs, lengths = left_padded([seq] * (draws // 2))
    views = two_views(
        inputs, lengths, config, max_len=len(seq), generator=torch.Generator().manual_seed(seed)
    )
    batched = Counter(check_crop(seq, real_items(v), config.crop_ratio) for v in views)
    rng = random.Random(seed)
    reference = config.window_starts == "reference"
    naive = Counter(
        check_crop(
            seq,
            naive_crop(seq, config.crop_ratio, rng, reference_starts=reference),
            config.crop_ratio,
        )
        for _ in range(draws)
    )
    return batched, naive


def test_every_crop_start_occurs_uniformly_like_the_reference() -> None:
    seq = list(range(1, 11))  # n = 10, width 2, starts 0..8
    draws = 9_000
    batched, naive = crop_start_counts(seq, CROP, draws=draws, seed=3)
    expected = draws / 9
    for counts in (batched, naive):
        assert sorted(counts) == list(range(9))  # the newest window (start 8) included
        # 5 binomial standard deviations (sd = sqrt(9000 * 1/9 * 8/9) ≈ 29.8)
        assert all(abs(c - expected) < 150 for c in counts.values()), counts


def test_mask_positions_uniform() -> None:
    seq = list(range(1, 11))  # 7 of 10 positions zeroed; each position with probability 0.7
    draws = 4_000
    inputs, lengths = left_padded([seq] * (draws // 2))
    views = two_views(inputs, lengths, MASK, max_len=10, generator=torch.Generator().manual_seed(4))
    zeroed = views.eq(0)
    assert zeroed.sum(1).eq(7).all()
    frequency = zeroed.double().mean(0)
    # sd of each frequency ≈ sqrt(0.21 / 4000) ≈ 0.0072
    assert torch.allclose(frequency, torch.full_like(frequency, 0.7), atol=0.04), frequency
    # All C(10, 7) = 120 subsets should appear: uniform subsets, not a fixed pattern per draw.
    assert len({tuple(r) for r in zeroed.tolist()}) == 120


def test_reorder_is_a_uniform_permutation_of_the_window() -> None:
    seq = [5, 6, 7]
    config = AugmentConfig(reorder_ratio=1.0, methods=("reorder",))  # window = whole sequence
    draws = 6_000
    inputs, lengths = left_padded([seq] * (draws // 2))
    views = two_views(
        inputs, lengths, config, max_len=3, generator=torch.Generator().manual_seed(5)
    )
    batched = Counter(tuple(v) for v in views.tolist())
    rng = random.Random(5)
    naive = Counter(tuple(naive_reorder(seq, 1.0, rng)) for _ in range(draws))
    for counts in (batched, naive):
        assert len(counts) == 6
        # sd = sqrt(6000 * 1/6 * 5/6) ≈ 28.9
        assert all(abs(c - draws / 6) < 145 for c in counts.values()), counts


def test_reorder_window_reaches_both_ends() -> None:
    seq = list(range(1, 11))  # width 2: a swap of one of 9 adjacent pairs
    draws = 2_000
    inputs, lengths = left_padded([seq] * (draws // 2))
    views = two_views(
        inputs, lengths, REORDER, max_len=10, generator=torch.Generator().manual_seed(6)
    )
    changed = views.ne(inputs.repeat(2, 1))
    swaps = Counter(tuple(row.nonzero().flatten().tolist()) for row in changed)
    # A swap happens with probability 1/2; its pair is uniform over the 9 adjacent pairs.
    assert set(swaps) == {()} | {(i, i + 1) for i in range(9)}
    assert abs(swaps[()] - draws / 2) < 5 * math.sqrt(draws / 4)


def test_method_choice_is_uniform_and_independent_per_view() -> None:
    seq = list(range(1, 11))  # crop leaves 2 items, mask 3, reorder 10: the count names the method
    users = 9_000
    inputs, lengths = left_padded([seq] * users)
    views = two_views(
        inputs, lengths, AugmentConfig(), max_len=10, generator=torch.Generator().manual_seed(7)
    )
    method = {2: "crop", 3: "mask", 10: "reorder"}
    names = [method[n] for n in views.ne(0).sum(1).tolist()]
    # (view 1, view 2) of the same user
    pairs = Counter(zip(names[:users], names[users:], strict=True))
    assert len(pairs) == 9
    # Each pair has probability 1/9: sd ≈ sqrt(9000 * 1/9 * 8/9) ≈ 29.8
    assert all(abs(c - users / 9) < 150 for c in pairs.values()), pairs


def test_single_method_config_uses_only_that_method() -> None:
    inputs, lengths = left_padded([list(range(1, 11))] * 200)
    for config, nonzero in ((CROP, 2), (MASK, 3), (REORDER, 10)):
        views = two_views(
            inputs, lengths, config, max_len=10, generator=torch.Generator().manual_seed(8)
        )
        assert views.ne(0).sum(1).eq(nonzero).all()


def test_long_inputs_are_augmented_before_truncation() -> None:
    seq = list(range(1, 21))  # n = 20 > max_len = 6
    max_len = 6
    inputs, lengths = left_padded([seq] * 300)
    generator = torch.Generator().manual_seed(9)

    # crop 0.5: a window of 10 of all 20 items, then its newest 6. Cropping the truncated input
    # would give 3 items, always from the newest 6.
    crop = two_views(
        inputs,
        lengths,
        AugmentConfig(crop_ratio=0.5, methods=("crop",)),
        max_len=max_len,
        generator=generator,
    )
    assert crop.ne(0).all()
    starts = set()
    for row in crop.tolist():
        assert row == list(range(row[0], row[0] + max_len))
        starts.add(row[0])
    assert starts == set(range(5, 16))  # window starts 0..10 -> newest 6 begin at 5..15

    # mask 0.5: 10 of 20 positions zeroed, so the newest 6 hold a hypergeometric number of
    # zeros; masking the truncated input would always give exactly 3.
    mask = two_views(
        inputs,
        lengths,
        AugmentConfig(mask_ratio=0.5, methods=("mask",)),
        max_len=max_len,
        generator=generator,
    )
    zeros = Counter(mask.eq(0).sum(1).tolist())
    assert len(zeros) >= 4
    for row in mask.tolist():
        assert all(v in (0, seq[14 + i]) for i, v in enumerate(row))

    # reorder 0.5: a window of 10 anywhere in 20; when it straddles the cut, older items move
    # into the newest 6.
    reorder = two_views(
        inputs,
        lengths,
        AugmentConfig(reorder_ratio=0.5, methods=("reorder",)),
        max_len=max_len,
        generator=generator,
    )
    assert reorder.ne(0).all()
    assert any(min(row) < 15 for row in reorder.tolist())
    for row in reorder.tolist():
        # Every moved item, and the place it moved to, lies in one window of 10 of the 20.
        moved = [p for p in range(14, 20) if row[p - 14] != seq[p]]
        touched = moved + [row[p - 14] - 1 for p in moved]
        assert not touched or max(touched) - min(touched) < 10


def test_short_inputs_are_left_padded_to_max_len() -> None:
    inputs, lengths = left_padded([[4, 5, 6], [7]])
    views = two_views(
        inputs, lengths, REORDER, max_len=5, generator=torch.Generator().manual_seed(0)
    )
    # reorder width floor(0.2·3) = 0: the views equal the padded inputs
    assert views.tolist() == [tail([4, 5, 6], 5), tail([7], 5)] * 2
    views = two_views(inputs, lengths, CROP, max_len=5, generator=torch.Generator().manual_seed(0))
    assert views[:, :4].eq(0).all() and views[:, 4].ne(0).all()  # crop keeps 1 item


def test_deterministic_for_a_seed() -> None:
    inputs, lengths = left_padded(random_sequences(50, random.Random(2)))
    config = AugmentConfig()

    def run(seed: int) -> torch.Tensor:
        return two_views(
            inputs, lengths, config, max_len=8, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))


def test_bad_lengths_are_rejected() -> None:
    inputs, _ = left_padded([[1, 2, 3]])
    with pytest.raises(ValueError, match="lengths"):
        two_views(
            inputs, torch.tensor([4]), AugmentConfig(), max_len=4, generator=torch.Generator()
        )
    with pytest.raises(ValueError, match="lengths"):
        two_views(
            inputs, torch.tensor([0]), AugmentConfig(), max_len=4, generator=torch.Generator()
        )


REFERENCE_CROP = AugmentConfig(methods=("crop",), window_starts="reference")
REFERENCE_REORDER = AugmentConfig(methods=("reorder",), window_starts="reference")


def test_reference_crop_starts_never_reach_the_newest_window() -> None:
    seq = list(range(1, 11))  # n = 10, width 2: the reference draws starts 0..7, never 8
    draws = 8_000
    batched, naive = crop_start_counts(seq, REFERENCE_CROP, draws=draws, seed=11)
    for counts in (batched, naive):
        assert sorted(counts) == list(range(8))
        # sd = sqrt(8000 * 1/8 * 7/8) ≈ 29.6
        assert all(abs(c - draws / 8) < 150 for c in counts.values()), counts


def test_reference_one_item_crops_come_from_any_position() -> None:
    seq = [4, 5, 6, 7]  # floor(0.2 * 4) = 0: the reference keeps one item from any of the 4 starts
    draws = 4_000
    batched, naive = crop_start_counts(seq, REFERENCE_CROP, draws=draws, seed=12)
    for counts in (batched, naive):
        assert sorted(counts) == [0, 1, 2, 3]
        assert all(abs(c - draws / 4) < 5 * math.sqrt(draws * 3 / 16) for c in counts.values()), (
            counts
        )


def test_reference_reorder_never_swaps_the_newest_pair() -> None:
    seq = list(range(1, 11))  # width 2: the reference swaps one of the pairs (0,1) .. (7,8)
    draws = 2_000
    inputs, lengths = left_padded([seq] * (draws // 2))
    views = two_views(
        inputs, lengths, REFERENCE_REORDER, max_len=10, generator=torch.Generator().manual_seed(13)
    )
    changed = views.ne(inputs.repeat(2, 1))
    swaps = Counter(tuple(row.nonzero().flatten().tolist()) for row in changed)
    assert set(swaps) == {()} | {(i, i + 1) for i in range(8)}
    rng = random.Random(13)
    naive = {
        tuple(
            i
            for i, (a, b) in enumerate(
                zip(seq, naive_reorder(seq, 0.2, rng, reference_starts=True), strict=True)
            )
            if a != b
        )
        for _ in range(draws)
    }
    assert naive == {()} | {(i, i + 1) for i in range(8)}


def test_reference_windows_as_long_as_the_input_still_have_their_one_start() -> None:
    seq = [3, 1, 2]
    config = AugmentConfig(crop_ratio=1.0, methods=("crop",), window_starts="reference")
    inputs, lengths = left_padded([seq] * 50)
    views = two_views(
        inputs, lengths, config, max_len=3, generator=torch.Generator().manual_seed(14)
    )
    assert views.tolist() == [seq] * 100
    assert naive_crop(seq, 1.0, random.Random(0), reference_starts=True) == seq


def test_window_starts_all_is_the_default() -> None:
    # the default is "all" (every start), and "reference" draws differently from the same stream
    rng = random.Random(15)
    inputs, lengths = left_padded(random_sequences(64, rng))
    one = two_views(
        inputs, lengths, AugmentConfig(), max_len=12, generator=torch.Generator().manual_seed(15)
    )
    two = two_views(
        inputs,
        lengths,
        AugmentConfig(window_starts="all"),
        max_len=12,
        generator=torch.Generator().manual_seed(15),
    )
    other = two_views(
        inputs,
        lengths,
        AugmentConfig(window_starts="reference"),
        max_len=12,
        generator=torch.Generator().manual_seed(15),
    )
    assert torch.equal(one, two) and not torch.equal(one, other)
