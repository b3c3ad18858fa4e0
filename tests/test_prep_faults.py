"""A build killed midway (SIGKILL at a chosen point, via ELCREC_PREP_FAULT) leaves no dataset;
running it again finishes with exactly the bytes of an uninterrupted build."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_prep_reference import build, dataset_files, events_csv

from elcrec_dist.errors import EXIT_RETRYABLE
from elcrec_dist.prepared import MANIFEST_NAME, DatasetError, read_info

REPO = Path(__file__).resolve().parents[1]
# small runs and several buckets and shards, so every stage has more than one unit to die in
FLAGS = ("--shards", "2", "--buckets", "4", "--set", "run_rows=150", "--max-len", "9")


@pytest.fixture(scope="module")
def log_and_clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("faults")
    rng = random.Random(11)
    events = [
        (f"u{rng.randint(0, 30)}", f"i{rng.randint(0, 20)}", rng.randint(0, 99), "v")
        for _ in range(700)
    ]
    logs = root / "logs"
    logs.mkdir()
    events_csv(logs / "a.csv", events[:350])
    events_csv(logs / "b.csv", events[350:])
    assert build(logs, root / "clean", *FLAGS) == 0
    return logs, dataset_files(root / "clean")


def _killed_run(logs: Path, out: Path, fault: str, jobs: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "data_prep.build", "--input", str(logs), "--output", str(out),
               "--jobs", str(jobs), "--no-progress", "--max-time", "2030-01-01",
               *FLAGS]  # fmt: skip
    env = {**os.environ, "ELCREC_PREP_FAULT": fault, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fault", ["map-run:2", "reduce-bucket:3", "write-shard:1", "commit"])
def test_killed_build_resumes_to_identical_bytes(
    tmp_path: Path, log_and_clean: tuple[Path, dict[str, bytes]], fault: str
) -> None:
    logs, clean = log_and_clean
    out = tmp_path / "out"
    result = _killed_run(logs, out, fault, jobs=1)
    assert result.returncode == -9, result.stderr  # killed, no cleanup ran
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(DatasetError, match=r"no manifest\.json"):
        read_info(str(out))
    assert build(logs, out, *FLAGS) == 0
    assert dataset_files(out) == clean
    assert not (out / "_work").exists()


def test_killed_worker_process_exits_retryable_and_resumes(
    tmp_path: Path, log_and_clean: tuple[Path, dict[str, bytes]]
) -> None:
    logs, clean = log_and_clean
    out = tmp_path / "out"
    result = _killed_run(logs, out, "map-run:1", jobs=2)  # each map worker dies in its process
    assert result.returncode == EXIT_RETRYABLE, result.stderr
    assert "a worker process died" in result.stderr
    assert not (out / MANIFEST_NAME).exists()
    assert build(logs, out, *FLAGS, jobs=2) == 0
    assert dataset_files(out) == clean
