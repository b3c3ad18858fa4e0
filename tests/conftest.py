"""Shared fixtures: the ../shared folder beside the repository, a prepared Beauty dataset and a
small synthetic one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# The repository sits next to ``shared/`` (here /work/main beside /work/shared; CI clones the
# repo elsewhere with ../shared beside it).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ``../shared`` folder; tests that need it are skipped where it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent (benchmark files and reference checkpoint live there)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def beauty_prepared(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Beauty.txt imported once per session through the real entry point."""
    from data_prep.benchmark import main

    source = shared_dir / "data" / "Beauty.txt"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    out = tmp_path_factory.mktemp("prepared") / "beauty"
    assert main(["--input", str(source), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def beauty_sequences(beauty_prepared: Path):
    """(info, user ids, sequences) of the prepared Beauty dataset."""
    from elcrec_dist.prepared import load_sequences

    return load_sequences(str(beauty_prepared))


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic dataset of 60 users and 40 items (read-only; shared by the session)."""
    out = tmp_path_factory.mktemp("small_synthetic") / "data"
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--output", str(out), "--users", "60", "--items", "40"],
                   check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True)
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-protocol server (moto) on loopback for the session; yields its endpoint URL.

    Tests reach it through the ``s3_env`` fixture, which points the environment at it.
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """Environment pointing s3fs at ``s3_server``, and a fresh bucket; yields the bucket name.

    Endpoint and credentials come from the environment only (as in production). fsspec caches
    filesystem instances, and an instance keeps the endpoint it was built with, so the cache is
    cleared before and after: no configuration leaks into or out of the test.
    """
    import uuid

    import fsspec
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    try:
        yield bucket
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
