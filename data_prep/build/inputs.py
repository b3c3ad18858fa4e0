"""Input files: listing, format detection, schema probing and reconciliation, batch readers.

Every reader yields ``RawBatch``es holding the configured columns under the fixed names ``user``,
``item``, ``time`` (and ``event``), with each row's 1-based row number in its file (for text
formats: its line number, header included) and the rows that could not be parsed at all
(``wrong_column_count``, ``malformed_json``). Memory per reader is one batch.

Id columns are integers (Parquet integer types) or strings (Parquet strings, every CSV/TSV
field, JSON strings and integers). Files that disagree are refused by name, or with
``on_schema_mismatch: reconcile`` the integers are read as their decimal strings.

A file that cannot be decoded (truncated or corrupt Parquet, broken gzip) is a ``PrepError``
naming it; a failure of the storage underneath (a network error while reading) keeps its own
type, so the entry point exits with the retryable code.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from data_prep.build.config import BuildConfig
from data_prep.writer import PrepError

EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "ndjson",
}
NDJSON_BLOCK = 16 << 20  # bytes of text parsed at once
RAW_TEXT_LIMIT = 2000  # characters of a malformed line kept in the quarantine


@dataclass(frozen=True)
class InputFile:
    url: str  # as given to fsspec (protocol kept)
    format: str  # parquet | csv | tsv | ndjson
    gzip: bool
    bytes: int
    mtime_ns: int | None  # modification time, when the filesystem reports one
    rows: int | None = None  # Parquet: from the footer


@dataclass
class RawBatch:
    table: pl.DataFrame  # columns user, item, time[, event] as read
    rows: np.ndarray  # [n] int64, 1-based row (line) numbers in the file
    malformed: list[tuple[int | None, str, str]] = field(default_factory=list)  # (row, reason, raw)
    odd_values: bool = False  # some values are BAD_VALUE (JSON values of the wrong kind)


def columns_of(config: BuildConfig) -> dict[str, str]:
    """Role -> column name in the input."""
    names = {"user": config.user_col, "item": config.item_col, "time": config.time_col}
    if config.event_col is not None:
        names["event"] = config.event_col
    return names


# --- listing --------------------------------------------------------------------------------


def _protocol_prefix(pattern: str) -> str:
    head, sep, _ = pattern.partition("://")
    return f"{head}://" if sep else ""


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def _format_of(path: str, wanted: str) -> tuple[str | None, bool]:
    name = posixpath.basename(path).lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if wanted != "auto":
        return wanted, gz
    return EXTENSIONS.get(posixpath.splitext(name)[1]), gz


def _mtime_ns(info: dict[str, Any]) -> int | None:
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return round(value.timestamp() * 1e6) * 1000
    return round(float(value) * 1e6) * 1000


def list_inputs(
    pattern: str, wanted_format: str = "auto", *, output: str | None = None
) -> list[InputFile]:
    """The input files named by a glob, a folder (every log file under it) or a single file.

    Names starting with ``_`` or ``.`` are skipped (``_SUCCESS``, side files). Sorted by URL.
    An ``output`` folder inside an input folder, or matched by the glob, is refused: the
    dataset would be read back as input on the next run.
    """
    fs, path = fsspec.core.url_to_fs(pattern)
    prefix = _protocol_prefix(pattern)
    out_path = fsspec.core.url_to_fs(output)[1].rstrip("/") + "/" if output else None
    if out_path and fs.isdir(path) and out_path.startswith(path.rstrip("/") + "/"):
        raise PrepError(
            f"--output {output} is inside (or is) the --input folder {pattern}; put it elsewhere"
        )
    if any(ch in path for ch in "*?["):
        found = fs.glob(path, detail=True)
        candidates = {p: i for p, i in found.items() if i.get("type") == "file"}
        explicit = False
    elif fs.isdir(path):
        candidates = fs.find(path, detail=True)
        candidates = {
            p: i
            for p, i in candidates.items()
            if not any(_hidden(part) for part in posixpath.relpath(p, path).split("/"))
        }
        explicit = False
    elif fs.exists(path):
        candidates = {path: fs.info(path)}
        explicit = True
    else:
        raise PrepError(f"--input {pattern}: no such file or folder")
    files = []
    for p in sorted(candidates):
        info = candidates[p]
        if out_path and p.startswith(out_path):
            raise PrepError(f"--input {pattern} matches {prefix}{p}, inside --output {output}")
        if not explicit and _hidden(posixpath.basename(p)):
            continue
        fmt, gz = _format_of(p, wanted_format)
        if fmt is None:
            if explicit or any(ch in path for ch in "*?["):
                raise PrepError(
                    f"{prefix}{p}: cannot tell the format from the name; use .parquet, .csv, "
                    f".tsv, .ndjson or .jsonl (optionally .gz), or set format"
                )
            continue  # a folder may hold other files; only log files are read
        if fmt == "parquet" and gz:
            raise PrepError(
                f"{prefix}{p}: gzip around Parquet is not supported (Parquet compresses itself)"
            )
        files.append(
            InputFile(
                url=prefix + p if prefix else p,
                format=fmt,
                gzip=gz,
                bytes=int(info.get("size") or 0),
                mtime_ns=_mtime_ns(info),
            )
        )
    if not files:
        raise PrepError(f"--input {pattern}: no input files match")
    return files


# --- storage errors vs. bad data -------------------------------------------------------------


class _Tracked(io.RawIOBase):
    """A read-only file that remembers the storage errors it raised.

    Decoders (pyarrow) turn any failure into their own exceptions; this tells a network error
    (retryable) apart from a truncated or corrupt file (permanent).
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.io_error: BaseException | None = None

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            self.io_error = exc
            raise

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._guard(self._handle.read, size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guard(self._handle.seek, offset, whence)

    def tell(self) -> int:
        return self._guard(self._handle.tell)

    def close(self) -> None:
        self._handle.close()
        super().close()


def _open_tracked(url: str) -> _Tracked:
    return _Tracked(fsspec.open(url, "rb").open())


def _decode_error(file: InputFile, tracked: _Tracked, exc: BaseException) -> BaseException:
    if tracked.io_error is not None:
        return tracked.io_error
    what = {"parquet": "Parquet", "csv": "CSV", "tsv": "TSV", "ndjson": "NDJSON"}[file.format]
    gz = " (gzip)" if file.gzip else ""
    return PrepError(f"{file.url}: cannot read as {what}{gz}, truncated or corrupt? {exc}")


DECODE_ERRORS = (pa.ArrowException, OSError, EOFError, ValueError)


def _text_stream(file: InputFile, tracked: _Tracked) -> Any:
    raw = pa.PythonFile(tracked, mode="r")
    return pa.CompressedInputStream(raw, "gzip") if file.gzip else raw


# --- schema probing ------------------------------------------------------------------------


def id_kind(dtype: pa.DataType) -> str | None:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_integer(dtype):
        return "int"
    if (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_string_view(dtype)
    ):
        return "string"
    return None


def time_kind(dtype: pa.DataType) -> str | None:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_floating(dtype):
        return "float"
    if id_kind(dtype) == "string":
        return "string"
    if pa.types.is_timestamp(dtype):
        return "timestamp"
    if pa.types.is_date(dtype):
        return "date"
    return None


def probe(file: InputFile, config: BuildConfig) -> tuple[InputFile, dict[str, str]]:
    """Check that ``file`` holds the configured columns; return it (with Parquet row count) and
    the kind of each column (``int``/``string``/... or ``text`` for values typed per row)."""
    names = columns_of(config)
    tracked = _open_tracked(file.url)
    try:
        if file.format == "parquet":
            try:
                meta = pq.ParquetFile(tracked).metadata
                schema = meta.schema.to_arrow_schema()
            except DECODE_ERRORS as exc:
                raise _decode_error(file, tracked, exc) from None
            missing = [c for c in names.values() if c not in schema.names]
            if missing:
                raise PrepError(
                    f"{file.url}: no column(s) {', '.join(map(repr, missing))} "
                    f"(columns: {', '.join(schema.names)})"
                )
            kinds = {}
            for role, name in names.items():
                dtype = schema.field(name).type
                kind = time_kind(dtype) if role == "time" else id_kind(dtype)
                if role == "event":
                    kind = "string" if id_kind(dtype) else None
                if kind is None:
                    expected = (
                        "timestamps" if role == "time"
                        else "ids" if role != "event"
                        else "event names"
                    )
                    raise PrepError(
                        f"{file.url}: column {name!r} ({role}) has type {dtype}, which cannot "
                        f"hold {expected}"
                    )
                kinds[role] = kind
            return InputFile(**{**file.__dict__, "rows": int(meta.num_rows)}), kinds
        header = _first_line(file, tracked)
        if file.format in ("csv", "tsv"):
            delimiter = "," if file.format == "csv" else "\t"
            present = next(csv.reader([header], delimiter=delimiter), [])
            missing = [c for c in names.values() if c not in present]
            if missing:
                raise PrepError(
                    f"{file.url}: the header has no column(s) {', '.join(map(repr, missing))} "
                    f"(header: {header[:200]!r})"
                )
            return file, {role: "string" for role in names}
        if header:
            try:
                first = json.loads(header)
            except json.JSONDecodeError:
                first = None  # the first line itself is malformed: quarantined when read
            if isinstance(first, dict):
                missing = [c for c in names.values() if c not in first]
                if missing:
                    raise PrepError(
                        f"{file.url}: the first record has no field(s) "
                        f"{', '.join(map(repr, missing))} (fields: {', '.join(first)})"
                    )
        return file, {**{role: "string" for role in names}, "time": "text"}
    finally:
        tracked.close()


def _first_line(file: InputFile, tracked: _Tracked) -> str:
    stream = _text_stream(file, tracked)
    data = b""
    try:
        while b"\n" not in data:
            chunk = stream.read(64 << 10)
            if not chunk:
                break
            data += chunk
            if len(data) > 16 << 20:
                break
    except DECODE_ERRORS as exc:
        raise _decode_error(file, tracked, exc) from None
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if data.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    return line.decode("utf-8", errors="replace")


def reconcile(
    probed: list[tuple[InputFile, dict[str, str]]], config: BuildConfig
) -> tuple[dict[str, str], list[str]]:
    """One kind per id column for the whole job, plus notes on what was reconciled.

    Integers in one file and strings in another are refused by name, or read as decimal
    strings with ``on_schema_mismatch: reconcile``. Time columns are parsed file by file
    (each file's own type), but ISO-8601 cannot be read from numbers.
    """
    kinds: dict[str, str] = {}
    notes: list[str] = []
    names = columns_of(config)
    for role in ("user", "item"):
        by_kind: dict[str, str] = {}
        for file, found in probed:
            by_kind.setdefault(found[role], file.url)
        if len(by_kind) == 1:
            kinds[role] = next(iter(by_kind))
            continue
        message = (
            f"column {names[role]!r} holds integers in {by_kind['int']} but strings in "
            f"{by_kind['string']}"
        )
        if config.on_schema_mismatch == "refuse":
            raise PrepError(
                f"{message}; set on_schema_mismatch: reconcile (--on-schema-mismatch reconcile) "
                f"to read the integers as decimal strings"
            )
        kinds[role] = "string"
        notes.append(f"{message}: integers read as decimal strings")
    if config.time_format == "iso8601":
        for file, found in probed:
            if found["time"] in ("int", "float"):
                raise PrepError(
                    f"{file.url}: column {config.time_col!r} holds numbers, but time_format is "
                    f"iso8601; set time_format to the epoch unit (epoch_s, epoch_ms, ...)"
                )
    kinds["time"] = "per-file"
    if "event" in names:
        kinds["event"] = "string"
    return kinds, notes


# --- readers -------------------------------------------------------------------------------


def iter_batches(file: InputFile, config: BuildConfig) -> Iterator[RawBatch]:
    """The rows of ``file`` in order, ``config.batch_rows`` at a time (roughly, for text).

    Local Parquet goes through Polars' reader (no Arrow-to-Polars copy of the strings); other
    files through pyarrow on an fsspec file. A Parquet file must yield exactly the rows its
    footer announces.
    """
    if file.format == "parquet" and "://" not in file.url:
        yield from _checked(file, _local_parquet_batches(file, config))
        return
    tracked = _open_tracked(file.url)
    try:
        if file.format == "parquet":
            yield from _checked(file, _parquet_batches(file, tracked, config))
        elif file.format in ("csv", "tsv"):
            yield from _csv_batches(file, tracked, config)
        else:
            yield from _ndjson_batches(file, tracked, config)
    finally:
        tracked.close()


def _renamed(table: pa.Table, names: dict[str, str]) -> pl.DataFrame:
    frame = pl.from_arrow(pa.table({role: table.column(name) for role, name in names.items()}))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _checked(file: InputFile, batches: Iterator[RawBatch]) -> Iterator[RawBatch]:
    seen = 0
    for batch in batches:
        seen += batch.table.height
        yield batch
    if file.rows is not None and seen != file.rows:
        raise PrepError(
            f"{file.url}: read {seen:,} rows, the footer says {file.rows:,} (reader bug?)"
        )


def _local_parquet_batches(file: InputFile, config: BuildConfig) -> Iterator[RawBatch]:
    names = columns_of(config)
    first = 1
    query = pl.scan_parquet(file.url).select(
        [pl.col(name).alias(role) for role, name in names.items()]
    )
    try:
        for frame in query.collect_batches(chunk_size=config.batch_rows, maintain_order=True):
            yield RawBatch(frame, np.arange(first, first + frame.height, dtype=np.int64))
            first += frame.height
    except pl.exceptions.PolarsError as exc:
        raise PrepError(
            f"{file.url}: cannot read as Parquet, truncated or corrupt? {exc}"
        ) from None


def _parquet_batches(file: InputFile, tracked: _Tracked, config: BuildConfig) -> Iterator[RawBatch]:
    names = columns_of(config)
    first = 1
    try:
        reader = pq.ParquetFile(tracked)
        batches = reader.iter_batches(batch_size=config.batch_rows, columns=list(names.values()))
        for batch in batches:
            frame = _renamed(pa.Table.from_batches([batch]), names)
            rows = np.arange(first, first + frame.height, dtype=np.int64)
            first += frame.height
            yield RawBatch(frame, rows)
    except DECODE_ERRORS as exc:
        raise _decode_error(file, tracked, exc) from None


def _csv_batches(file: InputFile, tracked: _Tracked, config: BuildConfig) -> Iterator[RawBatch]:
    names = columns_of(config)
    bad: list[tuple[int | None, str, str]] = []

    def on_invalid(row: Any) -> str:
        bad.append((row.number, "wrong_column_count", str(row.text)[:RAW_TEXT_LIMIT]))
        return "skip"

    # Single-threaded parsing: pyarrow then reports the line number of each invalid row.
    read_options = pa_csv.ReadOptions(
        use_threads=False, block_size=max(1 << 20, config.batch_rows * 48)
    )
    parse_options = pa_csv.ParseOptions(
        delimiter="," if file.format == "csv" else "\t",
        invalid_row_handler=on_invalid,
        ignore_empty_lines=False,
    )
    convert_options = pa_csv.ConvertOptions(
        include_columns=list(names.values()),
        column_types={name: pa.string() for name in names.values()},
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=True,
    )
    # pyarrow parses ahead of the batch it yields, so invalid rows may be reported before the
    # batch they sit in; the valid rows of a batch are the next line numbers not reported.
    next_line = 2  # line 1 is the header; blank lines are rows of nulls, so numbers stay exact
    try:
        reader = pa_csv.open_csv(
            _text_stream(file, tracked),
            read_options=read_options,
            parse_options=parse_options,
            convert_options=convert_options,
        )
        for batch in reader:
            n = batch.num_rows
            skipped = np.asarray(sorted(r for r, _, _ in bad if r is not None), dtype=np.int64)
            candidates = np.arange(next_line, next_line + n + len(skipped), dtype=np.int64)
            candidates = candidates[~np.isin(candidates, skipped)]
            rows = candidates[:n]
            end = int(rows[-1]) + 1 if n else next_line
            mine = [b for b in bad if b[0] is not None and b[0] < end]
            bad = [b for b in bad if not (b[0] is not None and b[0] < end)]
            next_line = end
            yield RawBatch(_renamed(pa.Table.from_batches([batch]), names), rows, mine)
        if bad:
            yield RawBatch(_renamed(_empty(names), names), np.zeros(0, np.int64), bad)
    except DECODE_ERRORS as exc:
        raise _decode_error(file, tracked, exc) from None


def _empty(names: dict[str, str]) -> pa.Table:
    return pa.table({name: pa.array([], pa.string()) for name in names.values()})


def _ndjson_batches(file: InputFile, tracked: _Tracked, config: BuildConfig) -> Iterator[RawBatch]:
    names = columns_of(config)
    stream = _text_stream(file, tracked)
    pending = b""
    line_no = 0  # lines consumed before ``pending``
    try:
        while True:
            chunk = stream.read(NDJSON_BLOCK)
            data = pending + chunk
            if not chunk:
                block, pending = data, b""
            else:
                cut = data.rfind(b"\n")
                if cut < 0:
                    pending = data
                    continue
                block, pending = data[: cut + 1], data[cut + 1 :]
            if block:
                lines = block.split(b"\n")
                if lines and lines[-1] == b"":
                    lines.pop()
                yield _ndjson_block(lines, line_no, names)
                line_no += len(lines)
            if not chunk:
                return
    except DECODE_ERRORS as exc:
        raise _decode_error(file, tracked, exc) from None


def _ndjson_block(lines: list[bytes], line_no: int, names: dict[str, str]) -> RawBatch:
    kept = [i for i, line in enumerate(lines) if line.strip()]
    rows = np.asarray(kept, dtype=np.int64) + line_no + 1
    if not kept:
        return RawBatch(_frame(_empty_roles(names)), rows)
    body = b"\n".join(lines[i] for i in kept) + b"\n"
    try:
        table = pa_json.read_json(
            pa.BufferReader(body),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=max(len(body), 1 << 20)),
            parse_options=pa_json.ParseOptions(unexpected_field_behavior="ignore"),
        )
        if table.num_rows == len(kept):
            columns = {}
            for role, name in names.items():
                column = table.column(name) if name in table.column_names else None
                columns[role] = _json_fast_column(role, column, len(kept))
            if all(c is not None for c in columns.values()):
                return RawBatch(_frame(pa.table(columns)), rows)
    except pa.ArrowInvalid:
        pass
    return _ndjson_slow(lines, kept, rows, names)


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _empty_roles(names: dict[str, str]) -> pa.Table:
    return pa.table({role: pa.array([], pa.string()) for role in names})


