"""What the reliability tests share: a tiny run that trains in seconds, the ways to start it (one
process; two ranks started by hand as a scheduler's launcher would; the deepspeed launcher), and
readers of what a run left behind.

Imported as ``from faults import ...`` (pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from data_prep.synthetic import SyntheticSpec

REPO = Path(__file__).resolve().parents[2]
# 240 users of 6..12 items, batches of 40: 6 steps per epoch, an epoch in about a second.
DATA = SyntheticSpec(users=240, items=60, intents=4, min_len=6, max_len=12, seed=11)
STEPS_PER_EPOCH = 6
TINY = [
    "model.hidden_size=16",
    "model.max_len=12",
    "model.num_clusters=4",
    "kmeans.sample_users=120",
    "kmeans.restarts=1",
    "train.batch_size=40",
    "train.epochs=2",
    "train.log_every=1",
    "eval.batch_size=256",
    "train.collective_timeout_s=20",
]
TIMEOUT_S = 240  # the longest any one process of these tests may take


def env(**extra: str) -> dict[str, str]:
    """This environment, one intra-op thread per process (several processes share two cores in
    CI), the CPU accelerator, this interpreter's scripts first on PATH, and ``extra``."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        **extra,
    }


def train_args(
    data: Path, run_dir: Path | str, *overrides: str, resume: str | None = None
) -> list[str]:
    """``launcher/train.py``'s arguments for the tiny run (``overrides`` after ``TINY``)."""
    args = ["--config", "configs/demo.yaml", "--data", str(data), "--run-dir", str(run_dir)]
    for override in (*TINY, *overrides):
        args += ["--set", override]
    if resume is not None:
        args += ["--resume", resume] if resume != "required" else ["--resume"]
    return args


def train(
    data: Path,
    run_dir: Path | str,
    *overrides: str,
    resume: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The tiny run as one process (a world of one), to its end."""
    return subprocess.run(
        [
            sys.executable,
            "launcher/train.py",
            *train_args(data, run_dir, *overrides, resume=resume),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env(**(extra_env or {})),
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_ranks(
    args: Sequence[str], *, world: int = 2, logs: Path
) -> list[subprocess.Popen[bytes]]:
    """``world`` ranks of ``launcher/train.py ARGS`` (``start_worker_ranks``)."""
    return start_worker_ranks(["launcher/train.py", *args], world=world, logs=logs)


def start_worker_ranks(
    argv: Sequence[str], *, world: int = 2, logs: Path
) -> list[subprocess.Popen[bytes]]:
    """``world`` ranks of ``python ARGV`` started by hand with the variables a launcher sets
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), each in its own session, its
    output in ``logs/rank{r}.log``: a test can signal, stop or kill one of them."""
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        rank_env = env(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        with open(logs / f"rank{rank}.log", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv],
                    cwd=REPO,
                    env=rank_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return procs


def wait_all(
    procs: Sequence[subprocess.Popen[bytes]], *, timeout_s: float = TIMEOUT_S
) -> list[int]:
    """The exit codes of ``procs``; any still running after ``timeout_s`` is killed (-9)."""
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            kill(proc)
            codes.append(-9)
    return codes


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s whole session (it was started in one), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def committed(run_dir: Path) -> list[Path]:
    """The run folder's checkpoint folders that hold a commit record, oldest first."""
    return sorted(p.parent for p in (run_dir / "checkpoints").glob("step-*/COMMITTED.json"))


def logged_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the loss terms logged at it (every step is logged: ``train.log_every=1``)."""
    out: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        terms = {k: v for k, v in row.items() if k.startswith("loss/")}
        if terms:
            assert row["step"] not in out, f"step {row['step']} logged twice"
            out[row["step"]] = terms
    return out


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint file, by its path in the file's nested containers."""
    found: dict[str, torch.Tensor] = {}

    def walk(value: object, where: str) -> None:
        if isinstance(value, torch.Tensor):
            found[where] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}/{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, f"{where}/{i}")

    from elcrec_dist.checkpoint import safe_checkpoint_engine

    walk(safe_checkpoint_engine().load(str(path), map_location="cpu"), path.name)
    return found


def model_states(folder: Path) -> dict[str, torch.Tensor]:
    """The module weights of a committed checkpoint folder (fp32 at ZeRO 0)."""
    from elcrec_dist.checkpoint import load_model_weights

    return load_model_weights(folder)
