"""Exit codes by family (issue 20, item 5): every failure an operator meets ends with one line and
the documented code, 75 where running the job again may succeed, 2 where it cannot; a lost or
hung peer, a refused or hung object store and a full disk each within a bounded time."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import PreparedSets
from faults import (
    DATA,
    REPO,
    committed,
    env,
    kill,
    start_ranks,
    start_worker_ranks,
    train,
    train_args,
    wait_all,
    wait_for,
)

from elcrec_dist.errors import EXIT_BUG, EXIT_PERMANENT, EXIT_RETRYABLE, failure_of


def _raised(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        raise exc from cause
    except BaseException as chained:
        return chained


# What torch, gloo, botocore and the OS raise in each case, verbatim (seen on this project's
# faults); the families must not depend on which layer raised them.
GLOO_PEER_KILLED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
    "by peer [127.0.0.1]:51883. This is typically caused by a remote worker crashing."
)
GLOO_PEER_HUNG = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
    "waiting 5000ms for recv operation to complete"
)


def test_failure_families_map_to_their_codes_with_one_line() -> None:
    import botocore.exceptions

    from elcrec_dist.checkpoint import CheckpointError
    from elcrec_dist.config import ConfigError
    from elcrec_dist.rundir import StorageError

    cases = [
        (
            RuntimeError(GLOO_PEER_KILLED),
            EXIT_RETRYABLE,
            "lost a peer (a collective failed): Connection closed by peer",
        ),
        (
            RuntimeError(GLOO_PEER_HUNG),
            EXIT_RETRYABLE,
            "lost a peer (a collective failed): Timed out waiting 5000ms",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/run/x.pt"),
            EXIT_RETRYABLE,
            "/run/x.pt: No space left on device",
        ),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), EXIT_RETRYABLE, "No space left on device"),
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
            EXIT_RETRYABLE,
            "a file write failed (is the disk full?): unexpected pos 576 vs 534",
        ),
        (
            botocore.exceptions.EndpointConnectionError(
                endpoint_url="http://127.0.0.1:9/b/manifest.json"
            ),
            EXIT_RETRYABLE,
            "storage unreachable: Could not connect to the endpoint URL",
        ),
        (
            botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:9/b"),
            EXIT_RETRYABLE,
            "storage unreachable: Read timeout",
        ),
        (
            StorageError("s3://b/run/x: storage failed after 6 attempt(s)"),
            EXIT_RETRYABLE,
            "storage failed",
        ),
        (
            ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
            EXIT_RETRYABLE,
            "Connection reset",
        ),
        (
            _raised(ValueError("reading s3://b/m.json"), ConnectionRefusedError(111, "refused")),
            EXIT_RETRYABLE,
            "reading s3://b/m.json: [Errno 111] refused",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/ro/run"),
            EXIT_PERMANENT,
            "/ro/run: Permission denied",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/run"),
            EXIT_PERMANENT,
            "/run: Read-only file system",
        ),
        (ConfigError("train.lr: expected a finite number, got inf"), EXIT_PERMANENT, "train.lr"),
        (CheckpointError("x.pt: refusing to load it"), EXIT_PERMANENT, "refusing"),
        (RuntimeError("an index went wrong"), EXIT_BUG, "RuntimeError: an index went wrong"),
        (KeyError("model"), EXIT_BUG, "KeyError"),
    ]
    for exc, code, text in cases:
        failure = failure_of(exc)
        assert (failure.code, text in failure.message) == (code, True), (exc, failure)
        assert "\n" not in failure.message and "pair.cc" not in failure.message


@pytest.fixture(scope="module")
def data(prepared_sets: PreparedSets) -> Path:
    return prepared_sets(DATA)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    return lines[-1] if lines else log.read_text()[-2000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_peer_ends_the_other_rank_retryable(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ranks = start_ranks(
        train_args(data, run_dir, "train.epochs=20", "train.checkpoint_every=2"), logs=tmp_path
    )
    wait_for(lambda: bool(committed(run_dir)), timeout_s=200, what="a first checkpoint")
    os.killpg(ranks[1].pid, signal.SIGKILL)
    started = time.monotonic()
    [code, _] = wait_all(ranks, timeout_s=60)
    assert code == EXIT_RETRYABLE, (tmp_path / "rank0.log").read_text()[-3000:]
    assert time.monotonic() - started < 30
    line = _last_line(tmp_path / "rank0.log")
    assert line.startswith("error: lost a peer") or line.startswith("error: a collective failed"), (
        line
    )
    assert "Traceback" not in (tmp_path / "rank0.log").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hung_peer_fails_within_the_collective_timeout(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ranks = start_ranks(
        train_args(
            data,
            run_dir,
            "train.epochs=20",
            "train.checkpoint_every=2",
            "train.collective_timeout_s=5",
        ),
        logs=tmp_path,
    )
    try:
        wait_for(lambda: bool(committed(run_dir)), timeout_s=200, what="a first checkpoint")
        os.killpg(ranks[1].pid, signal.SIGSTOP)
        started = time.monotonic()
        code = wait_all(ranks[:1], timeout_s=60)[0]
        waited = time.monotonic() - started
    finally:
        os.killpg(ranks[1].pid, signal.SIGKILL)
        ranks[1].wait()
    assert code == EXIT_RETRYABLE, (tmp_path / "rank0.log").read_text()[-3000:]
    assert waited < 5 + 20, waited  # the timeout, plus the step in progress and the exit
    assert "Timed out waiting" in _last_line(tmp_path / "rank0.log")


HANG_WORKER = REPO / "tests" / "reliability" / "workers" / "hang_in_backward.py"


@pytest.mark.distributed
def test_a_peer_hung_before_the_gradient_all_reduce_fails_within_the_timeout(
    tmp_path: Path,
) -> None:
    """The test above stops a peer wherever it happens to be; this one stops it at the one
    point that test met only now and then (once in about five runs): after the step's forward
    collectives, inside its backward. The other rank then waits in DeepSpeed's gradient
    all-reduce, on a group DeepSpeed made itself; that group must wait no longer than
    ``train.collective_timeout_s`` either (it waited torch's default of 30 minutes)."""
    timeout_s = 3
    ranks = start_worker_ranks(
        [str(HANG_WORKER), "--timeout-s", str(timeout_s), "--hang-rank", "1"], logs=tmp_path
    )
    try:
        code = wait_all(ranks[:1], timeout_s=120)[0]
    finally:
        kill(ranks[1])
    log = (tmp_path / "rank0.log").read_text()
    assert code == EXIT_RETRYABLE, log[-3000:]
    waited = re.search(r"rank 0 of 2: the step ended after ([0-9.]+) s", log)
    assert waited is not None, log[-3000:]
    assert float(waited.group(1)) < timeout_s + 10, log[-3000:]
    assert "Timed out waiting" in _last_line(tmp_path / "rank0.log")


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    """A loopback port nothing listens on: every connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.mark.slow
def test_a_refused_s3_connection_exits_retryable(dead_endpoint: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "launcher/train.py",
            "--config",
            "configs/demo.yaml",
            "--data",
            "s3://bucket/prepared",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env(**S3_ENV, AWS_ENDPOINT_URL=dead_endpoint, AWS_MAX_ATTEMPTS="2"),
    )
    assert proc.returncode == EXIT_RETRYABLE, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "127.0.0.1" in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture
def hung_endpoint() -> Iterator[str]:
    """A loopback server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def _fails_within_the_bound(attempt: Callable[[], object]) -> str:
    """Run ``attempt`` against the hung store (``small_storage_bounds``): it must fail
    retryable and within 2 attempts x (read timeout + backoff), with slack; its message."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        attempt()
    waited = time.monotonic() - started
    s3fs.S3FileSystem.clear_instance_cache()
    failure = failure_of(info.value)
    assert failure.code == EXIT_RETRYABLE, failure
    assert "timeout" in failure.message.lower(), failure
    assert waited < 2 * (1 + 2) + 5, waited
    return failure.message


@pytest.fixture
def small_storage_bounds(hung_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every S3 filesystem opened in the test talks to the hung endpoint, with 2 attempts and
    1 s timeouts (the defaults are rundir's, docs/RELIABILITY.md)."""
    from elcrec_dist import rundir

    for name, value in {
        **S3_ENV,
        "AWS_ENDPOINT_URL": hung_endpoint,
        "AWS_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rundir, "READ_TIMEOUT_S", 1)
    monkeypatch.setattr(rundir, "CONNECT_TIMEOUT_S", 1)


@pytest.mark.usefixtures("small_storage_bounds")
def test_a_hung_s3_endpoint_fails_within_the_configured_time() -> None:
    """The storage policy bounds each request (read timeout) and the attempts; past them the
    error is retryable."""
    from elcrec_dist.stream import StreamingDataset

    _fails_within_the_bound(lambda: StreamingDataset.open("s3://bucket/prepared"))


@pytest.mark.usefixtures("small_storage_bounds")
def test_an_output_folder_on_a_hung_s3_endpoint_fails_within_the_configured_time() -> None:
    """The commands after training (inference, export, the intent report) write their output
    folders under the same storage policy as training: bounded requests and attempts, then a
    retryable error naming the output. (They once opened the store with s3fs's defaults: 60 s
    reads, s3fs's own 5 retries over botocore's, far past the budget.)"""
    from elcrec_dist.outputs import OutputFolder, read_manifest

    for attempt in (
        lambda: OutputFolder("s3://bucket/scores", kind="scores", request={"k": 1}).claim(),
        lambda: read_manifest("s3://bucket/scores", kind="scores"),
    ):
        assert "output s3://bucket/scores" in _fails_within_the_bound(attempt)


@pytest.mark.slow
def test_a_full_disk_exits_retryable_and_says_so(data: Path, tmp_path: Path) -> None:
    """The first checkpoint's file is written onto /dev/full, which fails every write with
    ENOSPC, as a full disk does."""
    run_dir = tmp_path / "run"
    target = run_dir / "checkpoints" / "step-00000002" / "mp_rank_00_model_states.pt"
    target.parent.mkdir(parents=True)
    target.symlink_to("/dev/full")
    proc = train(data, run_dir, "train.checkpoint_every=2")
    assert proc.returncode == EXIT_RETRYABLE, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "No space left on device" in line, line
    assert "Traceback" not in proc.stderr
    assert committed(run_dir) == []  # nothing half-written was committed
