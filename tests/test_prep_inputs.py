"""Input formats and bad input of the raw-log build: every rejected row lands in the quarantine
with its reason and line, thresholds fail clearly, schemas that disagree are refused by name or
reconciled, truncated or corrupt files are named."""

from __future__ import annotations

import gzip
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prep_reference import build, decode, stats, write_csv, write_parquet

from data_prep.build.cli import main
from elcrec_dist.prepared import MANIFEST_NAME

LOOSE = ("--min-user-interactions", "4", "--min-item-interactions", "1", "--max-reject-share", "1")
HEADER = ["user_id", "item_id", "timestamp"]
GOOD: list[list[object]] = [["u", f"i{k}", 100 + k] for k in range(5)]


def quarantine(out: Path) -> list[tuple[int, str, str | None, str | None]]:
    frame = pl.read_parquet(out / "quarantine" / "*.parquet").sort("row")
    return frame.select("row", "reason", "time", "raw").rows()


def test_every_reason_is_quarantined_with_its_line(tmp_path: Path) -> None:
    bad: list[list[object]] = [
        ["", "i1", 1],  # line 7: null_user
        ["u", "", 2],  # line 8: null_item
        ["u", "i2", ""],  # line 9: null_timestamp
        ["u", "i3", "yesterday"],  # line 10: bad_timestamp
        ["u", "i4", -5],  # line 11: negative_timestamp
        ["u", "i5", 4_102_444_800],  # line 12: 2100-01-01, after max_time: future_timestamp
    ]
    path = write_csv(tmp_path / "log.csv", HEADER, GOOD + bad)
    with path.open("a") as handle:
        handle.write("u,i6\n")  # line 13: wrong_column_count
        handle.write("u,i7,5,extra\n")  # line 14: wrong_column_count
    assert build(path, tmp_path / "out", *LOOSE) == 0
    assert quarantine(tmp_path / "out") == [
        (7, "null_user", "1", None),
        (8, "null_item", "2", None),
        (9, "null_timestamp", None, None),
        (10, "bad_timestamp", "yesterday", None),
        (11, "negative_timestamp", "-5", None),
        (12, "future_timestamp", "4102444800", None),
        (13, "wrong_column_count", None, "u,i6"),
        (14, "wrong_column_count", None, "u,i7,5,extra"),
    ]
    got = stats(tmp_path / "out")["rejected"]
    assert got["by_reason"] == {
        "bad_timestamp": 1, "future_timestamp": 1, "negative_timestamp": 1, "null_item": 1,
        "null_timestamp": 1, "null_user": 1, "wrong_column_count": 2,
    }  # fmt: skip
    assert got["total"] == 8 and stats(tmp_path / "out")["input"]["rows_read"] == 13
    assert decode(tmp_path / "out") == {"u": [f"i{k}" for k in range(5)]}


def test_ndjson_malformed_lines_and_odd_values(tmp_path: Path) -> None:
    lines = [
        '{"user_id": "u", "item_id": "a", "timestamp": 1}',
        '{"user_id": "u", "item_id": 7, "timestamp": 2}',  # integer id: the item "7"
        "",  # blank line: skipped, still counted for line numbers
        '{"user_id": "u", "item_id": "b", "timestamp": "3"}',  # string time, number elsewhere
        '{"user_id": "u", "item_id": "c", "timestamp": 4',  # line 5: malformed JSON
        "[1, 2, 3]",  # line 6: not an object
        '{"user_id": {"id": 1}, "item_id": "d", "timestamp": 5}',  # line 7: bad_user
        '{"user_id": "u", "timestamp": 6}',  # line 8: null_item
        '{"user_id": "u", "item_id": "7", "timestamp": 7, "extra": [1]}',
    ]
    path = tmp_path / "log.ndjson"
    path.write_text("\n".join(lines) + "\n")
    assert build(path, tmp_path / "out", *LOOSE) == 0
    assert [(r, reason) for r, reason, _, _ in quarantine(tmp_path / "out")] == [
        (5, "malformed_json"), (6, "malformed_json"), (7, "bad_user"), (8, "null_item"),
    ]  # fmt: skip
    assert decode(tmp_path / "out") == {"u": ["a", "7", "b", "7"]}


