"""``train.lr_schedule``: the rate at each step, checked against values worked out by hand, and
the rate the optimizer actually steps with in a short training run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_prepared

from elcrec_dist.config import ConfigError, load_config
from elcrec_dist.trainer.schedule import learning_rate

REPO = Path(__file__).resolve().parents[1]


def _train(*overrides: str):
    return load_config("configs/demo.yaml", ["data.path=x", *overrides]).train


def test_constant_is_the_configured_rate_at_every_step() -> None:
    train = _train("train.lr=0.004")
    assert [learning_rate(train, step=s, total_steps=10) for s in (0, 5, 9, 50)] == [0.004] * 4


def test_cosine_by_hand() -> None:
    # lr 0.005 to lr_min 0.001 over 5 steps: progress 0, 1/4, 1/2, 3/4, 1 of half a cosine, so
    # 0.001 + 0.004 * (1 + cos(pi * p)) / 2 = 0.005, 0.001 + 0.002 * (1 + 0.70711), 0.003,
    # 0.001 + 0.002 * (1 - 0.70711), 0.001
    train = _train("train.lr=0.005", "train.lr_schedule=cosine", "train.lr_min=0.001")
    got = [learning_rate(train, step=s, total_steps=5) for s in range(5)]
    half_root2 = math.sqrt(2) / 2
    expected = [0.005, 0.001 + 0.002 * (1 + half_root2), 0.003, 0.001 + 0.002 * (1 - half_root2),
                0.001]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # past the end (a resume that runs longer is refused; a caller asking anyway gets lr_min)
    assert learning_rate(train, step=9, total_steps=5) == pytest.approx(0.001)
    # a one-step run trains at lr
    assert learning_rate(train, step=0, total_steps=1) == 0.005


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr_schedule=linear"], "train.lr_schedule"),
        (["train.lr_schedule=cosine", "train.lr_min=0.01", "train.lr=0.001"], "train.lr_min"),
        (["train.lr_min=-0.0001"], "train.lr_min"),
    ],
)
def test_bad_schedules_are_refused_by_name(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _train(*overrides)


@pytest.mark.slow
def test_the_optimizer_steps_with_the_scheduled_rate(tmp_path: Path) -> None:
    # 300 users in batches of 100: 3 steps an epoch, 2 epochs, every step logged with its rate;
    # the optimizer state in the last checkpoint holds the rate its last step used.
    data = tmp_path / "data"
    write_prepared(data, [[1 + (u + j) % 40 for j in range(6)] for u in range(300)],
                   num_items=40)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launcher/train.py", "--config", "configs/demo.yaml", "--data", str(data),
         "--run-dir", str(run), "--set", "train.epochs=2", "--set", "train.batch_size=100",
         "--set", "train.log_every=1", "--set", "train.lr=0.01", "--set", "train.lr_min=0.002",
         "--set", "train.lr_schedule=cosine", "--set", "model.num_clusters=4",
         "--set", "kmeans.sample_users=300"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: row["lr"] for row in rows if "lr" in row}
    # step s logs after its update at global step s - 1; 6 steps from 0.01 down to 0.002
    expected = {s + 1: 0.002 + 0.008 * (1 + math.cos(math.pi * s / 5)) / 2 for s in range(6)}
    assert logged == pytest.approx(expected, rel=1e-12)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    state = torch.load(newest / "mp_rank_00_model_states.pt", weights_only=False,
                       map_location="cpu")
    groups = state["optimizer"]["param_groups"]
    assert groups and all(g["lr"] == pytest.approx(0.002, rel=1e-12) for g in groups)
