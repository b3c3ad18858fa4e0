"""Training from ``s3://`` (a local S3-protocol server on loopback) equals training from the
same prepared dataset in a local folder (issue 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PreparedSets

from data_prep.synthetic import SyntheticSpec

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.epochs=2", "train.batch_size=64", "model.num_clusters=8", "kmeans.sample_users=400", "train.log_every=1"]


def _train(data: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "launcher/train.py", "--config", "configs/demo.yaml", "--data", data, "--run-dir", str(run_dir)]
    for o in OVERRIDES:
        cmd += ["--set", o]
    # One intra-op thread: with two, CPU float reductions (e.g. the embedding gradient) are not
    # bitwise repeatable from run to run, and this test compares runs exactly.
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_training_from_s3_equals_training_from_a_local_folder(
    s3_env: str, tmp_path: Path, prepared_sets: PreparedSets
) -> None:
    import fsspec

    local = prepared_sets(SyntheticSpec(users=600, items=150, intents=4, seed=2))
    remote = f"s3://{s3_env}/prepared/demo"
    fs = fsspec.filesystem("s3")
    for path in sorted(local.iterdir()):
        fs.put(str(path), f"{remote}/{path.name}")

    a = _train(str(local), tmp_path / "run-local")
    b = _train(remote, tmp_path / "run-s3")
    assert a.returncode == 0, a.stderr[-3000:]
    assert b.returncode == 0, b.stderr[-3000:]
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("run-local", "run-s3"))
    assert ra["test"] == rb["test"] and ra["valid_history"] == rb["valid_history"]
    assert ra["popularity_test"] == rb["popularity_test"] and ra["intent_recovery"] == rb["intent_recovery"]
    la, lb = ((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("run-local", "run-s3"))
    losses = [[{k: v for k, v in json.loads(x).items() if k.startswith("loss/")} for x in lines] for lines in (la, lb)]
    assert losses[0] == losses[1] and sum(1 for row in losses[0] if row) == 2 * 10  # 600 users / 64 -> 10 steps per epoch
    # no credentials end up in the run folder
    for path in (tmp_path / "run-s3").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".jsonl"):
            assert "testing" not in path.read_text()


def test_a_missing_s3_dataset_is_a_permanent_error(s3_env: str, tmp_path: Path) -> None:
    proc = _train(f"s3://{s3_env}/nothing-here", tmp_path / "run")
    assert proc.returncode == 2
    assert "manifest.json" in proc.stderr
