"""Typed configuration of a raw-log build (``python -m data_prep.build``).

Precedence, lowest to highest: dataclass defaults -> ``--config`` YAML -> command-line flags
(``--user-col``... are shorthands for ``--set user_col=...``) -> ``--set key=value``. Unknown keys
and values of the wrong type are errors naming the key (the loader of ``elcrec_dist.config``).

Everything here decides what the dataset *is*; how a run executes (worker count, stage, dry run)
is not configuration and lives on the command line only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Literal

from data_prep.benchmark import MIN_ITEMS
from elcrec_dist.config import (
    ConfigError,
    parse_override,
    read_yaml_mapping,
    require,
    set_dotted,
    typed_from_mapping,
)

TimeFormat = Literal["epoch_s", "epoch_ms", "epoch_us", "epoch_ns", "iso8601"]
InputFormat = Literal["auto", "parquet", "csv", "tsv", "ndjson"]
Compression = Literal["zstd", "snappy", "gzip", "lz4", "none"]

# Nanoseconds per unit of an epoch timestamp.
EPOCH_UNITS = {"epoch_s": 10**9, "epoch_ms": 10**6, "epoch_us": 10**3, "epoch_ns": 1}


@dataclass(frozen=True)
class BuildConfig:
    """One raw-log build: where the log is, how to read it, what to keep, how to write it."""

    input: str = ""  # glob, folder or file; local or s3://
    output: str = ""  # dataset folder; local or s3://
    format: InputFormat = (
        "auto"  # auto: from each file's extension (.parquet, .csv, .tsv, .ndjson/.jsonl, +.gz)
    )
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    # How to read the time column when it holds numbers or strings (Parquet timestamp and date
    # columns carry their own unit and ignore this). ISO-8601 strings without a zone are UTC.
    time_format: TimeFormat = "epoch_s"
    # Rows later than this are quarantined as future_timestamp. null: each input file's
    # modification time plus one day (a log cannot record an event after it was written).
    max_time: str | None = None
    event_col: str | None = None  # optional event-type column
    events: tuple[str, ...] = ()  # with event_col: keep only rows whose event is one of these
    dedupe: bool = True  # drop exact repeats of (user, item, time[, event])
    min_user_interactions: int = 5  # iterative k-core: users need this many interactions...
    min_item_interactions: int = 5  # ...and items this many, both until nothing changes
    max_len: int | None = None  # keep each user's most recent max_len items; null keeps all
    max_reject_share: float = 0.01  # fail when more than this share of rows is quarantined
    shards: int = 1  # output Parquet files; users are hashed to shards
    buckets: int | None = None  # map/reduce partitions; null: one per ~bucket_rows input rows
    bucket_rows: int = 4_000_000  # target input rows per bucket when buckets is null
    compression: Compression = "zstd"
    # keep: user_id is the original (integer) id. index: users are numbered 1..U bucket by
    # bucket. auto: keep when every kept user id is an integer, else index.
    user_ids: Literal["auto", "keep", "index"] = "auto"
    # Input files whose id columns disagree (integers in one, strings in another): refuse by
    # name, or reconcile by reading the integers as their decimal strings.
    on_schema_mismatch: Literal["refuse", "reconcile"] = "refuse"
    work_dir: str | None = None  # scratch space shared by all stages; null: OUTPUT/_work
    batch_rows: int = 1_048_576  # rows per read batch
    run_rows: int = 4_194_304  # rows a map worker buffers before writing a partitioned run

    def validate(self) -> None:
        require(bool(self.input), "input: required (--input GLOB_OR_URL)")
        require(bool(self.output), "output: required (--output DIR_OR_URL)")
        for name in ("user_col", "item_col", "time_col"):
            require(bool(getattr(self, name)), f"{name}: must name a column")
        columns = [self.user_col, self.item_col, self.time_col]
        if self.event_col is not None:
            columns.append(self.event_col)
        require(
            len(set(columns)) == len(columns),
            f"the id, time and event columns must differ: {columns}",
        )
        require(
            (self.event_col is None) == (len(self.events) == 0),
            "event_col and events go together: name the event column and the values to keep",
        )
        require(
            self.min_user_interactions >= MIN_ITEMS,
            f"min_user_interactions must be >= {MIN_ITEMS} (train, valid and test targets), "
            f"got {self.min_user_interactions}",
        )
        require(self.min_item_interactions >= 1, "min_item_interactions must be >= 1")
        require(
            self.max_len is None or self.max_len >= MIN_ITEMS,
            f"max_len must be >= {MIN_ITEMS} or null, got {self.max_len}",
        )
        require(
            math.isfinite(self.max_reject_share) and 0.0 <= self.max_reject_share <= 1.0,
            f"max_reject_share must be in [0, 1], got {self.max_reject_share}",
        )
        require(self.shards >= 1, f"shards must be >= 1, got {self.shards}")
        if self.buckets is not None:
            require(
                1 <= self.buckets <= 65535 and self.buckets % self.shards == 0,
                f"buckets must be in 1..65535 and a multiple of shards ({self.shards}), "
                f"got {self.buckets}",
            )
        require(self.bucket_rows >= 1, "bucket_rows must be >= 1")
        require(self.batch_rows >= 1, "batch_rows must be >= 1")
        require(self.run_rows >= 1, "run_rows must be >= 1")
        if self.max_time is not None:
            max_time_ns(self.max_time)  # raises ConfigError when unreadable

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @property
    def epoch_unit_ns(self) -> int:
        return EPOCH_UNITS.get(self.time_format, 1)


def max_time_ns(text: str) -> int:
    """``max_time`` as epoch nanoseconds (UTC); a date or date-time, zone optional (then UTC)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"max_time: {text!r} is not an ISO-8601 date or date-time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    seconds = moment.timestamp()
    require(seconds >= 0, f"max_time: {text!r} is before 1970")
    require(seconds < 2**63 / 1e9, f"max_time: {text!r} is after 2262")
    return round(seconds * 1e6) * 1000


def load_build_config(
    path: str | Path | None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> BuildConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``flags`` (typed values from the
    command line), then ``key=value`` overrides (values read as YAML)."""
    tree: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    tree.update(flags or {})
    for text in overrides:
        key, value = parse_override(text)
        if "." in key:
            raise ConfigError(f"--set {key}: build options are not nested (e.g. --set max_len=50)")
        set_dotted(tree, key, value)
    if isinstance(tree.get("max_time"), date):
        # YAML reads an unquoted 2030-01-01 as a date; the option is its ISO text.
        tree["max_time"] = tree["max_time"].isoformat()
    try:
        config = typed_from_mapping(BuildConfig, tree)
        config.validate()
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None
    return config
