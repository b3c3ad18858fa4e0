"""Divergence (issue 20, item 2): a step whose loss or gradient is not finite on any rank is not
applied on any rank, in fp32 too; a run that keeps diverging stops with the permanent exit code
naming the step and the last good checkpoint, and commits nothing non-finite; numbers float32
cannot hold are refused by the config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PreparedSets
from faults import DATA, REPO, committed, env, tensors_of, train

from elcrec_dist.config import ConfigError, load_config
from elcrec_dist.errors import EXIT_PERMANENT

WORKER = REPO / "tests" / "reliability" / "workers" / "nonfinite_steps.py"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("loss.cluster_weight=-.inf", "loss.cluster_weight: expected a finite number"),
        # 1e-320 is a subnormal double: a process that flushes subnormals (elcrec_dist.numerics,
        # applied once the model is imported) already reads it as 0; refused either way
        (
            "loss.temperature=1e-320",
            "loss.temperature: 1e-320 is outside float32's normal range|"
            "loss.temperature must be > 0",
        ),
        ("loss.temperature=1e-39", "loss.temperature: 1e-39 is outside float32's normal range"),
        ("train.lr=1e39", "train.lr: 1e+39 is outside float32's normal range"),
        (
            "model.layer_norm_eps=1e-40",
            "model.layer_norm_eps: 1e-40 is outside float32's normal range",
        ),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be >= 1"),
        ("train.collective_timeout_s=0", "train.collective_timeout_s must be >= 1"),
    ],
)
def test_the_config_refuses_numbers_float32_cannot_hold(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")) as info:
        load_config("configs/demo.yaml", [override])
    assert override.split("=")[0] in str(info.value)  # names the key
    # the edges themselves pass: 0, and float32's smallest normal magnitude
    load_config(
        "configs/demo.yaml", ["train.weight_decay=0", "loss.temperature=1.1754943508222875e-38"]
    )


def _worker(out: Path, *, ranks: int, engine: list[str]) -> list[dict]:
    if ranks == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        from faults import free_port

        cmd = [
            "deepspeed",
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            str(WORKER),
        ]
    cmd += ["--out", str(out), "--steps", "3", "--bad-step", "1", "--bad-rank", str(ranks - 1)]
    for override in engine:
        cmd += ["--set", override]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def _assert_skipped_equals_omitted(rank: dict) -> None:
    skipped, omitted = rank["skipped"], rank["omitted"]
    for name, value in omitted["state"].items():  # weights, centres included: no projection
        assert torch.equal(skipped["state"][name], value), name
    assert skipped["optimizer"].keys() == omitted["optimizer"].keys()
    for key, moments in omitted["optimizer"].items():  # Adam's moments and step count
        for name, value in moments.items():
            assert torch.equal(skipped["optimizer"][key][name], value), (key, name)
    assert "master_centres" not in omitted or torch.equal(
        skipped["master_centres"], omitted["master_centres"]
    )


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("ranks", "engine", "flags"),
    [
        (1, ["deepspeed.zero_stage=0"], [0, 1, 0]),
        # ZeRO-2: the NaN lands in the last rank's gradient partition only; the flag's all-reduce
        # makes rank 0, whose own gradients are finite, skip the same step
        (2, ["deepspeed.zero_stage=2"], [0, 1, 0]),
    ],
    ids=["fp32-1rank", "zero2-2ranks"],
)
def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(
    tmp_path: Path, ranks: int, engine: list[str], flags: list[int]
) -> None:
    """Three steps with step 1's gradient made NaN on the last rank equal, bitwise, the same
    run without step 1: no weight, centre, Adam moment or Adam step count moved."""
    for rank in _worker(tmp_path, ranks=ranks, engine=engine):
        assert rank["skipped"]["flags"] == flags  # ranks that saw it, the same on every rank
        _assert_skipped_equals_omitted(rank)
        assert rank["skipped"]["losses"][2] == rank["omitted"]["losses"][1]


@pytest.fixture(scope="module")
def data(prepared_sets: PreparedSets) -> Path:
    return prepared_sets(DATA)


@pytest.mark.slow
def test_a_diverging_run_stops_permanently_and_commits_nothing_nonfinite(
    data: Path, tmp_path: Path
) -> None:
    """lr=1e8: the first update makes the weights huge, every later loss is NaN; the run stops
    after train.max_nonfinite_steps skipped steps with exit 2, naming the step and the last good
    checkpoint, and every tensor it committed is finite."""
    run_dir = tmp_path / "run"
    proc = train(
        data, run_dir, "train.lr=1e8", "train.checkpoint_every=2", "train.max_nonfinite_steps=3"
    )
    assert proc.returncode == EXIT_PERMANENT, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert (
        "training diverged: 3 steps in a row up to step 3 had a non-finite loss or gradient" in line
    )
    kept = committed(run_dir)
    assert [p.name for p in kept] == ["step-00000002"]
    assert f"The last good checkpoint is {kept[0]}" in line
    assert proc.stderr.count("its update was skipped") == 3
    for folder in kept:
        for path in folder.glob("*.pt"):
            for where, tensor in tensors_of(path).items():
                assert torch.isfinite(tensor).all(), where
    for best in run_dir.glob("best_model.pt"):
        for name, tensor in torch.load(best, weights_only=True)["model"].items():
            assert torch.isfinite(tensor).all(), name
