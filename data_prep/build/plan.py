"""The plan of a build: its inputs, column kinds, bucket count and time cutoffs, frozen once.

Every stage works from ``WORK/plan.json`` so that all workers (processes or pods) agree on the
same input list and partitioning. The plan is a pure function of the configuration, the input
listing (names, sizes, modification times) and the Polars version, so a map worker that finds no
plan computes the same one any other would; the *fingerprint* of those facts tells a rerun of
the same job (resume) from a different job that left unfinished work behind (refused).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from data_prep.build.config import BuildConfig, max_time_ns
from data_prep.build.inputs import InputFile, list_inputs, probe, reconcile
from data_prep.build.store import Store
from data_prep.writer import PrepError

PLAN_VERSION = 1  # bump when the meaning of the work files changes
FUTURE_SLACK_NS = 86_400 * 10**9  # default cutoff: file modification time + 1 day
TEXT_BYTES_PER_ROW = 40  # for the bucket count of text inputs, whose row count is unknown


@dataclass(frozen=True)
class Plan:
    fingerprint: str
    config: BuildConfig
    inputs: tuple[InputFile, ...]
    kinds: dict[str, str]  # role -> int | string (ids), per-file (time)
    notes: tuple[str, ...]  # what was reconciled
    buckets: int
    cutoffs_ns: tuple[int, ...]  # per input: later timestamps are future_timestamp

    @property
    def total_rows(self) -> int | None:
        """Exact input row count when every input is Parquet (footers), else None."""
        rows = [f.rows for f in self.inputs]
        return None if any(r is None for r in rows) else sum(r for r in rows if r is not None)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.inputs)

    @property
    def events(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.config.events)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_version": PLAN_VERSION,
            "fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
            "inputs": [f.__dict__ for f in self.inputs],
            "kinds": self.kinds,
            "notes": list(self.notes),
            "buckets": self.buckets,
            "cutoffs_ns": list(self.cutoffs_ns),
            "polars_version": pl.__version__,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], config: BuildConfig) -> Plan:
        return cls(
            fingerprint=data["fingerprint"],
            config=config,
            inputs=tuple(InputFile(**f) for f in data["inputs"]),
            kinds=dict(data["kinds"]),
            notes=tuple(data["notes"]),
            buckets=int(data["buckets"]),
            cutoffs_ns=tuple(int(c) for c in data["cutoffs_ns"]),
        )


def fingerprint(config: BuildConfig, inputs: list[InputFile]) -> str:
    facts = {
        "plan_version": PLAN_VERSION,
        "config": {k: v for k, v in config.to_dict().items() if k != "work_dir"},
        "inputs": [[f.url, f.bytes, f.mtime_ns] for f in inputs],
        "polars": pl.__version__,
        "pyarrow": pa.__version__,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def make_plan(config: BuildConfig, inputs: list[InputFile] | None = None) -> Plan:
    """List and probe the inputs (footers and headers only) and fix the partitioning."""
    if inputs is None:
        inputs = list_inputs(config.input, config.format, output=config.output)
    with ThreadPoolExecutor(max_workers=16) as pool:
        probed = list(pool.map(lambda f: probe(f, config), inputs))
    kinds, notes = reconcile(probed, config)
    files = [f for f, _ in probed]
    buckets = config.buckets or auto_buckets(files, config)
    if config.max_time is not None:
        cutoffs = [max_time_ns(config.max_time)] * len(files)
    else:
        cutoffs = []
        for f in files:
            if f.mtime_ns is None:
                raise PrepError(
                    f"{f.url}: the filesystem does not say when it was written; set max_time"
                )
            cutoffs.append(f.mtime_ns + FUTURE_SLACK_NS)
    return Plan(
        fingerprint=fingerprint(config, inputs),
        config=config,
        inputs=tuple(files),
        kinds=kinds,
        notes=tuple(notes),
        buckets=buckets,
        cutoffs_ns=tuple(cutoffs),
    )


def auto_buckets(files: list[InputFile], config: BuildConfig) -> int:
    """About ``bucket_rows`` input rows per bucket, a multiple of ``shards``, at most 65535."""
    rows = sum(f.rows if f.rows is not None else f.bytes // TEXT_BYTES_PER_ROW for f in files)
    wanted = max(1, math.ceil(rows / config.bucket_rows))
    buckets = math.ceil(wanted / config.shards) * config.shards
    if buckets > 65535:
        buckets = (65535 // config.shards) * config.shards
    return buckets


def ensure_plan(config: BuildConfig, work: Store, *, reset: bool) -> Plan:
    """The job's plan: read from ``WORK/plan.json`` if it is this job's, else made and written.

    Work left by a *different* job (another config or changed inputs) is removed when ``reset``
    (the single-machine run and the plan stage own the folder) and refused otherwise.
    """
    inputs = list_inputs(config.input, config.format, output=config.output)
    current = fingerprint(config, inputs)
    if work.exists("plan.json"):
        stored = work.read_json("plan.json")
        if stored.get("fingerprint") == current and stored.get("plan_version") == PLAN_VERSION:
            return Plan.from_dict(stored, config)
        if not reset:
            raise PrepError(
                f"{work.show()} holds the unfinished work of a different build (other config or "
                "changed inputs); run the plan stage (or the whole build) to start over, "
                "or remove it"
            )
        work.rm()
    plan = make_plan(config, inputs)
    work.write_json(plan.to_dict(), "plan.json")
    return plan


def describe(plan: Plan) -> str:
    """The plan as a person reads it (``--dry-run``)."""
    c = plan.config
    formats: dict[str, int] = {}
    for f in plan.inputs:
        key = f.format + (".gz" if f.gzip else "")
        formats[key] = formats.get(key, 0) + 1
    rows = plan.total_rows
    lines = [
        f"input:   {c.input}",
        f"         {len(plan.inputs)} file(s), {plan.total_bytes / 1e6:,.1f} MB "
        f"({', '.join(f'{v} {k}' for k, v in sorted(formats.items()))})"
        + (f", {rows:,} rows" if rows is not None else ""),
        f"columns: user={c.user_col!r} ({plan.kinds['user']} ids), item={c.item_col!r} "
        f"({plan.kinds['item']} ids), time={c.time_col!r} ({c.time_format})"
        + (f", event={c.event_col!r} in {list(plan.events)}" if c.event_col else ""),
    ]
    lines += [f"         reconciled: {n}" for n in plan.notes]
    cutoff = f"max_time {c.max_time}" if c.max_time else "each file's modification time + 1 day"
    repeats = "exact repeats of (user, item, time" + (", event)" if c.event_col else ")")
    lines += [
        f"reject:  wrong column count, malformed JSON, null/bad ids, null/bad/negative timestamps, "
        f"timestamps after {cutoff}; fail above {c.max_reject_share:.2%} rejected",
        f"dedupe:  {repeats if c.dedupe else 'off'}",
        f"k-core:  users >= {c.min_user_interactions}, items >= {c.min_item_interactions} "
        f"interactions, repeated until stable",
        f"order:   by time, ties by item id{' then event' if c.event_col else ''}; "
        f"keep {'all items' if c.max_len is None else f'the most recent {c.max_len} items'}"
        " per user",
        f"ids:     items 1..N in natural order of the original ids; users: {c.user_ids}",
        f"stages:  map (hash users into {plan.buckets} bucket(s)), reduce (per bucket), k-core, "
        f"write ({c.shards} shard(s), {c.compression}), commit",
        f"output:  {c.output}  (work: {c.work_dir or c.output.rstrip('/') + '/_work'})",
    ]
    return "\n".join(lines)


def check_worker(worker: int, workers: int) -> None:
    """A worker index must lie in 0..workers-1 (Indexed Job completions)."""
    if not 0 <= worker < workers:
        raise PrepError(f"--worker-index {worker} is not in 0..{workers - 1}")


def pending_units(count: int, worker: int, workers: int, done: Callable[[int], bool]) -> list[int]:
    """Units ``worker, worker + workers, ...`` below ``count`` that are not ``done`` yet."""
    check_worker(worker, workers)
    return [unit for unit in range(worker, count, workers) if not done(unit)]
