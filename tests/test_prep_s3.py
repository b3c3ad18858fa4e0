"""The raw-log build against a local S3-protocol server (moto on loopback): input and output in
buckets, endpoint and credentials from the environment only, the same dataset as a local run."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import fsspec
from test_prep_reference import build, dataset_files, events_csv, write_parquet

from elcrec_dist.prepared import load_sequences

FLAGS = (
    "--shards",
    "2",
    "--buckets",
    "4",
    "--min-user-interactions",
    "4",
    "--min-item-interactions",
    "2",
)


def test_s3_build_gives_the_local_dataset(tmp_path: Path, s3_env: str) -> None:
    rng = random.Random(7)
    events = [
        (f"u{rng.randint(0, 25)}", f"i{rng.randint(0, 30)}", rng.randint(0, 500), "v")
        for _ in range(800)
    ]
    logs = tmp_path / "logs"
    logs.mkdir()
    events_csv(logs / "a.csv", events[:400])
    columns: dict[str, list[Any]] = {"user_id": [e[0] for e in events[400:]],
                                     "item_id": [e[1] for e in events[400:]],
                                     "timestamp": [e[2] for e in events[400:]],
                                     "event": [e[3] for e in events[400:]]}  # fmt: skip
    write_parquet(logs / "b.parquet", columns)
    (logs / "_SUCCESS").write_text("")  # side files are not inputs, here or there

    fs = fsspec.filesystem("s3")
    fs.put(str(logs), f"{s3_env}/raw/logs", recursive=True)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_env}/raw/logs")) == [
        "_SUCCESS",
        "a.csv",
        "b.parquet",
    ]

    assert build(logs, tmp_path / "local", *FLAGS) == 0
    assert build(f"s3://{s3_env}/raw/logs", f"s3://{s3_env}/datasets/shop", *FLAGS) == 0
    fs.get(f"{s3_env}/datasets/shop", str(tmp_path / "fetched"), recursive=True)
    local, remote = dataset_files(tmp_path / "local"), dataset_files(tmp_path / "fetched")
    assert [name for name in remote if name.startswith("part-")] == [
        "part-00000-of-00002.parquet",
        "part-00001-of-00002.parquet",
    ]
    assert remote == local  # shards, id maps, quarantine: byte for byte
    assert not fs.exists(f"{s3_env}/datasets/shop/_work")

    # readers take the URL directly; the dataset checks out (sizes, sha256) through s3fs
    info, ids, sequences = load_sequences(f"s3://{s3_env}/datasets/shop")
    local_info, local_ids, local_sequences = load_sequences(str(tmp_path / "local"))
    assert info.files == local_info.files
    assert ids.tolist() == local_ids.tolist()
    assert [s.tolist() for s in sequences] == [s.tolist() for s in local_sequences]

    # a glob under s3:// works too, and a rerun of the finished build does nothing
    assert build(f"s3://{s3_env}/raw/logs/*.csv", f"s3://{s3_env}/datasets/csv-only", *FLAGS) == 0
    assert build(f"s3://{s3_env}/raw/logs", f"s3://{s3_env}/datasets/shop", *FLAGS) == 0
