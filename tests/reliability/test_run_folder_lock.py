"""One trainer per run folder (issue 20, item 3): a second trainer on a folder in use exits 2
before writing anything; a lock left by a killed trainer does not block the next one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import PreparedSets
from faults import DATA, REPO, env, kill, train_args, wait_for

from elcrec_dist import runlock
from elcrec_dist.errors import EXIT_PERMANENT
from elcrec_dist.rundir import Folder


@pytest.fixture(scope="module")
def data(prepared_sets: PreparedSets) -> Path:
    return prepared_sets(DATA)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_run_folder_exits_before_writing_anything(
    data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = train_args(data, run_dir, "train.epochs=30", "train.checkpoint_every=2")
    with open(tmp_path / "first.log", "wb") as out:
        first = subprocess.Popen(
            [sys.executable, "launcher/train.py", *args],
            cwd=REPO,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), timeout_s=200, what="the run log")
        first.send_signal(signal.SIGSTOP)  # the folder stays exactly as it is while we look
        before = _snapshot(run_dir)
        second = subprocess.run(
            [sys.executable, "launcher/train.py", *args, "--resume", "auto"],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        after = _snapshot(run_dir)
    finally:
        kill(first)
    assert second.returncode == EXIT_PERMANENT, second.stderr[-3000:]
    [line] = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert "another trainer is using this run folder" in line
    assert f"pid {first.pid}" in line
    assert after == before  # not one file written, touched or removed
    # the lock dies with its holder: the killed run's folder can be resumed at once
    holder = json.loads((run_dir / runlock.LOCK_NAME).read_text())
    assert holder["pid"] == first.pid
    with runlock.hold_run_folder(run_dir):
        pass


def test_an_object_store_lease_refuses_a_live_holder_and_takes_over_a_dead_one(
    s3_env: str,
) -> None:
    """s3: the lease object is created only if absent; a holder that renews it keeps it, one
    that stopped renewing (killed) loses it after the expiry (small times here)."""
    folder = Folder(f"s3://{s3_env}/runs/x")
    holder = runlock.LeaseLock(folder, renew_s=0.5, expiry_s=3.0)
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(runlock.RunFolderBusy, match="another trainer is using this run folder"):
            runlock.LeaseLock(folder, renew_s=0.5, expiry_s=3.0).acquire()
        assert time.monotonic() - started < 3.0  # refused as soon as a renewal was seen
    finally:
        holder._stop.set()  # killed: it neither renews nor releases the lease
        assert holder._thread is not None
        holder._thread.join()
    taker = runlock.LeaseLock(folder, renew_s=0.5, expiry_s=3.0)
    started = time.monotonic()
    taker.acquire()
    assert 3.0 <= time.monotonic() - started < 10.0  # waited out the expiry, then took it
    racer_failed = threading.Event()

    def race() -> None:
        try:
            runlock.LeaseLock(folder, renew_s=0.5, expiry_s=3.0).acquire()
        except runlock.RunFolderBusy:
            racer_failed.set()

    racer = threading.Thread(target=race)
    racer.start()
    racer.join(timeout=15)
    assert racer_failed.is_set()  # the new holder renews: refused
    taker.release()
    assert not folder.exists(runlock.LOCK_NAME)