def _json_fast_column(role: str, column: pa.ChunkedArray | None, n: int) -> pa.Array | None:
    """A column as parsed by pyarrow when its type is one the slow path would give too."""
    if column is None:
        return pa.nulls(n, pa.string())
    dtype = column.type
    if pa.types.is_null(dtype):
        return pa.nulls(n, pa.string())
    if role == "time":
        if pa.types.is_int64(dtype) or pa.types.is_float64(dtype) or pa.types.is_string(dtype):
            return column.combine_chunks()
        return None
    if pa.types.is_string(dtype):
        return column.combine_chunks()
    if pa.types.is_int64(dtype) and role != "event":
        return column.combine_chunks().cast(pa.string())
    return None


def _ndjson_slow(
    lines: list[bytes], kept: list[int], rows: np.ndarray, names: dict[str, str]
) -> RawBatch:
    """Line by line: malformed lines go to the quarantine, odd values become bad rows."""
    good_rows: list[int] = []
    values: dict[str, list[Any]] = {role: [] for role in names}
    malformed: list[tuple[int | None, str, str]] = []
    for row, index in zip(rows.tolist(), kept, strict=True):
        text = lines[index]
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            malformed.append(
                (row, "malformed_json", text.decode("utf-8", "replace")[:RAW_TEXT_LIMIT])
            )
            continue
        good_rows.append(row)
        for role, name in names.items():
            values[role].append(_json_scalar(role, record.get(name)))
    columns = {}
    for role, vals in values.items():
        if role == "time":
            numeric = all(v is None or isinstance(v, int | float) for v in vals)
            if numeric and any(isinstance(v, float) for v in vals):
                columns[role] = pa.array(
                    [None if v is None else float(v) for v in vals], pa.float64()
                )
            elif numeric:
                columns[role] = pa.array(vals, pa.int64())
            else:
                columns[role] = pa.array(
                    [None if v is None else _as_text(v) for v in vals], pa.string()
                )
        else:
            columns[role] = pa.array(vals, pa.string())
    odd = any(v == BAD_VALUE for vals in values.values() for v in vals)
    return RawBatch(
        _frame(pa.table(columns)), np.asarray(good_rows, dtype=np.int64), malformed, odd
    )


def _json_scalar(role: str, value: Any) -> Any:
    if value is None:
        return None
    if role == "time":
        if isinstance(value, bool):
            return BAD_VALUE
        if isinstance(value, int | float | str):
            return value
        return BAD_VALUE
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and role != "event":
        return str(value)
    if role == "event" and isinstance(value, int | float | bool):
        return json.dumps(value)
    return BAD_VALUE


# A marker no real id or time can equal: the cleaner quarantines it as bad_<role>.
BAD_VALUE = "\x00bad-json-value\x00"


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)
