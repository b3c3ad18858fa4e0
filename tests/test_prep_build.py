"""Raw-log build (data_prep.build) on small hand-built logs: every number checked by hand or
against the naive reference build (test_prep_reference.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from test_prep_reference import (
    build,
    dataset_files,
    decode,
    events_csv,
    naive_build,
    stats,
    write_csv,
    write_parquet,
)

from data_prep.benchmark import main as import_benchmark
from elcrec_dist.prepared import MANIFEST_NAME, DatasetError, load_sequences, read_info

LOOSE = ("--min-user-interactions", "4", "--min-item-interactions", "1")


def test_exact_repeats_are_dropped_and_counted(tmp_path: Path) -> None:
    events = [
        ("u", "a", 1, "click"), ("u", "a", 1, "click"), ("u", "a", 1, "click"),  # 2 repeats
        ("u", "a", 2, "click"),  # same item, other time: kept
        ("u", "b", 3, "click"), ("u", "b", 3, "view"),  # other event: kept (event not filtered)
        ("u", "c", 4, "click"),
    ]  # fmt: skip
    log = events_csv(tmp_path / "log.csv", events)
    assert build(log, tmp_path / "out", *LOOSE) == 0
    # without an event filter the event is not part of the row: (u, b, 3) repeats once
    assert decode(tmp_path / "out") == {"u": ["a", "a", "b", "c"]}
    assert stats(tmp_path / "out")["duplicates_dropped"] == 3

    assert build(log, tmp_path / "kept", *LOOSE, "--no-dedupe") == 0
    assert decode(tmp_path / "kept") == {"u": ["a", "a", "a", "a", "b", "b", "c"]}
    assert stats(tmp_path / "kept")["duplicates_dropped"] == 0

    flags = (*LOOSE, "--event-col", "event", "--events", "click,view")
    assert build(log, tmp_path / "events", *flags) == 0
    assert decode(tmp_path / "events") == {"u": ["a", "a", "b", "b", "c"]}  # b/click, b/view
    assert stats(tmp_path / "events")["duplicates_dropped"] == 2


def test_event_filter_keeps_only_the_named_events(tmp_path: Path) -> None:
    events = [("u", f"i{k}", k, ["view", "click", "purchase"][k % 3]) for k in range(12)]
    log = events_csv(tmp_path / "log.csv", events)
    flags = (*LOOSE, "--event-col", "event", "--events", "click,purchase")
    assert build(log, tmp_path / "out", *flags) == 0
    kept = [e[1] for e in events if e[3] != "view"]
    assert decode(tmp_path / "out") == {"u": kept}
    assert stats(tmp_path / "out")["filtered_events"] == {
        "rows": 4,
        "kept_events": ["click", "purchase"],
    }


def test_kcore_runs_to_a_fixed_point(tmp_path: Path) -> None:
    histories = {
        "u1": ["i1", "i2", "i3", "i4"],
        "u2": ["i1", "i2", "i3", "i4"],
        "u3": ["i1", "i2", "i3", "i5"],
        "u4": ["i5", "i6", "i1", "i2"],
    }
    events = [(u, item, t, "v") for u, items in histories.items() for t, item in enumerate(items)]
    # By hand, min 4 per user and 2 per item: round 1 drops i6 (1 user); round 2 drops u4 (3
    # left) and then i5 (only u3); round 3 drops u3 (3 left); round 4 removes nothing.
    log = events_csv(tmp_path / "log.csv", events)
    assert (
        build(log, tmp_path / "out", "--min-user-interactions", "4", "--min-item-interactions", "2")
        == 0
    )
    got = stats(tmp_path / "out")["kcore"]
    assert [(r["users_removed"], r["items_removed"]) for r in got["rounds"]] == [
        (0, 1),
        (1, 1),
        (1, 0),
        (0, 0),
    ]
    assert [(r["users_left"], r["items_left"]) for r in got["rounds"]] == [
        (4, 5),
        (3, 4),
        (2, 4),
        (2, 4),
    ]
    assert got["before"] == {"users": 4, "items": 6, "interactions": 16}
    assert got["after"] == {"users": 2, "items": 4, "interactions": 8}
    assert decode(tmp_path / "out") == {"u1": histories["u1"], "u2": histories["u2"]}
    ref = naive_build(events, min_user=4, min_item=2)
    assert [(r["users_removed"], r["items_removed"]) for r in got["rounds"]] == ref["rounds"]


def test_ties_in_time_are_broken_by_item_then_event(tmp_path: Path) -> None:
    # all at t=5 except the first: items in natural order (integers by value, then bytes)
    events = [("u", "first", 1, "x"), ("u", "x", 5, "x"), ("u", "i2", 5, "x"), ("u", "10", 5, "x"),
              ("u", "i10", 5, "x"), ("u", "9", 5, "x"), ("u", "i2", 5, "a")]  # fmt: skip
    log = events_csv(tmp_path / "log.csv", events)
    flags = (*LOOSE, "--event-col", "event", "--events", "a,x")
    assert build(log, tmp_path / "out", *flags) == 0
    assert decode(tmp_path / "out") == {"u": ["first", "9", "10", "i10", "i2", "i2", "x"]}
    # the item ids follow the same natural order
    item_map = pl.read_parquet(tmp_path / "out" / "item_map.parquet")
    assert item_map["item"].to_list() == ["9", "10", "first", "i10", "i2", "x"]
    assert item_map["item_id"].to_list() == [1, 2, 3, 4, 5, 6]


def test_truncation_keeps_the_most_recent_items(tmp_path: Path) -> None:
    events = [("long", f"i{k}", 100 - k, "v") for k in range(10)]  # newest first in the file
    events += [("short", f"i{k}", k, "v") for k in range(5)]
    log = events_csv(tmp_path / "log.csv", events)
    assert build(log, tmp_path / "out", *LOOSE, "--max-len", "6") == 0
    # "long" in time order is i9 (t=91) ... i0 (t=100); the 6 newest are i5 ... i0
    assert decode(tmp_path / "out") == {
        "long": ["i5", "i4", "i3", "i2", "i1", "i0"],
        "short": ["i0", "i1", "i2", "i3", "i4"],
    }
    got = stats(tmp_path / "out")
    assert got["truncation"]["users_truncated"] == 1
    assert got["truncation"]["interactions_dropped"] == 4
    assert got["sequence_length"]["before_truncation"] == {
        "users": 2,
        "min": 5,
        "mean": 7.5,
        "max": 10,
        "p50": 5,
        "p90": 10,
        "p95": 10,
        "p99": 10,
    }
    assert got["sequence_length"]["after_truncation"]["max"] == 6
    assert read_info(str(tmp_path / "out")).num_interactions == 11


def test_id_maps_round_trip_and_user_id_schemes(tmp_path: Path) -> None:
    rng = random.Random(5)
    users = ["bob", "alice", "7", "carol"]
    events = [
        (u, rng.choice(["pen", "ink", "3", "21", "cup"]), k, "v") for k, u in enumerate(users * 6)
    ]
    log = events_csv(tmp_path / "log.csv", events)
    assert build(log, tmp_path / "out", *LOOSE, "--buckets", "1") == 0
    ref = naive_build(events, min_user=4, min_item=1)
    assert decode(tmp_path / "out") == ref["sequences"]
    item_map = pl.read_parquet(tmp_path / "out" / "item_map.parquet")
    assert (
        dict(zip(item_map["item"].to_list(), item_map["item_id"].to_list(), strict=True))
        == ref["item_ids"]
    )
    # string user ids: numbered 1..U in natural order (one bucket)
    user_map = pl.read_parquet(tmp_path / "out" / "user_map" / "*.parquet").sort("user_id")
    assert user_map["user"].to_list() == ["7", "alice", "bob", "carol"]
    assert user_map["user_id"].to_list() == [1, 2, 3, 4]
    assert stats(tmp_path / "out")["output"]["user_ids"] == "index"

    # integer-looking user ids are kept as user_id (auto), and refused by name with keep
    numeric = [(str(10 + k % 3), e[1], e[2], "v") for k, e in enumerate(events)]
    assert build(events_csv(tmp_path / "n.csv", numeric), tmp_path / "num", *LOOSE) == 0
    _, ids, _ = load_sequences(str(tmp_path / "num"))
    assert sorted(ids.tolist()) == [10, 11, 12]
    assert build(log, tmp_path / "keep", *LOOSE, "--user-ids", "keep") == 2
    assert not (tmp_path / "keep" / MANIFEST_NAME).exists()


@pytest.mark.parametrize(("buckets", "shards"), [(1, 1), (4, 2), (6, 3)])
def test_matches_the_naive_build_on_a_random_log(tmp_path: Path, buckets: int, shards: int) -> None:
    rng = random.Random(buckets)
    items = [f"i{k}" for k in range(30)] + [str(k) for k in range(0, 40, 3)]
    events: list[tuple[str, str, int, str]] = []
    for u in range(60):
        user = f"user{u}" if u % 4 else str(1000 + u)
        for _ in range(rng.randint(1, 14)):
            events.append(
                (user, rng.choice(items), rng.randint(1, 20), rng.choice(["view", "buy", "cart"]))
            )
    events += rng.sample(events, 25)  # exact repeats
    rng.shuffle(events)
    log = events_csv(tmp_path / "log.csv", events)
    flags = ("--min-user-interactions", "5", "--min-item-interactions", "3", "--max-len", "7",
             "--event-col", "event", "--events", "buy,view",
             "--buckets", str(buckets), "--shards", str(shards))  # fmt: skip
    assert build(log, tmp_path / "out", *flags) == 0
    ref = naive_build(events, min_user=5, min_item=3, max_len=7, keep_events=("buy", "view"))
    assert decode(tmp_path / "out") == ref["sequences"]
    got = stats(tmp_path / "out")
    assert [(r["users_removed"], r["items_removed"]) for r in got["kcore"]["rounds"]] == ref[
        "rounds"
    ]
    assert got["duplicates_dropped"] == ref["duplicates"]
    item_map = pl.read_parquet(tmp_path / "out" / "item_map.parquet")
    assert (
        dict(zip(item_map["item"].to_list(), item_map["item_id"].to_list(), strict=True))
        == ref["item_ids"]
    )
    info = read_info(str(tmp_path / "out"))
    assert len(info.files) == shards
    assert info.num_users == len(ref["sequences"])
    assert info.num_interactions == sum(len(s) for s in ref["sequences"].values())


def _benchmark_text(users: dict[int, list[int]]) -> str:
    return "".join(f"{u} {' '.join(map(str, items))}\n" for u, items in sorted(users.items()))


def _raw_log_of(users: dict[int, list[int]]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {"user_id": [], "item_id": [], "timestamp": []}
    for u, items in users.items():
        for t, item in enumerate(items):
            rows["user_id"].append(u)
            rows["item_id"].append(item)
            rows["timestamp"].append(1_600_000_000 + t)
    return rows


@pytest.mark.parametrize("shards", [1, 3])
def test_benchmark_import_and_raw_log_build_give_the_same_dataset(
    tmp_path: Path, shards: int
) -> None:
    rng = np.random.default_rng(shards)
    users = {u: rng.integers(1, 41, rng.integers(4, 12)).tolist() for u in range(1, 80)}
    used = sorted({i for items in users.values() for i in items})
    remap = {old: new for new, old in enumerate(used, start=1)}  # benchmark items are 1..N
    users = {u: [remap[i] for i in items] for u, items in users.items()}
    bench = tmp_path / "bench.txt"
    bench.write_text(_benchmark_text(users))
    assert (
        import_benchmark(
            ["--input", str(bench), "--output", str(tmp_path / "imported"), "--shards", str(shards)]
        )
        == 0
    )

    rows = _raw_log_of(users)
    order = rng.permutation(len(rows["user_id"]))  # a log is not grouped by user
    shuffled = {k: [v[i] for i in order] for k, v in rows.items()}
    write_parquet(tmp_path / "log.parquet", shuffled)
    write_csv(
        tmp_path / "log.csv",
        list(shuffled),
        [list(r) for r in zip(*shuffled.values(), strict=True)],
    )
    flags = (*LOOSE, "--shards", str(shards), "--buckets", str(shards))
    for name in ("log.parquet", "log.csv"):
        out = tmp_path / f"built-{name}"
        assert build(tmp_path / name, out, *flags) == 0
        imported, built = read_info(str(tmp_path / "imported")), read_info(str(out))
        assert built.files == imported.files  # paths, rows, bytes and sha256 of every shard
        assert (built.num_users, built.num_items, built.num_interactions, built.max_item_id) == (
            imported.num_users, imported.num_items, imported.num_interactions, imported.max_item_id
        )  # fmt: skip
        for shard in imported.files:
            assert (out / shard.path).read_bytes() == (
                tmp_path / "imported" / shard.path
            ).read_bytes()


def test_benchmark_equivalence_on_beauty(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "data" / "Beauty.txt"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    users = {
        int(t[0]): [int(x) for x in t[1:]]
        for t in (line.split() for line in source.read_text().splitlines())
    }
    assert import_benchmark(["--input", str(source), "--output", str(tmp_path / "imported")]) == 0
    write_parquet(tmp_path / "log.parquet", _raw_log_of(users))
    assert build(tmp_path / "log.parquet", tmp_path / "built", *LOOSE, "--buckets", "1") == 0
    imported, built = read_info(str(tmp_path / "imported")), read_info(str(tmp_path / "built"))
    assert built.files == imported.files
    assert built.num_items == imported.num_items == 12101


def test_reruns_worker_counts_and_stages_give_identical_bytes(tmp_path: Path) -> None:
    rng = random.Random(3)
    events = [
        (f"u{rng.randint(0, 40)}", f"i{rng.randint(0, 25)}", rng.randint(0, 50), "v")
        for _ in range(900)
    ]
    half = len(events) // 2
    (tmp_path / "logs").mkdir()
    events_csv(tmp_path / "logs" / "a.csv", events[:half])
    write_parquet(
        tmp_path / "logs" / "b.parquet",
        {"user_id": [e[0] for e in events[half:]], "item_id": [e[1] for e in events[half:]],
         "timestamp": [e[2] for e in events[half:]], "event": [e[3] for e in events[half:]]},
    )  # fmt: skip
    flags = ("--shards", "2", "--buckets", "4", "--max-len", "8")
    assert build(tmp_path / "logs", tmp_path / "first", *flags) == 0
    assert build(tmp_path / "logs", tmp_path / "second", *flags) == 0
    assert build(tmp_path / "logs", tmp_path / "parallel", *flags, jobs=2) == 0
    first = dataset_files(tmp_path / "first")
    assert len([name for name in first if name.startswith("part-")]) == 2
    assert dataset_files(tmp_path / "second") == first
    assert dataset_files(tmp_path / "parallel") == first

    staged = tmp_path / "staged"
    base = [
        "--input",
        str(tmp_path / "logs"),
        "--output",
        str(staged),
        "--max-time",
        "2030-01-01",
        *flags,
    ]
    from data_prep.build.cli import main

    assert main([*base, "--stage", "plan"]) == 0
    for worker in range(3):  # 3 map workers for 2 files: one has nothing to read
        assert (
            main([*base, "--stage", "map", "--worker-index", str(worker), "--num-workers", "3"])
            == 0
        )
    for worker in range(2):
        assert (
            main([*base, "--stage", "reduce", "--worker-index", str(worker), "--num-workers", "2"])
            == 0
        )
    assert main([*base, "--stage", "kcore"]) == 0
    assert main([*base, "--stage", "write", "--worker-index", "1", "--num-workers", "2"]) == 0
    assert main([*base, "--stage", "commit"]) == 0  # writes the missing shard 0, then commits
    assert dataset_files(staged) == first
    assert not (staged / "_work").exists()


def test_a_second_run_is_a_no_op_and_another_dataset_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = events_csv(tmp_path / "log.csv", [("u", f"i{k}", k, "v") for k in range(6)])
    assert build(log, tmp_path / "out", *LOOSE) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert build(log, tmp_path / "out", *LOOSE) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert build(log, tmp_path / "out", *LOOSE, "--max-len", "4") == 2  # another build
    assert "already holds a prepared dataset" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before


def test_a_failed_build_leaves_no_dataset_and_readers_refuse_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [["u", f"i{k}", k] for k in range(6)] + [["", "i9", 3], ["u", "i9", "soon"]]
    log = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp"], rows)
    out = tmp_path / "out"
    assert build(log, out, *LOOSE) == 2  # 2 of 8 rows rejected > 1 %
    err = capsys.readouterr().err
    assert "rejected 2 of 8 input rows (25.00%), more than max_reject_share 1.00%" in err
    assert "bad_timestamp 1, null_user 1" in err
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(DatasetError, match=r"no manifest\.json"):
        load_sequences(str(out))
    quarantine = pl.read_parquet(out / "quarantine" / "*.parquet").sort("row")
    assert quarantine.select("row", "reason").rows() == [(8, "null_user"), (9, "bad_timestamp")]

    # the same log with a higher threshold: the failed attempt's files are reused or replaced
    assert build(log, out, *LOOSE, "--max-reject-share", "0.3") == 0
    assert decode(out) == {"u": [f"i{k}" for k in range(6)]}
    assert stats(out)["rejected"]["by_reason"] == {"bad_timestamp": 1, "null_user": 1}


def test_no_users_left_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = events_csv(tmp_path / "log.csv", [("u", f"i{k}", k, "v") for k in range(3)])
    assert build(log, tmp_path / "out", *LOOSE) == 2
    assert "no users are left after k-core filtering" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = events_csv(tmp_path / "log.csv", [("u", f"i{k}", k, "v") for k in range(6)])
    assert build(log, tmp_path / "out", "--dry-run", "--shards", "2") == 0
    text = capsys.readouterr().out
    assert (
        "1 file(s)" in text and "2 shard(s)" in text and "k-core:  users >= 5, items >= 5" in text
    )
    assert not (tmp_path / "out").exists()


def test_yaml_config_and_flag_precedence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [[f"u{k % 2}", f"i{k}", 10 + k] for k in range(12)]
    log = write_csv(tmp_path / "log.tsv", ["who", "what", "when"], rows, sep="\t")
    config = tmp_path / "prep.yaml"
    config.write_text("user_col: who\nitem_col: what\ntime_col: when\nmin_user_interactions: 4\n"
                      "min_item_interactions: 1\nmax_len: 4\nmax_time: 2030-01-01\n")  # fmt: skip
    assert build(log, tmp_path / "out", "--config", str(config), "--max-len", "5") == 0
    assert decode(tmp_path / "out") == {
        "u0": ["i2", "i4", "i6", "i8", "i10"],
        "u1": ["i3", "i5", "i7", "i9", "i11"],
    }
    config.write_text(config.read_text() + "max_lenght: 4\n")
    assert build(log, tmp_path / "bad", "--config", str(config)) == 2
    assert "unknown config key(s): max_lenght" in capsys.readouterr().err
    assert build(log, tmp_path / "bad", "--event-col", "what") == 2
    assert "event_col and events go together" in capsys.readouterr().err


def test_integer_ids_from_parquet(tmp_path: Path) -> None:
    columns = {
        "user_id": [5, 5, 5, 5, -2, -2, -2, -2],
        "item_id": [30, 2, 2, 100, 2, 30, 7, 2],
        "timestamp": pa.array([1, 2, 3, 4, 4, 3, 2, 1], pa.timestamp("s")),
    }
    write_parquet(tmp_path / "log.parquet", columns)
    assert build(tmp_path / "log.parquet", tmp_path / "out", *LOOSE) == 0
    assert decode(tmp_path / "out") == {"5": ["30", "2", "2", "100"], "-2": ["2", "7", "30", "2"]}
    _, ids, _ = load_sequences(str(tmp_path / "out"))
    assert sorted(ids.tolist()) == [-2, 5]  # integer user ids are kept
    item_map = pl.read_parquet(tmp_path / "out" / "item_map.parquet")
    assert item_map["item"].to_list() == [2, 7, 30, 100] and item_map["item"].dtype == pl.Int64


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs" / "prep").glob("*.yaml"))
)
def test_prep_configs_load(path: Path) -> None:
    from data_prep.build.config import load_build_config

    config = load_build_config(path, {"input": "logs", "output": "data/x"})
    assert config.min_user_interactions >= 4


def test_an_output_inside_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    events_csv(logs / "a.csv", [("u", f"i{k}", k, "v") for k in range(6)])
    assert build(logs, logs / "out", *LOOSE) == 2
    assert (
        f"--output {logs / 'out'} is inside (or is) the --input folder {logs}"
        in capsys.readouterr().err
    )
    assert build(logs / "*.csv", logs / "out", *LOOSE) == 0  # a glob that cannot match it is fine
    assert build(logs / "*.csv", logs / "out", *LOOSE) == 0  # and so is its rerun
    capsys.readouterr()
    assert build(f"{logs}/**", logs / "out", *LOOSE) == 2  # a glob that reaches into it is not
    assert f"inside --output {logs / 'out'}" in capsys.readouterr().err
