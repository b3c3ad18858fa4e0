"""Row validation: a raw batch -> keyed rows, plus rejected rows with the reason for each.

A row is rejected for the first of these that applies (``REASONS`` is the order):

- ``wrong_column_count`` (CSV/TSV) or ``malformed_json`` (NDJSON): found by the readers;
- ``null_user`` / ``bad_user``: no id (null or empty), or one that cannot be an id (a JSON
  object, an unsigned integer beyond int64); the same for ``item``;
- ``null_timestamp``, ``bad_timestamp`` (unparsable, NaN), ``negative_timestamp`` (before
  1970), ``future_timestamp`` (after the cutoff: ``max_time`` or the file's mtime + 1 day).

Rows whose event is not one of ``events`` are *filtered* (counted, not rejected) before the
checks. Timestamps become int64 nanoseconds since the epoch (UTC); a float epoch keeps the
precision of a float64 (about 0.25 us for present-day times).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.build.inputs import BAD_VALUE, RawBatch
from data_prep.build.keys import string_keys

REASONS = (
    "wrong_column_count",
    "malformed_json",
    "null_user",
    "bad_user",
    "null_item",
    "bad_item",
    "null_timestamp",
    "bad_timestamp",
    "negative_timestamp",
    "future_timestamp",
)
CODE = {reason: i + 1 for i, reason in enumerate(REASONS)}
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),  # 1-based row (text: line) number in the source file
        ("reason", pa.string()),
        ("user", pa.string()),
        ("item", pa.string()),
        ("time", pa.string()),
        ("event", pa.string()),
        ("raw", pa.string()),  # the unparsable line, for wrong_column_count / malformed_json
    ]
)
_UNIT_NS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
_ZONED = r"[T ][0-9]{2}(:[0-9]{2}(:[0-9]{2}([.,][0-9]+)?)?)?(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)$"
_DECIMAL = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"


@dataclass
class Cleaned:
    """The valid rows of a batch as keys, and what was rejected or filtered."""

    user: np.ndarray  # [n] int64 keys
    item: np.ndarray  # [n] int64 keys
    time: np.ndarray  # [n] int64 ns
    event: np.ndarray | None  # [n] int16 index into the sorted kept events
    user_text: pl.Series | None  # [n] original string ids (string columns only)
    item_text: pl.Series | None
    rejected: pa.Table | None  # QUARANTINE_SCHEMA
    reasons: dict[str, int]
    filtered: int
    rows_read: int


@dataclass(frozen=True)
class CleanSpec:
    """What the cleaner needs to know, fixed by the plan."""

    user_kind: str  # int | string
    item_kind: str
    time_format: str  # epoch_s ... | iso8601
    epoch_unit_ns: int
    events: tuple[str, ...]  # sorted; empty: no event filter


def clean_batch(batch: RawBatch, spec: CleanSpec, *, source: str, cutoff_ns: int) -> Cleaned:
    frame, rows = batch.table, batch.rows
    rows_read = frame.height + len(batch.malformed)
    filtered = 0
    event_codes = None
    if spec.events:
        events = frame["event"].cast(pl.String)
        keep = events.is_in(list(spec.events)).fill_null(False).to_numpy()
        filtered = frame.height - int(keep.sum())
        if filtered:
            frame, rows, events = frame.filter(keep), rows[keep], events.filter(keep)
        codes = dict(zip(spec.events, range(len(spec.events)), strict=True))
        event_codes = events.replace_strict(codes, return_dtype=pl.Int16).to_numpy()

    user, user_text, user_code = _ids(frame["user"], spec.user_kind, "user", batch.odd_values)
    item, item_text, item_code = _ids(frame["item"], spec.item_kind, "item", batch.odd_values)
    time, time_code = parse_time(frame["time"], spec, cutoff_ns)
    code = np.where(user_code != 0, user_code, np.where(item_code != 0, item_code, time_code))
    bad = code != 0

    reasons: dict[str, int] = {}
    for _, reason, _ in batch.malformed:
        reasons[reason] = reasons.get(reason, 0) + 1
    rejected_parts = []
    if batch.malformed:
        rejected_parts.append(_malformed_table(batch.malformed, source))
    good = None
    if bad.any():
        where = np.flatnonzero(bad)
        counts = np.bincount(code[where], minlength=len(REASONS) + 1)
        for reason in REASONS:
            if counts[CODE[reason]]:
                reasons[reason] = reasons.get(reason, 0) + int(counts[CODE[reason]])
        rejected_parts.append(_rejected_table(frame[where], rows[where], code[where], source))
        good = np.flatnonzero(~bad)

    def pick(array: np.ndarray) -> np.ndarray:
        return array if good is None else array[good]

    def pick_text(text: pl.Series | None) -> pl.Series | None:
        return text if text is None or good is None else text.gather(good)

    return Cleaned(
        user=pick(user),
        item=pick(item),
        time=pick(time),
        event=None if event_codes is None else pick(event_codes),
        user_text=pick_text(user_text),
        item_text=pick_text(item_text),
        rejected=pa.concat_tables(rejected_parts) if rejected_parts else None,
        reasons=reasons,
        filtered=filtered,
        rows_read=rows_read,
    )


def _ids(
    column: pl.Series, kind: str, role: str, odd_values: bool = False
) -> tuple[np.ndarray, pl.Series | None, np.ndarray]:
    """(keys [n] int64, original strings [n] or None, reason codes [n] int8)."""
    n = len(column)
    code = np.zeros(n, dtype=np.int8)
    if kind == "int":
        code[column.is_null().to_numpy()] = CODE[f"null_{role}"]
        keys = column.cast(pl.Int64, strict=False)  # only a UInt64 beyond int64 turns null here
        code[(keys.is_null() & column.is_not_null()).to_numpy()] = CODE[f"bad_{role}"]
        return keys.fill_null(0).to_numpy(), None, code
    text = column.cast(pl.String)  # integers (reconciled) become their decimal strings
    empty = (text.is_null() | (text.str.len_bytes() == 0)).to_numpy()
    code[empty] = CODE[f"null_{role}"]
    if odd_values:  # only the NDJSON line-by-line reader marks values
        code[(text == BAD_VALUE).fill_null(False).to_numpy()] = CODE[f"bad_{role}"]
    return string_keys(text, integers_by_value=role == "user"), text, code


def parse_time(column: pl.Series, spec: CleanSpec, cutoff_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """(nanoseconds [n] int64, reason codes [n] int8) of a time column of any supported type."""
    dtype = column.dtype
    if isinstance(dtype, pl.Datetime):
        return _from_ints(column.cast(pl.Int64), _UNIT_NS[dtype.time_unit or "us"], cutoff_ns)
    if dtype == pl.Date:
        return _from_ints(column.cast(pl.Int32).cast(pl.Int64), 86_400 * 10**9, cutoff_ns)
    if dtype.is_integer():
        if dtype == pl.UInt64:
            column = column.clip(upper_bound=2**63 - 1)
        return _from_ints(column.cast(pl.Int64), spec.epoch_unit_ns, cutoff_ns)
    if dtype.is_float():
        return _from_floats(column.cast(pl.Float64), spec.epoch_unit_ns, cutoff_ns)
    if dtype == pl.Null:
        return np.zeros(len(column), np.int64), np.full(
            len(column), CODE["null_timestamp"], np.int8
        )
    text = column.cast(pl.String)
    if spec.time_format == "iso8601":
        return _from_iso(text.to_arrow(), cutoff_ns)
    return _from_epoch_text(text, spec.epoch_unit_ns, cutoff_ns)


def _from_ints(values: pl.Series, unit_ns: int, cutoff_ns: int) -> tuple[np.ndarray, np.ndarray]:
    valid = values.is_not_null().to_numpy()
    raw = values.fill_null(0).to_numpy().astype(np.int64, copy=False)
    code = np.zeros(len(raw), dtype=np.int8)
    code[~valid] = CODE["null_timestamp"]
    code[valid & (raw < 0)] = CODE["negative_timestamp"]
    code[valid & (raw > cutoff_ns // unit_ns)] = CODE["future_timestamp"]
    ns = np.where(code == 0, raw, 0) * np.int64(unit_ns)  # no overflow: checked against the cutoff
    return ns, code


def _from_floats(values: pl.Series, unit_ns: int, cutoff_ns: int) -> tuple[np.ndarray, np.ndarray]:
    valid = values.is_not_null().to_numpy()
    scaled = values.fill_null(0.0).to_numpy() * float(unit_ns)
    code = np.zeros(len(scaled), dtype=np.int8)
    code[~valid] = CODE["null_timestamp"]
    finite = np.isfinite(scaled)
    code[valid & ~finite] = CODE["bad_timestamp"]
    with np.errstate(invalid="ignore"):
        code[(code == 0) & (scaled < 0)] = CODE["negative_timestamp"]
        code[(code == 0) & (scaled > float(cutoff_ns))] = CODE["future_timestamp"]
    ns = np.where(code == 0, np.round(np.where(finite, scaled, 0.0)), 0.0).astype(np.int64)
    return ns, code


def _from_epoch_text(
    text: pl.Series, unit_ns: int, cutoff_ns: int
) -> tuple[np.ndarray, np.ndarray]:
    ints = text.str.to_integer(strict=False)
    is_int = ints.is_not_null().to_numpy()
    ns, code = _from_ints(ints.fill_null(0), unit_ns, cutoff_ns)
    code[~is_int] = 0
    rest = ~is_int & text.is_not_null().to_numpy()
    decimal = rest & text.str.contains(_DECIMAL).fill_null(False).to_numpy()
    if decimal.any():
        floats = text.filter(decimal).cast(pl.Float64, strict=False)
        ns[decimal], code[decimal] = _from_floats(
            floats.fill_null(float("nan")), unit_ns, cutoff_ns
        )
    code[rest & ~decimal] = CODE["bad_timestamp"]
    code[text.is_null().to_numpy()] = CODE["null_timestamp"]
    ns[code != 0] = 0
    return ns, code


def _from_iso(text: pa.Array, cutoff_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """ISO-8601 date or date-time, fraction and zone optional (no zone: UTC)."""
    n = len(text)
    ns = np.zeros(n, dtype=np.int64)
    code = np.zeros(n, dtype=np.int8)
    valid = text.is_valid().to_numpy(zero_copy_only=False)
    code[~valid] = CODE["null_timestamp"]
    zoned = pc.fill_null(pc.match_substring_regex(text, _ZONED), False).to_numpy(
        zero_copy_only=False
    )
    for group, target in (
        (valid & zoned, pa.timestamp("ns", "UTC")),
        (valid & ~zoned, pa.timestamp("ns")),
    ):
        where = np.flatnonzero(group)
        if not len(where):
            continue
        part = text.take(pa.array(where))
        try:
            parsed = pc.cast(part, target).cast(pa.int64()).to_numpy(zero_copy_only=False)
            ns[where] = parsed
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        for k, value in zip(
            where.tolist(), part.to_pylist(), strict=True
        ):  # rare: find the bad ones
            ns[k], code[k] = _one_iso(value, target)
    ok = code == 0
    code[ok & (ns < 0)] = CODE["negative_timestamp"]
    code[ok & (ns > cutoff_ns)] = CODE["future_timestamp"]
    ns[code != 0] = 0
    return ns, code


def _one_iso(value: str, target: pa.DataType) -> tuple[int, int]:
    """One ISO string: (ns, 0), or a reason for one that fails (out of the ns range: by sign)."""
    try:
        return int(pc.cast(pa.array([value]), target).cast(pa.int64())[0].as_py()), 0
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    wide = pa.timestamp("s", target.tz)
    try:
        seconds = int(pc.cast(pa.array([value]), wide).cast(pa.int64())[0].as_py())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return 0, CODE["bad_timestamp"]
    return 0, CODE["negative_timestamp"] if seconds < 0 else CODE["future_timestamp"]


def _malformed_table(malformed: list[tuple[int | None, str, str]], source: str) -> pa.Table:
    n = len(malformed)
    return pa.table(
        {
            "source": pa.array([source] * n, pa.string()),
            "row": pa.array([m[0] for m in malformed], pa.int64()),
            "reason": pa.array([m[1] for m in malformed], pa.string()),
            "user": pa.nulls(n, pa.string()),
            "item": pa.nulls(n, pa.string()),
            "time": pa.nulls(n, pa.string()),
            "event": pa.nulls(n, pa.string()),
            "raw": pa.array([m[2] for m in malformed], pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )


def _rejected_table(
    picked: pl.DataFrame, rows: np.ndarray, codes: np.ndarray, source: str
) -> pa.Table:
    n = picked.height

    def text(role: str) -> pa.Array:
        if role not in picked.columns:
            return pa.nulls(n, pa.string())
        values = picked[role].cast(pl.String)
        values = pl.select(
            pl.when(values == BAD_VALUE).then(pl.lit("<not a scalar>")).otherwise(values)
        ).to_series()
        return values.to_arrow().cast(pa.string())

    return pa.table(
        {
            "source": pa.array([source] * n, pa.string()),
            "row": pa.array(rows, pa.int64()),
            "reason": pa.array(np.asarray(REASONS, dtype=object)[codes - 1].tolist(), pa.string()),
            "user": text("user"),
            "item": text("item"),
            "time": text("time"),
            "event": text("event"),
            "raw": pa.nulls(n, pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )
