"""Map stage: read a worker's share of the input, validate rows, hash-partition them by user.

Worker ``i`` of ``n`` reads its files (assigned by size, largest first, to the least loaded
worker: the same answer on every pod), cleans each batch (``clean.py``) and buffers the valid
rows as int64 keys. Every ``run_rows`` rows it sorts the buffer by bucket (``keys.bucket_of``
the user key) and writes one *run*: an Arrow IPC file holding one record batch per bucket, so a
reducer reads its bucket from every run without reading the rest. Memory is one batch plus one
run, whatever the input size. String ids travel as 64-bit keys; their texts go to small side
files (the distinct (key, text) pairs of each run's users, per bucket, and of the worker's items).

Rejected rows stream to ``OUTPUT/quarantine/part-wIIIII-of-NNNNN.parquet``. The done marker,
written last, lists the runs with their rows per bucket and the worker's counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.build import layout
from data_prep.build.clean import QUARANTINE_SCHEMA, Cleaned, CleanSpec, clean_batch
from data_prep.build.inputs import iter_batches
from data_prep.build.keys import TEXTS_SCHEMA, bucket_of, merge_texts, texts_of
from data_prep.build.plan import Plan, check_worker
from data_prep.build.stats import reject_message
from data_prep.build.store import Store, fault
from data_prep.writer import PrepError

Progress = Callable[[int], None]
QUARANTINE_FLUSH = 65_536


def run_schema(with_event: bool) -> pa.Schema:
    fields = [("u", pa.int64()), ("i", pa.int64()), ("t", pa.int64())]
    if with_event:
        fields.append(("e", pa.int16()))
    return pa.schema(fields)


TEXT_SCHEMA = pa.schema([("key", pa.int64()), ("check", pa.int64()), ("text", pa.large_string())])
KEY_SCHEMA = pa.schema([("key", pa.int64())])


def clean_spec(plan: Plan) -> CleanSpec:
    return CleanSpec(
        user_kind=plan.kinds["user"],
        item_kind=plan.kinds["item"],
        time_format=plan.config.time_format,
        epoch_unit_ns=plan.config.epoch_unit_ns,
        events=plan.events,
    )


def assign_files(plan: Plan, workers: int) -> list[list[int]]:
    """Input indices per worker: largest file first to the least loaded worker."""
    loads = [0] * workers
    shares: list[list[int]] = [[] for _ in range(workers)]
    for index in sorted(range(len(plan.inputs)), key=lambda k: (-plan.inputs[k].bytes, k)):
        target = min(range(workers), key=lambda w: (loads[w], w))
        loads[target] += max(plan.inputs[index].bytes, 1)
        shares[target].append(index)
    return [sorted(share) for share in shares]


def run_map(
    plan: Plan, work: Store, out: Store, worker: int, workers: int, progress: Progress | None = None
) -> None:
    """Map worker ``worker`` of ``workers``; a no-op when its done marker exists."""
    check_worker(worker, workers)
    if work.exists(layout.map_done(worker, workers)):
        return
    work.rm(layout.map_dir(worker, workers))  # leftovers of a killed attempt
    out.rm(layout.quarantine_name(worker, workers))
    with contextlib.ExitStack() as stack:
        mapper = _Mapper(plan, work, out, worker, workers, stack)
        for index in assign_files(plan, workers)[worker]:
            source = plan.inputs[index]
            for raw in iter_batches(source, plan.config):
                cleaned = clean_batch(
                    raw, mapper.spec, source=source.url, cutoff_ns=plan.cutoffs_ns[index]
                )
                mapper.add(cleaned, source.url)
                if progress is not None:
                    progress(cleaned.rows_read)
        marker = mapper.finish()
    work.write_json(marker, layout.map_done(worker, workers))


@dataclass
class _Part:
    """One batch's valid rows, sorted by bucket: bucket b is
    ``columns[c][bounds[b]:bounds[b + 1]]``."""

    columns: dict[str, np.ndarray]
    bounds: np.ndarray


class _Mapper:
    """Buffers of one map worker: the current run, the id texts, the quarantine, the counts."""

    def __init__(
        self,
        plan: Plan,
        work: Store,
        out: Store,
        worker: int,
        workers: int,
        stack: contextlib.ExitStack,
    ) -> None:
        self.plan, self.work, self.out, self.stack = plan, work, out, stack
        self.worker, self.workers = worker, workers
        self.spec = clean_spec(plan)
        self.strings = {role: plan.kinds[role] == "string" for role in ("user", "item")}
        self.with_event = bool(plan.events)
        self.dir = layout.map_dir(worker, workers)
        self.buffer: list[_Part] = []
        self.buffered = 0
        self.user_texts: list[pl.DataFrame] = []  # this run's distinct users (string ids)
        self.items: list[pl.DataFrame] = []  # the worker's distinct items
        self.items_rows = 0  # rows in self.items
        self.items_kept = 0  # rows in self.items[0] after the last compaction
        self.runs: list[dict[str, Any]] = []
        self.quarantine: pq.ParquetWriter | None = None
        self.quarantine_buffer: list[pa.Table] = []
        self.quarantine_rows = 0
        self.rows_read: dict[str, int] = {}
        self.reasons: dict[str, int] = {}
        self.filtered = 0
        self.rows_out = 0

    def add(self, cleaned: Cleaned, source: str) -> None:
        self.rows_read[source] = self.rows_read.get(source, 0) + cleaned.rows_read
        self.filtered += cleaned.filtered
        for reason, count in cleaned.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + count
        if cleaned.rejected is not None:
            self._quarantine(cleaned.rejected)
            self._check_rejects()
        if not len(cleaned.user):
            return
        if cleaned.user_text is not None:
            self.user_texts.append(texts_of(cleaned.user, cleaned.user_text, "user"))
        if cleaned.item_text is not None:
            self.items.append(texts_of(cleaned.item, cleaned.item_text, "item"))
        else:
            self.items.append(pl.DataFrame({"key": pl.Series(cleaned.item).unique()}))
        self.items_rows += len(self.items[-1])
        if self.items_rows > self.items_kept + 2 * self.plan.config.batch_rows:
            self._compact_items()  # keeps the item texts at about the catalogue's size
        self.buffer.append(self._partition(cleaned))  # the run needs only the keys from here on
        self.buffered += len(cleaned.user)
        if self.buffered >= self.plan.config.run_rows:
            self._flush()

    def _check_rejects(self) -> None:
        """Fail early once the rejects alone exceed the allowed share of all input rows."""
        total = self.plan.total_rows
        rejected = sum(self.reasons.values())
        if total and rejected > self.plan.config.max_reject_share * total:
            raise PrepError(reject_message(rejected, total, self.reasons, self.plan, partial=True))

    def _quarantine(self, table: pa.Table) -> None:
        self.quarantine_buffer.append(table)
        self.quarantine_rows += table.num_rows
        if sum(t.num_rows for t in self.quarantine_buffer) >= QUARANTINE_FLUSH:
            self._flush_quarantine()

    def _flush_quarantine(self) -> None:
        if not self.quarantine_buffer:
            return
        if self.quarantine is None:
            name = layout.quarantine_name(self.worker, self.workers)
            handle = self.stack.enter_context(self.out.open_write(name))
            self.quarantine = self.stack.enter_context(
                pq.ParquetWriter(handle, QUARANTINE_SCHEMA, compression="zstd")
            )
        self.quarantine.write_table(pa.concat_tables(self.quarantine_buffer))
        self.quarantine_buffer = []

    def _partition(self, cleaned: Cleaned) -> _Part:
        """A batch's rows sorted by bucket (one batch at a time: the gathers stay in cache)."""
        bucket = bucket_of(cleaned.user, self.plan.buckets)
        order = np.argsort(bucket, kind="stable")  # radix sort of uint16
        counts = np.bincount(bucket, minlength=self.plan.buckets)
        columns = {"u": cleaned.user[order], "i": cleaned.item[order], "t": cleaned.time[order]}
        if cleaned.event is not None:
            columns["e"] = cleaned.event[order]
        return _Part(columns, np.concatenate([[0], np.cumsum(counts)]))

    def _flush(self) -> None:
        """Write the buffer as one run: one record batch per bucket, the batches' rows of that
        bucket one after the other."""
        if not self.buffer:
            return
        buckets = self.plan.buckets
        k = len(self.runs)
        schema = run_schema(self.with_event)
        batches = []
        counts = np.zeros(buckets, dtype=np.int64)
        for b in range(buckets):
            pieces = [(part, int(part.bounds[b]), int(part.bounds[b + 1])) for part in self.buffer]
            columns = [
                pa.array(np.concatenate([part.columns[name][lo:hi] for part, lo, hi in pieces]))
                for name in schema.names
            ]
            batches.append(pa.record_batch(columns, schema=schema))
            counts[b] = len(columns[0])
        run_name = f"run-{k:05d}.arrow"
        self.work.write_ipc(batches, schema, self.dir, run_name)
        users_name = None
        if self.strings["user"]:
            users_name = f"users-{k:05d}.arrow"
            texts = merge_texts(self.user_texts, "user")
            ubucket = bucket_of(texts["key"].to_numpy(), buckets)
            ubounds = np.concatenate([[0], np.cumsum(np.bincount(ubucket, minlength=buckets))])
            texts = (
                texts.with_columns(b=pl.Series(ubucket)).sort("b", maintain_order=True).drop("b")
            )
            table = texts.to_arrow().cast(TEXT_SCHEMA)
            self.work.write_ipc(slices(table, ubounds), TEXT_SCHEMA, self.dir, users_name)
        self.runs.append({"run": run_name, "users": users_name, "rows": counts.tolist()})
        self.rows_out += self.buffered
        self.buffer, self.buffered, self.user_texts = [], 0, []
        fault("map-run")

    def _compact_items(self) -> None:
        if len(self.items) > 1:
            if self.strings["item"]:
                self.items = [merge_texts(self.items, "item")]
            else:
                self.items = [pl.concat(self.items).unique()]
            self.items_rows = self.items_kept = len(self.items[0])

    def finish(self) -> dict[str, Any]:
        self._flush()
        self._flush_quarantine()
        self._compact_items()
        schema = TEXT_SCHEMA if self.strings["item"] else KEY_SCHEMA
        if self.items:
            items = self.items[0]
        else:
            items = pl.DataFrame(
                schema={k: v for k, v in TEXTS_SCHEMA.items() if k in schema.names}
            )
        table = items.to_arrow().cast(schema)
        self.work.write_ipc(table.combine_chunks().to_batches(), schema, self.dir, "items.arrow")
        return {
            "worker": self.worker,
            "workers": self.workers,
            "files": sorted(self.rows_read),
            "rows_read": self.rows_read,
            "rejected": dict(sorted(self.reasons.items())),
            "filtered": self.filtered,
            "rows_out": self.rows_out,
            "runs": self.runs,
            "quarantine": layout.quarantine_name(self.worker, self.workers)
            if self.quarantine_rows
            else None,
            "quarantine_rows": self.quarantine_rows,
        }


def slices(table: pa.Table, bounds: np.ndarray) -> list[pa.RecordBatch]:
    """One record batch per consecutive range ``bounds[b]:bounds[b + 1]`` of ``table``."""
    table = table.combine_chunks()
    batches = []
    for b in range(len(bounds) - 1):
        part = table.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b])).to_batches()
        batches.append(part[0] if part else pa.RecordBatch.from_pylist([], schema=table.schema))
    return batches
