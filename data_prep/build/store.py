"""Files of a build on any fsspec filesystem: atomic writes, JSON markers, Arrow IPC, faults.

A stage writes its outputs first and a ``*.done.json`` marker last (``write_json``); a rerun skips
every unit whose marker exists and redoes the others from scratch. On a local disk a file appears
under its name only when complete (written to a temporary name, then renamed); object stores
(``s3://``) publish an object only when its upload completes, which gives the same guarantee.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import signal
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

FAULT_ENV = "ELCREC_PREP_FAULT"  # tests only: "point" or "point:n" kills the process there
_fault_counts: dict[str, int] = {}


def fault(point: str) -> None:
    """Die like a killed process (SIGKILL) at the n-th arrival at ``point``, if the test asks.

    ``ELCREC_PREP_FAULT=map-run:2`` kills the process when a map worker has written its second
    run and before anything records it. Nothing runs after the signal: no cleanup, no finally.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name != point:
        return
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if _fault_counts[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class Store:
    """A folder (local path or URL) and the filesystem that holds it."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") or url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def show(self, *parts: str) -> str:
        """A path for messages: the URL form the user gave."""
        return posixpath.join(self.url, *parts) if parts else self.url

    def sub(self, *parts: str) -> Store:
        prefix, sep, _ = self.url.partition("://")
        if sep:
            return Store(f"{prefix}://{self.path(*parts).lstrip('/')}")
        return Store(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.path(*parts)))

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.path(*parts)))

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to this folder) matching ``pattern``, sorted."""
        found = self.fs.glob(self.path(pattern))
        return sorted(
            posixpath.relpath("/" + p.lstrip("/"), "/" + self.root.lstrip("/")) for p in found
        )

    def rm(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    @contextlib.contextmanager
    def open_write(self, *parts: str) -> Iterator[IO[bytes]]:
        """Write a file that appears under its name only once complete."""
        final = self.path(*parts)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        if not self.local:
            with self.fs.open(final, "wb") as handle:
                yield handle
            return
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as handle:
                yield handle
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def open_read(self, *parts: str) -> IO[bytes]:
        return self.fs.open(self.path(*parts), "rb")

    def write_bytes(self, data: bytes, *parts: str) -> None:
        with self.open_write(*parts) as handle:
            handle.write(data)

    def read_bytes(self, *parts: str) -> bytes:
        with self.open_read(*parts) as handle:
            return handle.read()

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    # --- Arrow IPC (scratch files: uncompressed, random access to record batches) ----------

    def write_ipc(self, batches: list[pa.RecordBatch], schema: pa.Schema, *parts: str) -> None:
        if self.local:  # Arrow's own file: no Python call per buffer
            final = self.path(*parts)
            os.makedirs(posixpath.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                    for batch in batches:
                        writer.write_batch(batch)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        with self.open_write(*parts) as handle, pa.ipc.new_file(handle, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)

    def open_ipc(self, *parts: str) -> pa.ipc.RecordBatchFileReader:
        if self.local:
            return pa.ipc.open_file(pa.memory_map(self.path(*parts)))
        return pa.ipc.open_file(self.open_read(*parts))

    def read_ipc(self, *parts: str) -> pa.Table:
        return self.open_ipc(*parts).read_all()
