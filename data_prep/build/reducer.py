"""Reduce stage: one bucket at a time, gather its rows, order each user's history, deduplicate.

For bucket ``b`` the reducer reads batch ``b`` of every map run (only that bucket's bytes),
replaces item keys by their natural-order ranks (``idmap``), sorts by (user, time, item rank
[, event]) and drops rows equal to the one before (exact repeats). Users come in natural order
of their original ids (integer ids: numeric). The result is compact: the bucket's users with
their history lengths, and one int32 item rank per interaction in time order; k-core and the
writer read only this. Memory is one bucket (about ``bucket_rows`` rows).

The sort is checked after the fact (every row >= the one before) and the row count against the
map stage's count for the bucket, so a sort or a read that loses rows or order fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from data_prep.build import layout
from data_prep.build.idmap import ItemRanks, ensure_item_table, map_markers
from data_prep.build.keys import canonical_ints, merge_texts, natural_order, unique_keys
from data_prep.build.mapper import TEXT_SCHEMA
from data_prep.build.plan import Plan, pending_units
from data_prep.build.stats import check_rejects
from data_prep.build.store import Store, fault
from data_prep.writer import PrepError

USERS_SCHEMA = pa.schema(
    [("key", pa.int64()), ("length", pa.int64()), ("value", pa.int64()), ("text", pa.string())]
)
ITEMS_SCHEMA = pa.schema([("rank", pa.int32())])


def run_reduce(
    plan: Plan,
    work: Store,
    worker: int,
    workers: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Reduce the buckets ``worker, worker + workers, ...``; done buckets are skipped."""
    todo = pending_units(
        plan.buckets, worker, workers, lambda b: work.exists(layout.reduce_name(b, "done.json"))
    )
    if not todo:
        return
    markers = map_markers(work)
    check_rejects(plan, markers)
    ranks = ItemRanks(ensure_item_table(plan, work, columns=["key"]))
    for bucket in todo:
        reduce_bucket(plan, work, markers, ranks, bucket)
        if progress is not None:
            progress(1)


def reduce_bucket(
    plan: Plan, work: Store, markers: list[dict[str, Any]], ranks: ItemRanks, bucket: int
) -> dict[str, Any]:
    rows, texts, expected = _gather(plan, work, markers, bucket)
    n = rows.num_rows
    if n != expected:
        raise PrepError(
            f"bucket {bucket}: read {n} rows, the map stage wrote {expected}; rerun the build"
        )
    user = rows.column("u").to_numpy()
    users = _users(user, texts)  # distinct users in natural order: key[, text]
    position = pl.DataFrame({"key": users["key"], "s": np.arange(len(users), dtype=np.int64)})
    s = pl.DataFrame({"key": user}).join(position, on="key", how="left", maintain_order="left")["s"]
    if s.null_count():
        raise PrepError(
            f"bucket {bucket}: a user key has no text; the map outputs are inconsistent"
        )
    keys = {
        "s": s.to_numpy(),
        "t": rows.column("t").to_numpy(),
        "r": ranks(rows.column("i").to_numpy()).astype(np.int64),
    }
    if "e" in rows.column_names:
        keys["e"] = rows.column("e").to_numpy().astype(np.int64)
    ordered, same = sort_rows(keys)
    _check_sorted([ordered[c] for c in keys], bucket)

    keep = np.ones(n, dtype=bool)
    duplicates = 0
    if plan.config.dedupe and n > 1:
        keep[1:] = ~same
        duplicates = int(n - keep.sum())
    owner = ordered["s"][keep]
    item_rank = ordered["r"][keep].astype(np.int32)
    starts = (
        np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
        if len(owner)
        else np.zeros(0, np.int64)
    )
    present = owner[starts]  # users with rows, in natural order (all of them: users come from rows)
    lengths = np.diff(np.append(starts, len(owner)))
    chosen = users[present]
    if texts is not None:
        value = canonical_ints(chosen["text"]).to_arrow()
        text = chosen["text"].to_arrow()
    else:
        value = chosen["key"].to_arrow()
        text = pa.nulls(len(chosen), pa.string())
    users_table = pa.table(
        {"key": chosen["key"].to_arrow(), "length": pa.array(lengths), "value": value, "text": text}
    ).cast(USERS_SCHEMA)
    work.write_ipc(
        users_table.combine_chunks().to_batches(),
        USERS_SCHEMA,
        layout.reduce_name(bucket, "users.arrow"),
    )
    work.write_ipc(
        [pa.record_batch([pa.array(item_rank)], schema=ITEMS_SCHEMA)],
        ITEMS_SCHEMA,
        layout.reduce_name(bucket, "items.arrow"),
    )
    fault("reduce-bucket")
    marker = {
        "bucket": bucket,
        "rows_in": n,
        "duplicates": duplicates,
        "users": len(starts),
        "interactions": len(item_rank),
    }
    work.write_json(marker, layout.reduce_name(bucket, "done.json"))
    return marker


