"""Synthetic raw interaction logs with planted intents, duplicates, malformed rows and bots.

    python -m data_prep.synthetic_logs --output logs/demo --interactions 1000000
        [--users U] [--items N] [--intents 8] [--noise 0.1] [--duplicate-share 0.02]
        [--malformed-share 0.002] [--bots 3] [--bot-share 0.01] [--format parquet|csv|tsv|ndjson]
        [--gzip] [--files 4] [--time-format epoch_s|epoch_ms|iso8601] [--int-ids] [--seed 0]

(also ``python -m data_prep.synthetic --raw-log ...``). The log exercises every part of
``python -m data_prep.build``:

- ``interactions`` distinct valid events (user, item, timestamp, event): regular users plus a
  few *bots* (``bot0``, ``bot1``...) that hold ``bot_share`` of them, with huge histories of
  random items. Each user's timestamps are strictly increasing, so no two valid events repeat.
- Regular users have a *planted intent*: items are cut into ``intents`` contiguous slices; a
  user walks inside its slice (steps of 1 to 3 items), and with probability ``noise`` shows a
  uniformly random item instead. History lengths vary (lognormal), some users too short for a
  5-core, and rarely used items exist, so k-core has work.
- Exact copies of ``duplicate_share`` x interactions rows, and ``malformed_share`` x interactions
  rows that the build must reject, cycling through the reasons the format can express
  (``null_user``, ``null_item``, ``null_timestamp`` or ``bad_timestamp``, ``negative_timestamp``,
  ``future_timestamp``, and ``wrong_column_count`` for CSV/TSV, ``malformed_json`` for NDJSON).
- Rows are shuffled within each chunk of ``chunk_rows`` rows; chunk by chunk, so memory does not
  grow with the log. Ids are strings (``u17``, ``i42``) or, with ``--int-ids``, integers.

Besides ``part-NNNNN.<ext>`` files the folder holds ``_planted_intents.parquet`` (user,
intent) and ``_summary.json`` (exact planted counts: rows, duplicates, malformed rows by
reason); their leading underscore keeps them out of the build's input listing. A seed fixes
every byte.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import posixpath
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from data_prep.writer import PrepError

START_S = 1_600_000_000  # 2020-09-13: regular histories start within a year of this
SPAN_S = 365 * 86_400
FUTURE_S = 7_258_118_400  # 2200-01-01: the far-future timestamp of future_timestamp rows
EVENTS = ("view", "click", "purchase")
EVENT_P = (0.6, 0.3, 0.1)
COLUMNS = ("user_id", "item_id", "timestamp", "event")
SUMMARY_NAME = "_summary.json"
PLANTED_NAME = "_planted_intents.parquet"


@dataclass(frozen=True)
class LogSpec:
    interactions: int = 100_000
    users: int | None = None  # default: interactions // 40
    items: int | None = None  # default: interactions // 100, within [64, 1_000_000]
    intents: int = 8
    noise: float = 0.1
    duplicate_share: float = 0.02
    malformed_share: float = 0.002
    bots: int = 3
    bot_share: float = 0.01
    format: str = "parquet"
    gzip: bool = False
    files: int = 1
    time_format: str = "epoch_s"
    int_ids: bool = False
    chunk_rows: int = 1_000_000
    seed: int = 0

    @property
    def num_users(self) -> int:
        return self.users if self.users is not None else max(1, self.interactions // 40)

    @property
    def num_items(self) -> int:
        return (
            self.items
            if self.items is not None
            else min(max(self.interactions // 100, 64), 1_000_000)
        )

    @property
    def bot_rows(self) -> int:
        return round(self.bot_share * self.interactions) if self.bots else 0

    @property
    def chunks(self) -> int:
        return max(self.files, math.ceil(self.interactions / self.chunk_rows))

    def validate(self) -> None:
        if self.interactions < 1:
            raise PrepError(f"--interactions must be >= 1, got {self.interactions}")
        if self.num_users < 1 or self.num_users > self.interactions - self.bot_rows:
            raise PrepError(
                f"--users must be in 1..{self.interactions - self.bot_rows} "
                "(one interaction each at least)"
            )
        if self.intents < 1 or self.num_items < 4 * self.intents:
            raise PrepError(f"--items ({self.num_items}) must be >= 4 x --intents ({self.intents})")
        for name in ("noise", "duplicate_share", "malformed_share", "bot_share"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise PrepError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.format not in ("parquet", "csv", "tsv", "ndjson"):
            raise PrepError(f"--format must be parquet, csv, tsv or ndjson, got {self.format!r}")
        if self.format == "parquet" and self.gzip:
            raise PrepError("--gzip is for text formats (Parquet compresses itself)")
        if self.time_format not in ("epoch_s", "epoch_ms", "iso8601"):
            raise PrepError(
                f"--time-format must be epoch_s, epoch_ms or iso8601, got {self.time_format!r}"
            )
        if self.files < 1 or self.chunk_rows < 1 or self.bots < 0 or self.seed < 0:
            raise PrepError("--files and --chunk-rows must be >= 1, --bots and --seed >= 0")

    @property
    def malformed_kinds(self) -> tuple[str, ...]:
        numeric = self.format == "parquet" and self.time_format != "iso8601"
        time_kind = "null_timestamp" if numeric else "bad_timestamp"
        kinds = ["null_user", "null_item", time_kind, "negative_timestamp", "future_timestamp"]
        if self.format in ("csv", "tsv"):
            kinds.append("wrong_column_count")
        if self.format == "ndjson":
            kinds.append("malformed_json")
        return tuple(kinds)


def _split(total: int, parts: int) -> np.ndarray:
    """``total`` split into ``parts`` near-equal non-negative integers."""
    base = np.full(parts, total // parts, dtype=np.int64)
    base[: total % parts] += 1
    return base


def _chunk(spec: LogSpec, c: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Chunk ``c``: regular users' share c plus bot rows share c, as numpy columns.

    Returns columns (user index [n] int64 (bots: -1 - b), item index, ts seconds, event code)
    and the chunk's planted intents.
    """
    rng = np.random.default_rng([spec.seed, c])
    users = _split(spec.num_users, spec.chunks)
    rows = _split(spec.interactions - spec.bot_rows, spec.chunks)
    first_user = int(users[:c].sum())
    n_rows = int(rows[c])
    n_users = min(int(users[c]), n_rows)  # (only when users ~ rows: a chunk may lack one row)
    # lengths: at least one each, the rest shared by lognormal weights (largest remainder)
    lengths = np.ones(n_users, dtype=np.int64)
    extra = n_rows - n_users
    if extra > 0 and n_users:
        weights = rng.lognormal(0.0, 1.0, n_users)
        share = weights / weights.sum() * extra
        whole = np.floor(share).astype(np.int64)
        left = extra - int(whole.sum())
        whole[np.argsort(-(share - whole), kind="stable")[:left]] += 1
        lengths += whole
    bounds = (np.arange(spec.intents + 1, dtype=np.int64) * spec.num_items) // spec.intents
    sizes = np.diff(bounds)
    intent = rng.integers(0, spec.intents, n_users)
    owner = np.repeat(np.arange(n_users), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = int(lengths.sum())
    steps = rng.integers(1, 4, total)
    steps[starts] = rng.integers(0, sizes[intent])
    run = np.cumsum(steps)
    local = run - (run[starts] - steps[starts])[owner]
    item = bounds[intent][owner] + local % sizes[intent][owner]
    noisy = rng.random(total) < spec.noise
    item[noisy] = rng.integers(0, spec.num_items, int(noisy.sum()))
    first_ts = START_S + rng.integers(0, SPAN_S, n_users)
    gaps = 1 + rng.exponential(3600.0, total).astype(np.int64)
    gaps[starts] = 0
    grow = np.cumsum(gaps)
    ts = first_ts[owner] + grow - grow[starts][owner]
    user = first_user + owner

    # bots: their rows of this chunk, each bot's timestamps continuing from earlier chunks
    per_chunk = _split(spec.bot_rows, spec.chunks)
    if per_chunk[c] and spec.bots:
        bot_user, bot_item, bot_ts = [user], [item], [ts]
        for b, k in enumerate(_split(int(per_chunk[c]), spec.bots).tolist()):
            # rows of bot b in earlier chunks: its timestamps go on from there, one a second
            earlier = int((per_chunk[:c] // spec.bots + (b < per_chunk[:c] % spec.bots)).sum())
            bot_user.append(np.full(k, -1 - b, dtype=np.int64))
            bot_item.append(rng.integers(0, spec.num_items, k))
            bot_ts.append(START_S + earlier + np.arange(k, dtype=np.int64))
        user, item, ts = np.concatenate(bot_user), np.concatenate(bot_item), np.concatenate(bot_ts)
    event = rng.choice(len(EVENTS), size=len(user), p=EVENT_P).astype(np.int8)
    planted = {"user": np.arange(first_user, first_user + n_users), "intent": intent}
    return {"user": user, "item": item, "ts": ts, "event": event}, planted


def _with_noise_rows(
    spec: LogSpec, c: int, cols: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]]:
    """Append duplicates and malformed rows, then shuffle. Returns columns, the malformed kind
    of each row (-1: a valid row) and the counts."""
    rng = np.random.default_rng([spec.seed, c, 1])
    n = len(cols["user"])
    n_dup = round(spec.duplicate_share * n)
    n_bad = round(spec.malformed_share * n)
    dup = rng.choice(n, size=min(n_dup, n), replace=False) if n else np.zeros(0, np.int64)
    bad = rng.integers(0, n, n_bad) if n else np.zeros(0, np.int64)
    take = np.concatenate([np.arange(n), dup, bad])
    out = {k: v[take] for k, v in cols.items()}
    kinds = np.full(len(take), -1, dtype=np.int8)
    kinds[n + len(dup) :] = np.arange(n_bad) % len(spec.malformed_kinds)
    order = rng.permutation(len(take))
    out = {k: v[order] for k, v in out.items()}
    kinds = kinds[order]
    counts: dict[str, int] = {}
    for k, name in enumerate(spec.malformed_kinds):
        counts[name] = int(np.count_nonzero(kinds == k))
    return out, kinds, {"duplicates": len(dup), **counts}


def _ids(values: np.ndarray, prefix: str, bots: bool, int_ids: bool) -> pa.Array:
    """Index -> id: ``u17`` (strings) or 17 (integers); bots (negative) ``bot0`` / -1."""
    if int_ids:
        return pa.array(values, pa.int64())
    text = pc.binary_join_element_wise(prefix, pc.cast(pa.array(values), pa.string()), "")
    if bots and (values < 0).any():
        bot_text = pc.binary_join_element_wise(
            "bot", pc.cast(pa.array(-1 - values), pa.string()), ""
        )
        text = pc.if_else(pa.array(values < 0), bot_text, text)
    return text


def _table(
    spec: LogSpec, cols: dict[str, np.ndarray], kinds: np.ndarray
) -> tuple[pa.Table, list[str]]:
    """The chunk as a table of the file's column types, malformed rows applied. Rows that a
    table cannot express (wrong column count, malformed JSON) come back as raw text lines."""
    kind = {name: kinds == k for k, name in enumerate(spec.malformed_kinds)}
    none = np.zeros(len(kinds), dtype=bool)
    user = _ids(cols["user"], "u", True, spec.int_ids)
    item = _ids(cols["item"], "i", False, spec.int_ids)
    user = pc.if_else(pa.array(kind.get("null_user", none)), pa.scalar(None, user.type), user)
    item = pc.if_else(pa.array(kind.get("null_item", none)), pa.scalar(None, item.type), item)
    ts = cols["ts"].copy()
    ts[kind.get("negative_timestamp", none)] *= -1
    ts[kind.get("future_timestamp", none)] = FUTURE_S
    if spec.time_format == "epoch_ms":
        ts = ts * 1000 + (np.abs(cols["user"]) % 1000)  # ms that differ from a plain second count
    if spec.time_format == "iso8601":
        stamp = pa.array(np.abs(ts) * 10**9, pa.timestamp("ns", "UTC"))
        time = pc.strftime(stamp, format="%Y-%m-%dT%H:%M:%SZ")
        time = pc.if_else(pa.array(ts < 0), "1969-12-31T23:59:59Z", time)
    elif spec.format == "parquet":
        time = pa.array(ts, pa.int64())
    else:
        time = pc.cast(pa.array(ts), pa.string())
    bad_time = kind.get("bad_timestamp", none) | kind.get("null_timestamp", none)
    if bad_time.any():
        filler = (
            pa.scalar(None, time.type)
            if pa.types.is_integer(time.type)
            else pa.scalar("not-a-time")
        )
        time = pc.if_else(pa.array(bad_time), filler, time)
    if spec.format == "ndjson":  # JSON text of the value: numbers bare, strings quoted
        quoted = pc.binary_join_element_wise('"', time, '"', "")
        numeric = pa.array(~bad_time) if spec.time_format != "iso8601" else pa.array(none)
        time = pc.if_else(numeric, time, quoted)
    event = pa.array(np.asarray(EVENTS)[cols["event"]].tolist(), pa.string())
    table = pa.table(dict(zip(COLUMNS, [user, item, time, event], strict=True)))
    raw_kind = kind.get("wrong_column_count", none) | kind.get("malformed_json", none)
    raw: list[str] = []
    if raw_kind.any():
        broken = table.filter(pa.array(raw_kind))
        table = table.filter(pa.array(~raw_kind))
        for row in broken.to_pylist():
            if spec.format == "ndjson":
                raw.append(json.dumps(row)[:-7])  # cut short: not valid JSON
            else:
                sep = "," if spec.format == "csv" else "\t"
                raw.append(sep.join(str(row[c]) for c in COLUMNS[:2]))  # two fields of four
    return table, raw


def _ndjson_lines(table: pa.Table) -> bytes:
    parts = []
    for name in COLUMNS:
        column = table.column(name).combine_chunks()
        if name == "timestamp":  # already JSON text
            text = column
        elif pa.types.is_string(column.type):
            text = pc.binary_join_element_wise('"', column, '"', "")
        else:
            text = pc.cast(column, pa.string())
        text = pc.fill_null(text, "null")
        parts.append(pc.binary_join_element_wise(f'"{name}": ', text, ""))
    body = pc.binary_join_element_wise(*parts, ", ")
    lines = pc.binary_join_element_wise("{", body, "}", "")
    return ("\n".join(lines.to_pylist()) + "\n").encode() if len(lines) else b""


def write_logs(url: str, spec: LogSpec, *, jobs: int = 1) -> dict[str, Any]:
    """Write the log under ``url``; returns the summary (also written as ``_summary.json``).

    Files are independent (file f holds a fixed range of chunks), so ``jobs`` processes write
    them in parallel with the same bytes as one.
    """
    spec.validate()
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root) and fs.ls(root):
        raise PrepError(f"{url} is not empty; choose a new folder for the log")
    fs.makedirs(root, exist_ok=True)
    if jobs > 1 and spec.files > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, spec.files), mp_context=context) as pool:
            parts = list(
                pool.map(_write_file, [url] * spec.files, [spec] * spec.files, range(spec.files))
            )
    else:
        parts = [_write_file(url, spec, f) for f in range(spec.files)]
    users = np.concatenate([p[1] for p in parts])
    intents = np.concatenate([p[2] for p in parts])
    planted = pa.table(
        {"user": _ids(users, "u", False, spec.int_ids), "intent": pa.array(intents, pa.int32())}
    )
    with fs.open(posixpath.join(root, PLANTED_NAME), "wb") as handle:
        pq.write_table(planted, handle, compression="zstd")
    totals: dict[str, int] = {}
    for counts, _, _ in parts:
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    summary = {
        "spec": asdict(spec),
        "users": len(users),
        "bots": [f"bot{b}" for b in range(spec.bots)]
        if not spec.int_ids
        else [-1 - b for b in range(spec.bots)],
        "items": spec.num_items,
        "interactions": spec.interactions,
        "rows": totals.get("rows", 0),
        "duplicates": totals.get("duplicates", 0),
        "malformed": {k: totals.get(k, 0) for k in spec.malformed_kinds},
    }
    with fs.open(posixpath.join(root, SUMMARY_NAME), "w") as handle:
        handle.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def _write_file(url: str, spec: LogSpec, f: int) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """File ``f`` (its share of the chunks): (counts, planted users, their intents)."""
    fs, root = fsspec.core.url_to_fs(url)
    ext = spec.format + (".gz" if spec.gzip else "")
    per_file = _split(spec.chunks, spec.files)
    first = int(per_file[:f].sum())
    totals: dict[str, int] = {"rows": 0}
    planted_users, planted_intents = [], []
    with fs.open(posixpath.join(root, f"part-{f:05d}.{ext}"), "wb") as raw_handle:
        handle: Any = pa.CompressedOutputStream(raw_handle, "gzip") if spec.gzip else raw_handle
        writer: Any = None
        for chunk in range(first, first + int(per_file[f])):
            cols, planted = _chunk(spec, chunk)
            cols, kinds, counts = _with_noise_rows(spec, chunk, cols)
            table, raw = _table(spec, cols, kinds)
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value
            totals["rows"] += len(kinds)
            planted_users.append(planted["user"])
            planted_intents.append(planted["intent"])
            tail = "".join(line + "\n" for line in raw).encode()
            if spec.format == "parquet":
                if writer is None:
                    writer = pq.ParquetWriter(handle, table.schema, compression="zstd")
                writer.write_table(table, row_group_size=1 << 20)
            elif spec.format == "ndjson":
                handle.write(_ndjson_lines(table) + tail)
            else:
                sink = io.BytesIO()
                options = pa_csv.WriteOptions(
                    include_header=writer is None,
                    delimiter="," if spec.format == "csv" else "\t",
                    quoting_style="needed",
                )
                pa_csv.write_csv(table, sink, write_options=options)
                handle.write(sink.getvalue() + tail)
                writer = True
        if isinstance(writer, pq.ParquetWriter):
            writer.close()
        if spec.gzip:
            handle.close()
    empty = np.zeros(0, np.int64)
    return (
        totals,
        np.concatenate(planted_users) if planted_users else empty,
        np.concatenate(planted_intents) if planted_intents else empty,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LogSpec()
    parser.add_argument(
        "--interactions", type=int, default=d.interactions, help="distinct valid events"
    )
    parser.add_argument(
        "--users", type=int, default=None, help="regular users (default interactions/40)"
    )
    parser.add_argument(
        "--items", type=int, default=None, help="catalogue size (default interactions/100)"
    )
    parser.add_argument("--intents", type=int, default=d.intents, help="planted intents")
    parser.add_argument(
        "--noise", type=float, default=d.noise, help="share of random off-intent items"
    )
    parser.add_argument(
        "--duplicate-share", type=float, default=d.duplicate_share, help="extra exact copies"
    )
    parser.add_argument(
        "--malformed-share", type=float, default=d.malformed_share, help="extra malformed rows"
    )
    parser.add_argument("--bots", type=int, default=d.bots, help="bot users with huge histories")
    parser.add_argument(
        "--bot-share", type=float, default=d.bot_share, help="share of interactions by bots"
    )
    parser.add_argument("--format", default=d.format, help="parquet | csv | tsv | ndjson")
    parser.add_argument("--gzip", action="store_true", help="gzip text files")
    parser.add_argument("--files", type=int, default=d.files, help="number of files")
    parser.add_argument("--time-format", default=d.time_format, help="epoch_s | epoch_ms | iso8601")
    parser.add_argument("--int-ids", action="store_true", help="integer ids instead of strings")
    parser.add_argument(
        "--chunk-rows", type=int, default=d.chunk_rows, help="rows generated at once"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="generator seed")
    parser.add_argument("--jobs", type=int, default=1, help="processes writing files in parallel")


def spec_from_args(args: argparse.Namespace) -> LogSpec:
    return LogSpec(
        interactions=args.interactions,
        users=args.users,
        items=args.items,
        intents=args.intents,
        noise=args.noise,
        duplicate_share=args.duplicate_share,
        malformed_share=args.malformed_share,
        bots=args.bots,
        bot_share=args.bot_share,
        format=args.format,
        gzip=args.gzip,
        files=args.files,
        time_format=args.time_format,
        int_ids=args.int_ids,
        chunk_rows=args.chunk_rows,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="folder for the log files (local or URL)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = write_logs(args.output, spec_from_args(args), jobs=args.jobs)
    except PrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: {summary['rows']:,} rows ({summary['interactions']:,} events, "
        f"{summary['duplicates']:,} duplicates, {sum(summary['malformed'].values()):,} malformed)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