def test_threshold_exceeded_fails_early_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_parquet(
        tmp_path / "log.parquet",
        {
            "user_id": ["u", None, None, "u", "u", "u"],
            "item_id": ["a"] * 6,
            "timestamp": [1, 2, 3, 4, 5, 6],
        },
    )
    assert (
        build(
            tmp_path / "log.parquet",
            tmp_path / "out",
            "--min-user-interactions",
            "4",
            "--max-reject-share",
            "0.2",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(
        "error: already rejected 2 of 6 input rows (33.33%), "
        "more than max_reject_share 20.00%: null_user 2"
    )
    assert "quarantine/" in err and "no dataset was written" in err
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_id_columns_that_disagree_are_refused_by_name_or_reconciled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    write_parquet(
        logs / "a.parquet",
        {"user_id": [5, 5, 6], "item_id": ["x", "y", "z"], "timestamp": [1, 2, 3]},
    )
    write_parquet(
        logs / "b.parquet",
        {"user_id": ["5", "5", "6"], "item_id": ["z", "w", "x"], "timestamp": [4, 5, 6]},
    )
    assert build(logs, tmp_path / "out", *LOOSE) == 2
    err = capsys.readouterr().err
    assert (
        f"column 'user_id' holds integers in {logs / 'a.parquet'} "
        f"but strings in {logs / 'b.parquet'}"
        in err
    )
    assert "on_schema_mismatch: reconcile" in err
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / MANIFEST_NAME).exists()

    assert build(logs, tmp_path / "out", *LOOSE, "--on-schema-mismatch", "reconcile") == 0
    assert decode(tmp_path / "out") == {"5": ["x", "y", "z", "w"]}  # 5 and "5" are one user
    assert stats(tmp_path / "out")["plan"]["reconciled"] == [
        f"column 'user_id' holds integers in {logs / 'a.parquet'} "
        f"but strings in {logs / 'b.parquet'}: "
        "integers read as decimal strings"
    ]

    write_parquet(logs / "c.parquet", {"user_id": [1.5], "item_id": ["x"], "timestamp": [1]})
    assert build(logs, tmp_path / "other", *LOOSE, "--on-schema-mismatch", "reconcile") == 2
    assert (
        f"{logs / 'c.parquet'}: column 'user_id' (user) has type double, which cannot hold ids"
        in capsys.readouterr().err
    )


def test_truncated_and_corrupt_parquet_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 20_000
    columns: dict[str, list[Any]] = {
        "user_id": [f"u{k % 97}" for k in range(n)],
        "item_id": [f"i{k * 7919 % 1013}" for k in range(n)],
        "timestamp": list(range(n)),
    }
    write_parquet(tmp_path / "ok.parquet", columns)
    data = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "part-1.parquet").write_bytes(data[: len(data) // 2])
    assert build(tmp_path / "cut", tmp_path / "out", *LOOSE) == 2
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'cut' / 'part-1.parquet'}: cannot read as Parquet, truncated or corrupt?"
        in err
    )

    corrupt = bytearray(data)
    middle = len(data) // 3
    corrupt[middle : middle + 400] = bytes(400)  # a data page, not the footer
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "part-2.parquet").write_bytes(bytes(corrupt))
    assert build(tmp_path / "bad", tmp_path / "out2", *LOOSE) == 2
    assert (
        f"{tmp_path / 'bad' / 'part-2.parquet'}: cannot read as Parquet" in capsys.readouterr().err
    )


def test_missing_columns_and_inputs_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_csv(tmp_path / "log.csv", ["user", "item_id", "timestamp"], GOOD)
    assert build(tmp_path / "log.csv", tmp_path / "out", *LOOSE) == 2
    assert (
        f"{tmp_path / 'log.csv'}: the header has no column(s) 'user_id'" in capsys.readouterr().err
    )
    write_parquet(tmp_path / "log.parquet", {"user_id": ["u"], "item": ["a"], "timestamp": [1]})
    assert build(tmp_path / "log.parquet", tmp_path / "out", *LOOSE) == 2
    assert "no column(s) 'item_id' (columns: user_id, item, timestamp)" in capsys.readouterr().err
    assert build(tmp_path / "nothing-*.csv", tmp_path / "out", *LOOSE) == 2
    assert "no input files match" in capsys.readouterr().err


def _order_by_time(out: Path) -> list[str]:
    return decode(out)["u"]


