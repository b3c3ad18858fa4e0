"""Synthetic raw logs (data_prep.synthetic_logs): deterministic, and what they plant is what the
build finds: rows, rejected rows by reason, duplicates, bots, planted intents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from test_prep_reference import build, stats

from data_prep.synthetic_logs import LogSpec, main, write_logs
from data_prep.writer import PrepError


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_seed_fixes_every_byte(tmp_path: Path) -> None:
    spec = LogSpec(interactions=3000, files=2, chunk_rows=700, format="csv", gzip=True, seed=4)
    write_logs(str(tmp_path / "a"), spec)
    write_logs(str(tmp_path / "b"), spec, jobs=2)  # files written in parallel: same bytes
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    write_logs(str(tmp_path / "c"), LogSpec(**{**spec.__dict__, "seed": 5}))
    assert (
        _files(tmp_path / "a")["part-00000.csv.gz"] != _files(tmp_path / "c")["part-00000.csv.gz"]
    )


@pytest.mark.parametrize(
    ("fmt", "extra"),
    [
        ("parquet", {}),
        ("csv", {"gzip": True}),
        ("tsv", {"time_format": "iso8601"}),
        ("ndjson", {"time_format": "epoch_ms"}),
    ],
)
def test_the_build_finds_what_was_planted(tmp_path: Path, fmt: str, extra: dict[str, Any]) -> None:
    spec = LogSpec(
        interactions=4000, files=2, chunk_rows=900, format=fmt, malformed_share=0.01, **extra
    )
    summary = write_logs(str(tmp_path / "logs"), spec)
    flags = ["--max-reject-share", "0.02", "--time-format", spec.time_format]
    assert build(tmp_path / "logs", tmp_path / "out", *flags) == 0
    got = stats(tmp_path / "out")
    assert (
        got["input"]["rows_read"]
        == summary["rows"]
        == 4000 + summary["duplicates"] + sum(summary["malformed"].values())
    )
    assert got["rejected"]["by_reason"] == {k: v for k, v in summary["malformed"].items() if v}
    assert set(got["rejected"]["by_reason"]) == set(spec.malformed_kinds)
    assert got["duplicates_dropped"] == summary["duplicates"] == round(0.02 * 4000)
    assert got["kcore"]["before"]["interactions"] == 4000  # every planted event, once
    assert got["kcore"]["before"]["users"] == summary["users"] + spec.bots
    assert got["kcore"]["rounds"][0]["users_removed"] > 0  # short histories exist


def test_bots_have_huge_histories_and_users_follow_their_intent(tmp_path: Path) -> None:
    spec = LogSpec(
        interactions=20_000, intents=4, noise=0.1, bots=2, bot_share=0.05, chunk_rows=6000, seed=1
    )
    summary = write_logs(str(tmp_path / "logs"), spec)
    log = pl.read_parquet(tmp_path / "logs" / "part-*.parquet").drop_nulls()
    per_user = log.group_by("user_id").len()
    bots = per_user.filter(pl.col("user_id").str.starts_with("bot")).sort("user_id")
    assert bots["user_id"].to_list() == summary["bots"] == ["bot0", "bot1"]
    assert min(bots["len"].to_list()) >= 0.025 * 20_000 * 0.99  # 500 events each, plus copies
    regular = per_user.filter(~pl.col("user_id").str.starts_with("bot"))["len"].to_numpy()
    assert np.median(regular) < 30

    planted = pl.read_parquet(tmp_path / "logs" / "_planted_intents.parquet")
    assert planted.height == summary["users"] == 500
    sizes = np.diff((np.arange(spec.intents + 1) * spec.num_items) // spec.intents)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    joined = log.join(planted, left_on="user_id", right_on="user")
    items = joined["item_id"].str.slice(1).cast(pl.Int64).to_numpy()
    intents = joined["intent"].to_numpy()
    inside = (items >= bounds[intents]) & (items < bounds[intents + 1])
    assert 0.85 < inside.mean() < 0.97  # 90 % walk in the slice, 10 % noise (1/4 lands inside)


def test_cli_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "--output",
                str(tmp_path / "logs"),
                "--interactions",
                "500",
                "--format",
                "ndjson",
                "--int-ids",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    summary = json.loads((tmp_path / "logs" / "_summary.json").read_text())
    assert summary["bots"] == [-1, -2, -3]
    first = json.loads((tmp_path / "logs" / "part-00000.ndjson").read_text().splitlines()[0])
    assert isinstance(first["user_id"], int) and isinstance(first["timestamp"], int)
    assert main(["--output", str(tmp_path / "logs"), "--interactions", "500"]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(PrepError, match="--noise must be in"):
        LogSpec(noise=2.0).validate()


def test_synthetic_raw_log_switch_delegates(tmp_path: Path) -> None:
    from data_prep.synthetic import main as synthetic_main

    assert (
        synthetic_main(
            [
                "--raw-log",
                "--output",
                str(tmp_path / "logs"),
                "--interactions",
                "800",
                "--format",
                "tsv",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "logs" / "_summary.json").read_text())
    assert summary["rows"] == 800 + summary["duplicates"] + sum(summary["malformed"].values())
    assert (tmp_path / "logs" / "part-00000.tsv").exists()
