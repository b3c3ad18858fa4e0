"""Parts of the raw-log build checked against naive versions: the packed sort, the numpy hash
table, natural order, percentiles, buckets vs the benchmark's shards, CSV line numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_prep_reference import build, natural_key

from data_prep.build.idmap import KeyIndex
from data_prep.build.keys import (
    bucket_of,
    canonical_ints,
    merge_texts,
    natural_order,
    string_keys,
    texts_of,
    unique_keys,
)
from data_prep.build.reducer import dense_rank, sort_rows
from data_prep.build.stats import histogram, merge_histograms, summarize
from data_prep.writer import PrepError, shard_of


def _naive_sort(keys: dict[str, np.ndarray]) -> tuple[list[tuple[int, ...]], list[bool]]:
    rows = sorted(zip(*keys.values(), strict=True))
    return rows, [rows[k] == rows[k - 1] for k in range(1, len(rows))]


@pytest.mark.parametrize(
    "ranges",
    [
        {"s": 50, "t": 1_000, "r": 30},  # packs directly
        {"s": 50, "t": 10**15 * 7 + 3, "r": 30},  # packs after the dense rank of t
        {"s": 2**40, "t": 2**45, "r": 2**30, "e": 3},  # too wide: Polars sort
        {"s": 5, "t": 4, "r": 3, "e": 2},  # many exact repeats
    ],
)
def test_sort_rows_matches_a_naive_sort(ranges: dict[str, int]) -> None:
    rng = np.random.default_rng(len(ranges))
    n = 3000
    keys = {c: rng.integers(0, hi, n, dtype=np.int64) for c, hi in ranges.items()}
    if ranges["t"] < 10**6:
        keys["t"] = keys["t"] * 10**9  # whole seconds as ns: divided back to seconds
    ordered, same = sort_rows(keys)
    rows, naive_same = _naive_sort(keys)
    got = list(zip(*(ordered[c] for c in keys), strict=True))
    # times come back relative and possibly re-scaled or ranked: compare the order they imply
    t_index = list(keys).index("t")
    expected = [tuple(v for k, v in enumerate(row) if k != t_index) for row in rows]
    assert [tuple(v for k, v in enumerate(row) if k != t_index) for row in got] == expected
    assert same.tolist() == naive_same
    ts = [row[t_index] for row in got]
    for a, b, ra, rb in zip(ts, ts[1:], rows, rows[1:], strict=False):
        assert (a < b) == (ra[t_index] < rb[t_index]) and (a == b) == (ra[t_index] == rb[t_index])


def test_dense_rank() -> None:
    values = np.array([50, 7, 50, 3, 10**17, 7], dtype=np.int64)
    assert dense_rank(values).tolist() == [2, 1, 2, 0, 3, 1]


def test_key_index_finds_every_key_and_only_those() -> None:
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 5000):
        keys = np.unique(rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64))
        if n == 7:
            keys = np.arange(n, dtype=np.int64) * 1024  # sequential integer ids
        rng.shuffle(keys)
        index = KeyIndex(keys)
        queries = np.concatenate([keys, keys[::-1], np.array([12345, -1], dtype=np.int64)])
        expected = {int(k): p for p, k in enumerate(keys)}
        assert index(queries).tolist() == [expected.get(int(q), -1) for q in queries]


def test_natural_order_and_canonical_ints() -> None:
    ids = ["b", "10", "a", "9", "-3", "007", "B", "0", "+5", "-0", "99999999999999999999"]
    series = pl.Series(ids)
    assert [ids[k] for k in natural_order(series)] == sorted(ids, key=natural_key)
    assert canonical_ints(series).to_list() == [
        None,
        10,
        None,
        9,
        -3,
        None,
        None,
        0,
        None,
        None,
        None,
    ]


def test_string_keys_of_plain_integers_are_their_values() -> None:
    texts = pl.Series(["42", "042", "-7", "x42", "42"])
    keys = string_keys(texts, integers_by_value=True)
    assert keys[0] == 42 and keys[2] == -7 and keys[4] == 42
    assert keys[1] != 42 and keys[3] != 42
    # so the bucket of user "42" is the benchmark shard of user 42
    assert bucket_of(keys[:1], 6)[0] == shard_of(np.array([42]), 6)[0]


def test_id_texts_keep_one_row_per_pair_and_collisions_are_named() -> None:
    keys = np.array([1, 2, 1, 3, 2], dtype=np.int64)
    texts = pl.Series(["a", "b", "a", "c", "b"])
    first = texts_of(keys, texts, "item")
    assert sorted(first["text"].to_list()) == ["a", "b", "c"]
    merged = merge_texts([first, texts_of(np.array([3, 4]), pl.Series(["c", "d"]), "item")], "item")
    assert sorted(unique_keys(merged, "item")["text"].to_list()) == ["a", "b", "c", "d"]
    # two texts with one key (a forced collision) survive as two rows, and are named
    clash = merge_texts(
        [first, texts_of(np.array([2], dtype=np.int64), pl.Series(["z"]), "item")], "item"
    )
    with pytest.raises(PrepError, match="item ids 'b' and 'z' have the same 64-bit hash"):
        unique_keys(clash, "item")


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.geometric(0.05, 997) + 3
    parts = [histogram(lengths[:300]), histogram(lengths[300:])]
    got = summarize(merge_histograms(parts))
    assert got["users"] == 997 and got["min"] == lengths.min() and got["max"] == lengths.max()
    assert math.isclose(got["mean"], lengths.mean(), abs_tol=1e-3)
    for p in (50, 90, 95, 99):
        assert got[f"p{p}"] == int(np.percentile(lengths, p, method="inverted_cdf"))


def test_csv_line_numbers_across_parse_blocks(tmp_path: Path) -> None:
    lines = ["user_id,item_id,timestamp,note"]
    bad_lines = []
    for k in range(2, 70_000):  # several 1 MB parse blocks
        if k % 9_973 == 0:
            lines.append(f"u{k % 5},oops")
            bad_lines.append(k)
        else:
            lines.append(f"u{k % 5},i{k % 11},{k},some words of padding here")
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 2 * 2**20
    flags = (
        "--min-user-interactions",
        "4",
        "--min-item-interactions",
        "1",
        "--max-reject-share",
        "1",
    )
    assert build(path, tmp_path / "out", *flags, "--set", "batch_rows=1000") == 0
    quarantine = pl.read_parquet(tmp_path / "out" / "quarantine" / "*.parquet").sort("row")
    assert quarantine["row"].to_list() == bad_lines
    assert quarantine["raw"].to_list() == [f"u{k % 5},oops" for k in bad_lines]
