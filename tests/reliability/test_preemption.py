"""Preemption (issue 20, item 7): SIGTERM makes every rank checkpoint at the same, next step and
exit 75, and the same command with ``--resume`` continues from there; a signalled launcher
(the container entrypoint, or a bare ``deepspeed`` command) leaves no rank behind."""

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
from conftest import PreparedSets
from faults import (
    DATA,
    REPO,
    committed,
    env,
    free_port,
    kill,
    logged_losses,
    start_ranks,
    train_args,
    wait_all,
    wait_for,
)

from elcrec_dist.checkpoint import COMMIT_NAME
from elcrec_dist.errors import EXIT_RETRYABLE
from elcrec_dist.processes import has_ended, ranks_below

# 2,400 users in batches of 8: 300 steps in the one epoch, so a signal lands mid-epoch. A tiny
# step takes milliseconds and a rank polls its launcher once a second: with the 30 steps of the
# 240-user set the epoch could end before a signal was noticed (it did, once, under CI load).
LONG_DATA = dataclasses.replace(DATA, users=2400)
LONG_EPOCH = ["train.batch_size=8", "train.epochs=1"]
STEPS = 300
STOP_BOUND_S = 30  # signal to exit: the step in progress, the checkpoint, the exit


@pytest.fixture(scope="module")
def data(prepared_sets: PreparedSets) -> Path:
    return prepared_sets(LONG_DATA)


def _logged_step(run_dir: Path) -> int:
    """The last training step in the run log so far (0 before the first)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # being written
        if any(k.startswith("loss/") for k in row):
            steps.append(row["step"])
    return max(steps)


def _stopped_at(run_dir: Path, after: int) -> int:
    """The step of the one checkpoint the stop committed (after step ``after``)."""
    [folder] = committed(run_dir)
    state = json.loads((folder / COMMIT_NAME).read_text())["state"]
    assert state["global_step"] >= after and state["step_in_epoch"] == state["global_step"]
    assert 0 < state["global_step"] < STEPS, "the stop must land mid-epoch for this test"
    return int(state["global_step"])


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_checkpoints_at_the_next_step_on_every_rank_and_exits_retryable(
    data: Path, tmp_path: Path
) -> None:
    """SIGTERM to one rank: both stop at the same step (the request travels in the step's
    all-reduce), commit a checkpoint there and exit 75; resuming finishes the epoch with every
    step logged once."""
    run_dir = tmp_path / "run"
    args = train_args(data, run_dir, *LONG_EPOCH)
    ranks = start_ranks(args, logs=tmp_path / "first")
    wait_for(lambda: _logged_step(run_dir) >= 3, timeout_s=200, what="step 3")
    signalled_at = _logged_step(run_dir)
    os.kill(ranks[1].pid, signal.SIGTERM)
    started = time.monotonic()
    codes = wait_all(ranks, timeout_s=STOP_BOUND_S + 30)
    assert time.monotonic() - started < STOP_BOUND_S
    logs = [(tmp_path / "first" / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [EXIT_RETRYABLE, EXIT_RETRYABLE], logs[0][-2000:] + logs[1][-2000:]
    step = _stopped_at(run_dir, signalled_at)
    assert f"error: stopped on request (SIGTERM) at step {step}" in logs[1]
    assert f"error: stopped on request (another rank was asked to stop) at step {step}" in logs[0]

    resumed = start_ranks([*args, "--resume"], logs=tmp_path / "second")
    assert wait_all(resumed) == [0, 0], (tmp_path / "second" / "rank0.log").read_text()[-3000:]
    assert f"step-{step:08d}" in (tmp_path / "second" / "rank0.log").read_text()
    assert sorted(logged_losses(run_dir)) == list(range(1, STEPS + 1))  # each step once
    assert (run_dir / "results.json").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_a_bare_deepspeed_launcher_leaves_no_rank_behind(
    data: Path, tmp_path: Path
) -> None:
    """``kill`` of the ``deepspeed`` command ends its runner at once; the ranks notice that their
    launcher is gone, checkpoint and exit instead of running on as orphans."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    command = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "launcher/train.py",
        *train_args(data, run_dir, *LONG_EPOCH),
    ]
    with open(log, "wb") as out:
        runner = subprocess.Popen(
            command,
            cwd=REPO,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: _logged_step(run_dir) >= 3, timeout_s=200, what="step 3")
        ranks = ranks_below(runner.pid)
        assert len(ranks) == 2, ranks
        signalled_at = _logged_step(run_dir)
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        wait_for(
            lambda: all(has_ended(r) for r in ranks),
            timeout_s=STOP_BOUND_S,
            what="the ranks to end",
        )
    finally:
        kill(runner)
    _stopped_at(run_dir, signalled_at)
    assert log.read_text().count("error: stopped on request (launcher process") == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_the_entrypoint_checkpoints_exits_retryable_and_cleans_up(
    data: Path, tmp_path: Path
) -> None:
    """The container entrypoint (one node of an Indexed Job, two ranks) passes SIGTERM to the
    ranks; the pod's exit code is theirs, 75, and its temporary hostfile folder is gone."""
    run_dir, temp = tmp_path / "run", tmp_path / "tmp"
    temp.mkdir()
    pod = env(
        JOB_COMPLETION_INDEX="0",
        ELCREC_NUM_NODES="1",
        ELCREC_PROCS_PER_NODE="2",
        ELCREC_JOB_NAME="t",
        ELCREC_SERVICE_NAME="t",
        ELCREC_HOST_ALIASES="t-0.t=127.0.0.1",
        ELCREC_MASTER_PORT=str(free_port()),
        TMPDIR=str(temp),
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        pod.pop(name, None)
    log = tmp_path / "entrypoint.log"
    with open(log, "wb") as out:
        entry = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launcher.entrypoint",
                "--",
                *train_args(data, run_dir, *LONG_EPOCH),
            ],
            cwd=REPO,
            env=pod,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: _logged_step(run_dir) >= 3, timeout_s=200, what="step 3")
        assert len(_node_folders(temp)) == 1
        signalled_at = _logged_step(run_dir)
        entry.send_signal(signal.SIGTERM)
        code = entry.wait(timeout=STOP_BOUND_S + 30)
    finally:
        kill(entry)
    output = log.read_text()
    assert code == EXIT_RETRYABLE, output[-3000:]
    _stopped_at(run_dir, signalled_at)
    assert output.count("error: stopped on request (SIGTERM)") == 2
    assert _node_folders(temp) == []


def _node_folders(temp: Path) -> list[Path]:
    return [p for p in temp.iterdir() if p.name.startswith("elcrec-node-")]
