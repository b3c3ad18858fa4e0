"""``bench/probe_reference.py``: the mask-token probe's pieces, checked by hand."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch
from bench_scripts import load_bench_script

from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec

REPO = Path(__file__).resolve().parents[1]


pr = load_bench_script("probe_reference")


def test_masked_sets_exactly_floor_ratio_n_positions_to_the_token() -> None:
    rng = random.Random(0)
    seq = list(range(1, 11))
    out = pr.masked(seq, 0.7, 99, rng)
    assert len(out) == 10 and out.count(99) == 7
    assert [x for x in out if x != 99] == [x for i, x in enumerate(seq) if out[i] != 99]  # the rest in place
    assert pr.masked([5, 6], 0.7, 99, rng).count(99) == 1  # floor(1.4)


def test_unmasked_views_of_distinct_users_always_match_themselves() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    config = dataclasses.replace(config, augment=dataclasses.replace(config.augment, mask_ratio=0.0))
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
    torch.save({"item_embeddings.weight": torch.cat([model.item_embeddings.weight.detach(), extra])}, path)
    wide = pr.with_reserved_row(model, f"reference:{path}")
    assert torch.equal(wide.item_embeddings.weight[21], extra[0])
    assert torch.equal(wide.item_embeddings.weight[:21], model.item_embeddings.weight)
