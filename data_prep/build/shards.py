"""Write stage: the output shards, in the prepared-dataset format, with their user maps.

Shard ``s`` holds the users of buckets ``s, s + shards, s + 2 * shards, ...`` (``buckets`` is a
multiple of ``shards``), bucket by bucket, each bucket's users in natural order. With integer
user ids kept as ``user_id`` this is exactly ``writer.shard_of(user_id, shards)``, the shard the
benchmark import picks. Each user's kept interactions (k-core) are mapped to item ids and cut to
the most recent ``max_len``. Rows go out in row groups of exactly ``ROW_GROUP_SIZE`` users, as
``elcrec_dist.prepared.write_table`` writes them, so equal content gives equal bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.build import layout
from data_prep.build.kcore import load_bucket, load_npy, starts_of
from data_prep.build.plan import Plan, pending_units
from data_prep.build.stats import histogram
from data_prep.build.store import Store, fault
from data_prep.writer import PrepError, shard_name
from elcrec_dist.prepared import ARROW_SCHEMA, ROW_GROUP_SIZE

ROW_GROUP = ROW_GROUP_SIZE  # users per row group, as elcrec_dist.prepared.write_table writes them


def run_write(
    plan: Plan,
    work: Store,
    out: Store,
    worker: int,
    workers: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write shards ``worker, worker + workers, ...``; written shards are skipped."""
    todo = pending_units(
        plan.config.shards, worker, workers, lambda s: work.exists(layout.write_done(s))
    )
    if not todo:
        return
    if not work.exists(layout.KCORE_DONE):
        raise PrepError(f"{work.show()}: k-core has not run; run the kcore stage first")
    kcore = work.read_json(layout.KCORE_DONE)
    item_ids = load_npy(work, layout.ITEM_IDS)
    for shard in todo:
        marker = write_shard(plan, work, out, kcore, item_ids, shard)
        work.write_json(marker, layout.write_done(shard))
        if progress is not None:
            progress(1)


class _RowGroupWriter:
    """A Parquet file written in row groups of exactly ``ROW_GROUP`` rows."""

    def __init__(
        self, handle: Any, schema: pa.Schema, compression: str, rows: int = ROW_GROUP
    ) -> None:
        self.row_group = rows
        self.writer = pq.ParquetWriter(
            handle, schema, compression=compression, write_statistics=True, store_schema=True
        )
        self.schema = schema
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.row_group:
            self._emit(self.row_group)

    def _emit(self, rows: int) -> None:
        table = pa.concat_tables(self.pending)
        self.writer.write_table(table.slice(0, rows), row_group_size=self.row_group)
        rest = table.slice(rows)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows
        self.rows += rows

    def close(self) -> None:
        if self.pending_rows or self.rows == 0:
            table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
            self.writer.write_table(table, row_group_size=self.row_group)
            self.rows += table.num_rows
        self.writer.close()


def write_shard(
    plan: Plan, work: Store, out: Store, kcore: dict[str, Any], item_ids: np.ndarray, shard: int
) -> dict[str, Any]:
    config = plan.config
    name = shard_name(shard, config.shards)
    map_name = layout.user_map_name(shard, config.shards)
    keep_ids = kcore["user_ids"] == "keep"
    user_kind = plan.kinds["user"]
    map_schema = pa.schema(
        [("user", pa.int64() if user_kind == "int" else pa.string()), ("user_id", pa.int64())]
    )
    compression = config.compression
    lengths_before: list[np.ndarray] = []
    lengths_after: list[np.ndarray] = []
    interactions = max_item = 0
    with out.open_write(name) as handle, out.open_write(map_name) as map_handle:
        data = _RowGroupWriter(handle, ARROW_SCHEMA, compression)
        maps = _RowGroupWriter(map_handle, map_schema, compression, rows=1 << 20)
        for bucket in range(shard, plan.buckets, config.shards):
            lengths, ranks = load_bucket(work, bucket)
            alive = load_npy(work, layout.alive_name(bucket))
            ids = item_ids[ranks]
            row_ok = np.repeat(alive, lengths) & (ids > 0)
            kept = (
                np.add.reduceat(row_ok.astype(np.int64), starts_of(lengths))[alive]
                if len(lengths)
                else np.zeros(0, np.int64)
            )
            values = ids[row_ok]
            cut = kept if config.max_len is None else np.minimum(kept, config.max_len)
            if config.max_len is not None and (kept > cut).any():
                # keep each user's last ``cut`` values: position counted from the user's end
                ends = np.cumsum(kept)
                from_end = np.repeat(ends, kept) - 1 - np.arange(len(values))
                values = values[from_end < config.max_len]
            offsets = np.concatenate([[0], np.cumsum(cut)])
            if offsets[-1] > np.iinfo(np.int32).max:
                raise PrepError(f"bucket {bucket} has more than 2^31 interactions; raise buckets")
            users = work.read_ipc(layout.reduce_name(bucket, "users.arrow")).filter(pa.array(alive))
            if keep_ids:
                user_id = users.column("value").combine_chunks()
            else:
                first = int(kcore["user_id_offsets"][bucket]) + 1
                user_id = pa.array(np.arange(first, first + users.num_rows, dtype=np.int64))
            items = pa.ListArray.from_arrays(
                pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32))
            )
            data.add(pa.table({"user_id": user_id, "items": items}, schema=ARROW_SCHEMA))
            original = users.column("key" if user_kind == "int" else "text")
            maps.add(pa.table({"user": original, "user_id": user_id}, schema=map_schema))
            lengths_before.append(kept)
            lengths_after.append(cut)
            interactions += int(offsets[-1])
            max_item = max(max_item, int(values.max()) if len(values) else 0)
        data.close()
        maps.close()
        rows = data.rows
    if interactions > np.iinfo(np.int32).max:
        raise PrepError(
            f"shard {name} holds {interactions:,} interactions, more than a list<int32> column "
            f"can index (2^31 - 1); raise shards"
        )
    fault("write-shard")
    before = np.concatenate(lengths_before) if lengths_before else np.zeros(0, np.int64)
    after = np.concatenate(lengths_after) if lengths_after else np.zeros(0, np.int64)
    return {
        "shard": shard,
        "path": name,
        "user_map": map_name,
        "rows": rows,
        "interactions": interactions,
        "max_item_id": max_item,
        "bytes": out.size(name),
        "sha256": _sha256(out, name),
        "users_truncated": int(np.count_nonzero(before > after)),
        "interactions_dropped": int((before - after).sum()),
        "lengths_before": histogram(before),
        "lengths_after": histogram(after),
    }


def _sha256(out: Store, name: str) -> str:
    digest = hashlib.sha256()
    with out.open_read(name) as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
