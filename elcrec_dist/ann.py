"""Approximate top-K over the item table with FAISS (the optional ``ann`` extra).

The item table (rows 1..N of ``item_embeddings``, or ``items.parquet`` of an export) goes into
an inner-product index: ``flat`` (exact, the reference) or ``hnsw`` (a graph index, sublinear
in the catalogue). Index position p holds item id p + 1. Items to exclude (the history) are
removed after the search, so the index is asked for K plus the longest exclusion list; the
ranking rule is evaluation's where the index is exact (score descending, excluded items never).
``recall_at_k`` measures an approximate top-K against the exact one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INDEXES = ("flat", "hnsw")


def build_index(table: np.ndarray, *, kind: str = "hnsw", m: int = 32, ef_construction: int = 200,
                ef_search: int = 128) -> Any:
    """An inner-product index of item vectors [N, D] (float32), item id p + 1 at position p."""
    import faiss

    vectors = np.ascontiguousarray(table, dtype=np.float32)
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"index kind {kind!r} is not one of {INDEXES}")
    index.add(vectors)
    return index


def search(index: Any, users: np.ndarray, exclude: np.ndarray, *, k: int) -> np.ndarray:
    """Top-``k`` item ids [B, k] for user vectors [B, D], the ids in ``exclude`` [B, L] (0: none)
    dropped; 0 where fewer than k remain among what the index returned."""
    fetch = min(index.ntotal, k + int((exclude > 0).sum(axis=1).max(initial=0)))
    _, positions = index.search(np.ascontiguousarray(users, dtype=np.float32), fetch)
    found = np.where(positions >= 0, positions + 1, 0)  # [B, fetch] item ids
    out = np.zeros((len(users), k), dtype=np.int64)
    for row in range(len(users)):
        banned = set(exclude[row][exclude[row] > 0].tolist())
        kept = [i for i in found[row].tolist() if i and i not in banned][:k]
        out[row, : len(kept)] = kept
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over users of |approx ∩ exact| / |exact| (item 0 never counts)."""
    hits = [len(set(a[a > 0].tolist()) & set(e[e > 0].tolist())) / max(int((e > 0).sum()), 1)
            for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits))