def _users(user: np.ndarray, texts: pa.Table | None) -> pl.DataFrame:
    """The bucket's distinct users in natural order: (key) for integer ids, (key, text) else."""
    if texts is None:
        return pl.DataFrame({"key": np.sort(pl.Series(user).unique().to_numpy())})
    frame = pl.from_arrow(texts)
    assert isinstance(frame, pl.DataFrame)
    users = unique_keys(merge_texts([frame], "user"), "user").select("key", "text")
    return users[natural_order(users["text"])]


def sort_rows(keys: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows sorted by the columns of ``keys`` in order (all non-negative int64), and for each
    row after the first whether it equals the one before. [n] -> [n], [n - 1].

    Fast path: the columns packed into one int64 (widths from their maxima), sorted with
    ``np.sort``. Times are first divided by the coarsest unit that keeps them exact and made
    relative to the bucket's earliest; when they still need too many bits they are replaced
    by their dense rank. Otherwise a multi-column Polars sort.
    """
    n = len(next(iter(keys.values())))
    keys = dict(keys)
    if n and "t" in keys:
        t = keys["t"] - keys["t"].min()
        for unit in (10**9, 10**6, 10**3):
            if not (t % unit).any():
                t //= unit
                break
        keys["t"] = t
    widths = {c: int(v.max()).bit_length() if n else 0 for c, v in keys.items()}
    if sum(widths.values()) > 63 and n and widths["t"] + int(n - 1).bit_length() <= 63:
        keys["t"] = dense_rank(keys["t"])
        widths["t"] = int(keys["t"].max()).bit_length()
    if sum(widths.values()) <= 63:
        packed = np.zeros(n, dtype=np.int64)
        for c, v in keys.items():
            packed = (packed << np.int64(widths[c])) | v
        packed.sort()
        out = {}
        shift = 0
        for c in reversed(list(keys)):
            out[c] = (packed >> np.int64(shift)) & np.int64((1 << widths[c]) - 1)
            shift += widths[c]
        return {c: out[c] for c in keys}, packed[1:] == packed[:-1]
    frame = pl.DataFrame(keys).sort(list(keys))
    ordered = {c: frame[c].to_numpy() for c in keys}
    same = np.ones(max(n - 1, 0), dtype=bool)
    for v in ordered.values():
        same &= v[1:] == v[:-1]
    return ordered, same


def dense_rank(values: np.ndarray) -> np.ndarray:
    """[n] non-negative int64 -> [n] rank among the distinct values (0, 1, ...), by one packed
    sort of (value, position)."""
    bits = int(len(values) - 1).bit_length()
    packed = (values << np.int64(bits)) | np.arange(len(values), dtype=np.int64)
    packed.sort()
    position = packed & np.int64((1 << bits) - 1)
    value = packed >> np.int64(bits)
    rank = np.concatenate([[0], np.cumsum(value[1:] != value[:-1])])
    out = np.empty(len(values), dtype=np.int64)
    out[position] = rank
    return out


def _gather(
    plan: Plan, work: Store, markers: list[dict[str, Any]], bucket: int
) -> tuple[pa.Table, pa.Table | None, int]:
    """Batch ``bucket`` of every run: (rows, user texts or None, rows the map stage counted)."""
    parts, texts, expected = [], [], 0
    for marker in markers:
        folder = layout.map_dir(marker["worker"], marker["workers"])
        for run in marker["runs"]:
            count = int(run["rows"][bucket])
            expected += count
            if count:
                parts.append(work.open_ipc(folder, run["run"]).get_batch(bucket))
                if run["users"]:
                    texts.append(work.open_ipc(folder, run["users"]).get_batch(bucket))
    with_event = bool(plan.events)
    schema = pa.schema(
        [("u", pa.int64()), ("i", pa.int64()), ("t", pa.int64())]
        + ([("e", pa.int16())] if with_event else [])
    )
    rows = pa.Table.from_batches(parts, schema=schema).combine_chunks()
    if plan.kinds["user"] != "string":
        return rows, None, expected
    return rows, pa.Table.from_batches(texts, schema=TEXT_SCHEMA), expected


def _check_sorted(cols: list[np.ndarray], bucket: int) -> None:
    """Each row >= the one before in (cols[0], cols[1], ...) order; else the sort is broken."""
    if not len(cols[0]) or len(cols[0]) == 1:
        return
    ok = np.zeros(len(cols[0]) - 1, dtype=bool)
    tied = np.ones(len(cols[0]) - 1, dtype=bool)
    for col in cols:
        ok |= tied & (col[1:] > col[:-1])
        tied &= col[1:] == col[:-1]
    ok |= tied
    if not ok.all():
        where = int(np.flatnonzero(~ok)[0])
        raise PrepError(
            f"bucket {bucket}: rows {where} and {where + 1} are out of order after sorting "
            "(a bug; please report)"
        )
