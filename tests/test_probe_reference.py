"""``bench/probe_reference.py``: the mask-token probe's pieces, checked by hand."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import probe_reference as pr
from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec

REPO = Path(__file__).resolve().parents[1]


def test_masked_sets_exactly_floor_ratio_n_positions_to_the_token() -> None:
    rng = random.Random(0)
    seq = list(range(1, 11))
    out = pr.masked(seq, 0.7, 99, rng)
    assert len(out) == 10 and out.count(99) == 7
    # the rest in place
    assert [x for x in out if x != 99] == [x for i, x in enumerate(seq) if out[i] != 99]
    assert pr.masked([5, 6], 0.7, 99, rng).count(99) == 1  # floor(1.4)


def test_unmasked_views_of_distinct_users_always_match_themselves() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    config = dataclasses.replace(
        config, augment=dataclasses.replace(config.augment, mask_ratio=0.0)
    )
    torch.manual_seed(0)
    model = ELCRec(config.model, num_items=50).eval()
    users = [[1 + (u * 7 + t) % 50 for t in range(6 + u % 5)] for u in range(40)]
    # views equal the input, so each row's own view has the largest dot product (its squared
    # norm) unless another row is the same vector: the users here are all distinct
    assert pr.mask_matching(model, users, token=0, config=config, seed=0) == 1.0


def test_the_reserved_row_comes_from_the_published_table_or_is_fresh(tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    torch.manual_seed(1)
    model = ELCRec(config.model, num_items=20)
    fresh = pr.with_reserved_row(model, str(tmp_path / "ours.pt"))
    assert fresh.item_embeddings.weight.shape[0] == 22
    assert torch.equal(fresh.item_embeddings.weight[:21], model.item_embeddings.weight)
    # a published table: our rows plus one known extra row (the only key this reads)
    extra = torch.full((1, config.model.hidden_size), 0.5)
    path = tmp_path / "published.pt"
    torch.save(
        {"item_embeddings.weight": torch.cat([model.item_embeddings.weight.detach(), extra])}, path
    )
    wide = pr.with_reserved_row(model, f"reference:{path}")
    assert torch.equal(wide.item_embeddings.weight[21], extra[0])
    assert torch.equal(wide.item_embeddings.weight[:21], model.item_embeddings.weight)


def test_position_bands_cover_every_position_once() -> None:
    for window in (1, 2, 5, 6, 10, 50):
        covered = [p for a, b in pr.position_bands(window) for p in range(a, b + 1)]
        assert covered == list(range(window)), window
    assert pr.position_bands(50) == [
        (0, 24),
        (25, 44),
        (45, 45),
        (46, 46),
        (47, 47),
        (48, 48),
        (49, 49),
    ]


def test_position_norms_are_band_means_of_row_norms() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    model = ELCRec(config.model, num_items=10)
    window = config.model.max_len
    with torch.no_grad():
        model.position_embeddings.weight.zero_()
        # norm of row p is p
        model.position_embeddings.weight[:, 0] = torch.arange(window, dtype=torch.float32)
    norms = pr.position_norms(model)
    for a, b in pr.position_bands(window):
        assert abs(norms[f"position_norm/{a}-{b}"] - (a + b) / 2) < 1e-6


def _naive_rank(scores: torch.Tensor, answer: int, history: set[int]) -> int:
    """Pessimistic 0-based rank among items 1..N, history items other than the answer left out."""
    return sum(
        1
        for item in range(1, len(scores))
        if item != answer and item not in history and scores[item] >= scores[answer]
    )


def test_prefix_pairs_match_a_naive_loop_and_agree_at_the_newest_position() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    torch.manual_seed(3)
    model = ELCRec(config.model, num_items=30).eval()
    window = config.model.max_len
    rng = random.Random(5)
    # lengths on both sides of the window: the longest input reaches past it
    sequences = [np.array([rng.randint(1, 30) for _ in range(n)]) for n in (4, 5, 9, window + 6)]
    rows = pr.prefix_pairs_ranks(model, sequences)
    expected = []
    with torch.no_grad():
        for seq in sequences:
            inputs = seq[:-3]
            n = len(inputs)
            padded = torch.zeros(1, window, dtype=torch.int64)
            tail = inputs[-window:]
            padded[0, window - len(tail):] = torch.from_numpy(tail)
            hidden = model(padded)[0]
            for m in range(n):
                d = n - 1 - m
                if d >= window:
                    continue
                prefix = seq[: m + 1][-window:]
                alone_in = torch.zeros(1, window, dtype=torch.int64)
                alone_in[0, window - len(prefix):] = torch.from_numpy(prefix)
                history = set(int(x) for x in seq[: m + 1])
                answer = int(seq[m + 1])
                inside = _naive_rank(
                    hidden[window - 1 - d] @ model.item_embeddings.weight.T, answer, history
                )
                alone = _naive_rank(
                    model(alone_in)[0, -1] @ model.item_embeddings.weight.T, answer, history
                )
                expected.append((d, inside, alone))
    assert rows == expected
    assert len(rows) == sum(min(len(s) - 3, window) for s in sequences)
    # d = 0 with the input inside the window: the two forms are the same input, the same rank
    assert all(inside == alone for d, inside, alone in rows if d == 0)


def test_prefix_alignment_reports_the_ratio_of_the_two_forms() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    torch.manual_seed(4)
    model = ELCRec(config.model, num_items=12).eval()
    rng = random.Random(6)
    sequences = [
        np.array([rng.randint(1, 12) for _ in range(rng.randint(4, 9))]) for _ in range(30)
    ]
    report = pr.prefix_alignment(model, sequences)
    rows = pr.prefix_pairs_ranks(model, sequences)
    later = [(a, b) for d, a, b in rows if d >= 1]
    assert report["prefix/d>=1/pairs"] == len(later)
    hr_inside = sum(a < 20 for a, _ in later) / len(later)
    assert abs(report["prefix/d>=1/HR@20_in_sequence"] - hr_inside) < 1e-12
    assert report["prefix/d=0/NDCG@20_ratio"] == 1.0


def test_gradient_norms_follow_where_each_term_reaches() -> None:
    config = load_config(REPO / "configs" / "demo.yaml", ["train.batch_size=16"])
    window = config.model.max_len
    torch.manual_seed(7)
    model = ELCRec(config.model, num_items=40)
    rng = random.Random(8)
    # sequences of 4-8 items: training inputs of at most 5, so positions before window - 5 are
    # padding in every input, where the next-item loss has no target and attention no key
    sequences = [
        np.array([rng.randint(1, 40) for _ in range(rng.randint(4, 8))]) for _ in range(48)
    ]
    grads = pr.gradient_norms(model, sequences, config=config, batches=3, seed=0)
    oldest = [f"position_{a}-{b}" for a, b in pr.position_bands(window) if b < window - 5]
    assert oldest, "the demo window must be longer than 10 for this test"
    for part in oldest:
        assert grads[f"grad/next_item/{part}"] == 0.0
        assert grads[f"grad/seq_cl/{part}"] > 0.0  # the flattened views include padded positions
    assert grads[f"grad/next_item/position_{window - 1}-{window - 1}"] > 0.0
    assert grads["grad/next_item/items"] > 0.0
    # weights scale their term's gradient and nothing else; the model's own .grad stays unset
    doubled = dataclasses.replace(
        config, loss=dataclasses.replace(config.loss, seq_cl_weight=2 * config.loss.seq_cl_weight)
    )
    again = pr.gradient_norms(model, sequences, config=doubled, batches=3, seed=0)
    for key, value in grads.items():
        expected = 2 * value if key.startswith("grad/seq_cl/") else value
        assert again[key] == pytest.approx(expected, rel=1e-5, abs=1e-12), key
    assert all(p.grad is None for p in model.parameters())