def test_timestamp_formats(tmp_path: Path) -> None:
    # epoch milliseconds: 1500 ms is later than 1200 ms although both are second 1
    write_csv(
        tmp_path / "ms.csv",
        HEADER,
        [["u", "b", 1500], ["u", "a", 1200], ["u", "c", 1800], ["u", "d", 999]],
    )
    assert build(tmp_path / "ms.csv", tmp_path / "ms", *LOOSE, "--time-format", "epoch_ms") == 0
    assert _order_by_time(tmp_path / "ms") == ["d", "a", "b", "c"]

    iso = [
        ["u", "late", "2024-01-02T10:00:00+02:00"],  # 08:00Z
        ["u", "zulu", "2024-01-02T07:59:59.5Z"],
        ["u", "naive", "2024-01-02 07:00:00"],  # no zone: UTC
        ["u", "date", "2024-01-02"],  # midnight UTC
        ["u", "bad", "2024-13-01T00:00:00"],
        ["u", "old", "1969-12-31T23:00:00Z"],
        ["u", "far", "3000-01-01T00:00:00Z"],
    ]
    write_csv(tmp_path / "iso.csv", HEADER, iso)
    assert build(tmp_path / "iso.csv", tmp_path / "iso", *LOOSE, "--time-format", "iso8601") == 0
    assert _order_by_time(tmp_path / "iso") == ["date", "naive", "zulu", "late"]
    assert [(r, reason) for r, reason, _, _ in quarantine(tmp_path / "iso")] == [
        (6, "bad_timestamp"), (7, "negative_timestamp"), (8, "future_timestamp"),
    ]  # fmt: skip

    write_csv(
        tmp_path / "float.csv",
        HEADER,
        [["u", "b", "1.75"], ["u", "a", "1.25"], ["u", "c", "2"], ["u", "d", "1e0"]],
    )
    assert build(tmp_path / "float.csv", tmp_path / "float", *LOOSE) == 0
    assert _order_by_time(tmp_path / "float") == ["d", "a", "b", "c"]

    stamps = pa.array([3000, 1000, 2000, 4000], pa.timestamp("ms", tz="Europe/Paris"))
    write_parquet(
        tmp_path / "ts.parquet",
        {"user_id": ["u"] * 4, "item_id": ["c", "a", "b", "d"], "timestamp": stamps},
    )
    assert build(tmp_path / "ts.parquet", tmp_path / "ts", *LOOSE, "--time-format", "iso8601") == 0
    assert _order_by_time(tmp_path / "ts") == ["a", "b", "c", "d"]

    days = pa.array([3, 1, 2, 4], pa.date32())
    write_parquet(
        tmp_path / "d.parquet",
        {"user_id": ["u"] * 4, "item_id": ["c", "a", "b", "d"], "timestamp": days},
    )
    assert build(tmp_path / "d.parquet", tmp_path / "d", *LOOSE) == 0
    assert _order_by_time(tmp_path / "d") == ["a", "b", "c", "d"]


def test_iso_format_refuses_numeric_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_parquet(tmp_path / "log.parquet", {"user_id": ["u"], "item_id": ["a"], "timestamp": [1]})
    assert (
        build(tmp_path / "log.parquet", tmp_path / "out", *LOOSE, "--time-format", "iso8601") == 2
    )
    assert "holds numbers, but time_format is iso8601" in capsys.readouterr().err


def test_default_future_cutoff_is_the_file_mtime_plus_a_day(tmp_path: Path) -> None:
    written = datetime(2024, 6, 1, tzinfo=timezone.utc).timestamp()
    day = 86_400
    rows = [["u", f"i{k}", int(written) - 10 * day + k] for k in range(4)]
    rows += [["u", "soon", int(written) + day - 1], ["u", "later", int(written) + day + 1]]
    path = write_csv(tmp_path / "log.csv", HEADER, rows)
    os.utime(path, (written, written))
    args = ["--input", str(path), "--output", str(tmp_path / "out2"), "--jobs", "1", *LOOSE]
    assert main(args) == 0  # no --max-time
    assert decode(tmp_path / "out2")["u"][-1] == "soon"
    assert [reason for _, reason, _, _ in quarantine(tmp_path / "out2")] == ["future_timestamp"]


def test_gzip_tsv_and_csv_give_the_same_dataset(tmp_path: Path) -> None:
    rows = [[f"u{k % 3}", f"i{(k * 5) % 7}", k] for k in range(30)]
    write_csv(tmp_path / "plain.csv", HEADER, rows)
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "log.csv.gz", "wt") as handle:
        handle.write((tmp_path / "plain.csv").read_text())
    write_csv(tmp_path / "log.tsv", HEADER, rows, sep="\t")
    outs = []
    for name, source in (
        ("csv", tmp_path / "plain.csv"),
        ("gz", tmp_path / "gz"),
        ("tsv", tmp_path / "log.tsv"),
    ):
        assert build(source, tmp_path / f"out-{name}", *LOOSE) == 0
        outs.append((tmp_path / f"out-{name}" / "part-00000-of-00001.parquet").read_bytes())
    assert outs[0] == outs[1] == outs[2]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "log.csv.gz").write_bytes(
        gzip.compress(b"user_id,item_id,timestamp\n" + b"u,a,1\n" * 5000)[:-40]
    )
    assert build(tmp_path / "broken", tmp_path / "broken-out", *LOOSE) == 2


def test_quarantine_is_a_parquet_table_with_a_fixed_schema(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", HEADER, [*GOOD, ["", "x", 1]])
    assert build(path, tmp_path / "out", *LOOSE) == 0
    (piece,) = (tmp_path / "out" / "quarantine").iterdir()
    table = pq.read_table(piece)
    assert table.schema.names == ["source", "row", "reason", "user", "item", "time", "event", "raw"]
    assert table.to_pylist() == [{"source": str(path), "row": 7, "reason": "null_user",
                                  "user": None, "item": "x", "time": "1", "event": None,
                                  "raw": None}]  # fmt: skip
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["extra"]["quarantine_files"] == [f"quarantine/{piece.name}"]
