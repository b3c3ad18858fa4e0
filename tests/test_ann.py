"""FAISS retrieval (elcrec_dist.ann): the exact index gives evaluation's top-K, recall by hand."""

from __future__ import annotations

import numpy as np
import torch

from elcrec_dist.ann import build_index, recall_at_k, search
from elcrec_dist.evaluation import top_k_items


def test_recall_by_hand() -> None:
    approx = np.array([[1, 2, 3], [4, 5, 0]])
    exact = np.array([[1, 2, 9], [4, 6, 7]])
    assert recall_at_k(approx, exact) == (2 / 3 + 1 / 3) / 2


def test_exact_index_equals_the_tiled_top_k_and_hnsw_recalls_most() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(2001, 16, generator=gen)  # row 0 padding
    users = torch.randn(64, 16, generator=gen)
    history = torch.randint(0, 2001, (64, 30), generator=gen)
    exact = top_k_items(users, table, history, k=10, tile_items=500).items.numpy()
    flat = build_index(table[1:].numpy(), kind="flat")
    assert np.array_equal(search(flat, users.numpy(), history.numpy(), k=10), exact)
    hnsw = build_index(table[1:].numpy(), kind="hnsw")
    got = search(hnsw, users.numpy(), history.numpy(), k=10)
    for row, banned in zip(got, history.numpy(), strict=True):
        assert not set(row.tolist()) & set(banned.tolist())  # a user's history never comes back
    assert recall_at_k(got, exact) >= 0.9
