"""Shared fixtures: the ../shared folder beside the repository, the prepared Beauty dataset, a
local S3 server, and the test-data factory: ``write_prepared`` writes a prepared dataset of any
size through the project's own writer, ``prepared_sets`` caches synthetic ones for the session.

Test modules import the factory and its types as ``from conftest import ...`` (pytest puts
``tests/`` on ``sys.path``, as it does for ``launch``), and use the fixtures by name. That is why
this is the only ``conftest.py``: pytest drops ``sys.modules["conftest"]`` before importing
another one, so a ``conftest.py`` in a subfolder (e.g. ``tests/reliability/``) would take the
name and those imports would fail; put a subfolder's fixtures here or in a helper module."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_prep.synthetic import SyntheticSpec, write_synthetic
from data_prep.writer import write_prepared_dataset
from elcrec_dist import prepared
from elcrec_dist.prepared import ARROW_SCHEMA, DatasetInfo

# The repository sits next to ``shared/`` (here /work/main beside /work/shared; CI clones the
# repo elsewhere with ../shared beside it).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"

# A user's item sequence as the tests hold it: a list of ids or an int array.
Items = Sequence[int] | np.ndarray

# What a scheduler or launcher sets that would make a child process think it is a rank of a job.
_SCHEDULER_VARS = (
    "JOB_COMPLETION_INDEX", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
    "LOCAL_SIZE",
)
_SCHEDULER_PREFIXES = ("PET_", "VK_", "VC_", "ELCREC_")


def env_without_scheduler() -> dict[str, str]:
    """This process's environment less anything a job scheduler or launcher would have set (the
    ranks' variables, PyTorchJob's PET_*, Volcano's VK_*/VC_*, ours ELCREC_*): what a child that
    plays a pod starts from, whatever the test runner's own environment holds."""
    return {k: v for k, v in os.environ.items()
            if k not in _SCHEDULER_VARS and not k.startswith(_SCHEDULER_PREFIXES)}


# --- the test-data factory ----------------------------------------------------------------------


def write_prepared(
    out: Path,
    data: SyntheticSpec | Sequence[Items],
    *,
    num_items: int | None = None,
    user_ids: Sequence[int] | np.ndarray | None = None,
    shards: int = 2,
    rows_per_group: int | None = None,
) -> Path:
    """Write a prepared dataset to ``out`` through the project's writer; returns ``out``.

    ``data`` is either
    - a ``SyntheticSpec``: planted-intent users, byte for byte what
      ``python -m data_prep.synthetic --output OUT --shards SHARDS`` writes with the same
      arguments (``planted_intents.parquet`` included); ``num_items`` is the spec's ``items``;
    - or the users' item sequences [U] of ids in 1..num_items, written as given, with user ids
      ``user_ids`` [U] (default 1..U) and ``num_items`` required.

    ``shards`` is the number of Parquet files (2, the command line's default); ``rows_per_group``
    (default ``prepared.ROW_GROUP_SIZE``, 4096) is set small to get many row groups, the streaming
    reader's work units, from a few users.
    """
    with pytest.MonkeyPatch.context() as mp:
        if rows_per_group is not None:
            mp.setattr(prepared, "ROW_GROUP_SIZE", rows_per_group)
        if isinstance(data, SyntheticSpec):
            if num_items is not None or user_ids is not None:
                raise TypeError("a SyntheticSpec fixes the items and user ids: give neither")
            write_synthetic(str(out), data, shards=shards)
        else:
            if num_items is None:
                raise TypeError("explicit sequences need num_items (the catalogue size)")
            table = _user_table(data, user_ids)
            write_prepared_dataset(str(out), table, num_items=num_items, shards=shards)
    return out


def _user_table(
    sequences: Sequence[Items], user_ids: Sequence[int] | np.ndarray | None
) -> pa.Table:
    """The writer's input table: user ids [U] (default 1..U) and their item lists, int32."""
    ids = np.arange(1, len(sequences) + 1) if user_ids is None else np.asarray(user_ids)
    items = [np.asarray(s, np.int32) for s in sequences]
    return pa.table(
        {"user_id": pa.array(ids, pa.int64()), "items": pa.array(items, pa.list_(pa.int32()))},
        schema=ARROW_SCHEMA,
    )


class PreparedSets:
    """Synthetic prepared sets written once per session and shared: read them, never change them.

    ``prepared_sets(SyntheticSpec(users=400, items=100, intents=4, seed=4))`` returns the folder
    of that set, writing it on the first call.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._written: dict[tuple[SyntheticSpec, int], Path] = {}

    def __call__(self, spec: SyntheticSpec, *, shards: int = 2) -> Path:
        key = (spec, shards)
        if key not in self._written:
            out = self._root / f"set-{len(self._written)}"
            self._written[key] = write_prepared(out, spec, shards=shards)
        return self._written[key]


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
def beauty_sequences(beauty_prepared: Path) -> tuple[DatasetInfo, np.ndarray, list[np.ndarray]]:
    """(info, user ids [U], sequences) of the prepared Beauty dataset."""
    return prepared.load_sequences(str(beauty_prepared))


@pytest.fixture(scope="session")
def prepared_sets(tmp_path_factory: pytest.TempPathFactory) -> PreparedSets:
    """The session's cache of synthetic prepared sets (``PreparedSets``)."""
    return PreparedSets(tmp_path_factory.mktemp("prepared_sets"))


@pytest.fixture(scope="session")
def small_synthetic(prepared_sets: PreparedSets) -> Path:
    """A prepared synthetic dataset of 60 users and 40 items (8 planted intents, seed 0; read-only;
    shared by the session)."""
    return prepared_sets(SyntheticSpec(users=60, items=40))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
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
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
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
