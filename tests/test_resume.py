"""Fault test (issue 3): a 2-rank run killed after a mid-epoch checkpoint and resumed ends with
the same parameters and the same logged loss sequence as an uninterrupted run, bitwise."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PreparedSets, write_prepared
from launch import deepspeed_command, deepspeed_env

from data_prep.synthetic import SyntheticSpec
from elcrec_dist.checkpoint import load_model_weights
from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "train.epochs=2",
    "train.batch_size=64",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=3",
    "train.log_every=1",
    "model.num_clusters=8",
    "kmeans.sample_users=500",
]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _cmd(data: Path, run_dir: Path, *extra: str) -> list[str]:
    cmd, _ = deepspeed_command("launcher/train.py", "--config", "configs/demo.yaml",
                               "--data", str(data), "--run-dir", str(run_dir), *extra)
    for o in OVERRIDES:
        cmd += ["--set", o]
    return cmd


def _losses(run_dir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        terms = {k: v for k, v in row.items() if k.startswith("loss/")}
        if terms:
            assert row["step"] not in out, f"step {row['step']} logged twice"
            out[row["step"]] = terms
    return out


def _centre_stats(run_dir: Path) -> list[dict[str, float]]:
    """The centre statistics of every epoch, in order (they count the users each centre won)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in row.items() if k.startswith("centres/")}
        for row in rows
        if "centres/dead_fraction" in row
    ]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return torch.load(
        newest / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu"
    )["module"]


DATA = SyntheticSpec(users=1200, items=200, intents=4, seed=5)


@pytest.fixture(scope="module")
def data(prepared_sets: PreparedSets) -> Path:
    return prepared_sets(DATA)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    proc = subprocess.run(
        _cmd(data, straight),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=deepspeed_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    broken = tmp_path / "broken"
    # 1200 users / 64 = 19 steps per epoch: step 10 is mid-epoch 0
    marker = broken / "checkpoints" / "step-00000010" / "COMMITTED.json"
    victim = subprocess.Popen(
        _cmd(data, broken),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=deepspeed_env(),
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never wrote its step-10 checkpoint"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (broken / "results.json").exists()

    proc = subprocess.run(
        _cmd(data, broken, "--resume"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=deepspeed_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr

    a, b = _losses(straight), _losses(broken)
    assert sorted(a) == list(range(1, 39)) and a == b  # 2 epochs x 19 steps, bitwise equal floats
    # epoch 0 was cut at step 10: its centre statistics still count the users of all 19 steps
    stats_a, stats_b = _centre_stats(straight), _centre_stats(broken)
    assert len(stats_a) == 2 and stats_a == stats_b
    model_a, model_b = _final_model(straight), _final_model(broken)
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    # the committed folder also serves as a model source (launcher/evaluate.py --checkpoint)
    newest = sorted((straight / "checkpoints").glob("step-*"))[-1]
    weights = load_model_weights(newest)
    assert (
        weights.keys()
        == ELCRec(load_config(REPO / "configs" / "demo.yaml", OVERRIDES).model, num_items=200)
        .state_dict()
        .keys()
    )
    for name, value in weights.items():
        assert torch.equal(value, model_a["model." + name]), name
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (straight, broken))
    assert ra["test"] == rb["test"] and ra["valid_history"] == rb["valid_history"]


def test_resume_without_a_checkpoint_fails_loudly(data: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "launcher/train.py", "--config", "configs/demo.yaml",
                           "--data", str(data), "--run-dir", str(tmp_path / "empty"), "--resume"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no complete checkpoint" in proc.stderr


def test_resume_auto_starts_afresh_without_a_checkpoint_then_resumes(
    data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "auto"
    base = [sys.executable, "launcher/train.py", "--config", "configs/demo.yaml",
            "--data", str(data), "--run-dir", str(run_dir), "--resume", "auto",
            "--set", "train.epochs=1", "--set", "model.num_clusters=8",
            "--set", "kmeans.sample_users=500"]
    first = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "resumed from" not in first.stderr
    # the finished run's last checkpoint is at the end of epoch 0; asking for 2 epochs continues it
    second = subprocess.run(
        [*base, "--set", "train.epochs=2"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stderr and "epoch 1, step 0" in second.stderr


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_resume_that_changes_the_computation_is_refused_before_anything_is_written(
    data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "changed"
    base = [sys.executable, "launcher/train.py", "--config", "configs/demo.yaml",
            "--data", str(data), "--run-dir", str(run_dir), "--set", "train.epochs=1",
            "--set", "model.num_clusters=8", "--set", "kmeans.sample_users=500"]
    first = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(run_dir)
    config_text = (run_dir / "config.yaml").read_text()

    changed = subprocess.run(
        [*base, "--set", "train.lr=0.01", "--set", "loss.fusion=none", "--resume", "auto"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert (
        "cannot resume" in changed.stderr
        and "train.lr" in changed.stderr
        and "loss.fusion" in changed.stderr
    )
    assert "train.epochs" not in changed.stderr
    assert _snapshot(run_dir) == before  # config.yaml, logs, TensorBoard and checkpoints untouched
    assert (run_dir / "config.yaml").read_text() == config_text

    # the same settings on a rebuilt dataset (another seed: same sizes, other sequences)
    other = write_prepared(tmp_path / "rebuilt", dataclasses.replace(DATA, seed=6))
    rebuilt = [*base, "--data", str(other), "--resume"]  # the later --data wins
    moved = subprocess.run(rebuilt, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert moved.returncode == 2, moved.stderr[-2000:]
    assert "another dataset" in moved.stderr and "files_sha256" in moved.stderr
    assert _snapshot(run_dir) == before

    # what a resume may change (how long, how often) goes through
    longer = subprocess.run(
        [*base, "--set", "train.epochs=2", "--set", "train.log_every=7", "--resume"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resumed from" in longer.stderr and "epoch 1, step 0" in longer.stderr


def test_a_run_killed_after_its_early_stop_only_finishes(data: Path, tmp_path: Path) -> None:
    """Killed between the last checkpoint and results.json: the resumed run trains nothing more."""
    run_dir = tmp_path / "stopped"
    cmd = [sys.executable, "launcher/train.py", "--config", "configs/demo.yaml",
           "--data", str(data), "--run-dir", str(run_dir), "--set", "train.epochs=30",
           "--set", "train.patience=1", "--set", "train.lr=0.05", "--set", "train.log_every=1",
           "--set", "model.num_clusters=8", "--set", "kmeans.sample_users=500"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = json.loads((run_dir / "results.json").read_text())
    assert before["epochs_run"] < 30, "the setup must stop early to test this"
    losses = _losses(run_dir)
    (run_dir / "results.json").unlink()  # as if killed before writing it

    again = subprocess.run(
        [*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training had stopped early" in again.stderr
    after = json.loads((run_dir / "results.json").read_text())
    assert _losses(run_dir) == losses  # not one step more
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the first process's test row was rewound
    assert sum("test/NDCG@20" in row for row in rows) == 1
    for key in ("test", "best_epoch", "epochs_run", "valid_history"):
        assert after[key] == before[key], key
