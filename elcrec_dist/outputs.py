"""Output folders of the commands after training (inference, export, intent report): a local
folder or an ``s3://`` URL, files first, ``manifest.json`` last.

A reader trusts a folder only once its manifest exists (it lists every file with its size and
sha256), so a command killed halfway leaves nothing that passes for a result. Before anything is
written, ``OutputFolder.claim`` decides what the folder may be:

- missing or empty: a fresh output;
- holding this command's pending marker (``_PENDING.json``) for the same request: the leftovers
  of a killed attempt, which are overwritten (a retried pod continues);
- holding this command's manifest for the same request: already done, nothing to do;
- anything else (other files, another command's output, the same command with other
  arguments): ``OutputFolderError`` (exit 2) naming what is there, and nothing is written.

Storage goes through ``elcrec_dist.rundir``'s policy, as for run folders and prepared datasets:
endpoint and credentials from the environment, bounded timeouts and ``AWS_MAX_ATTEMPTS``
attempts per request, listings never cached; a store that fails past them is a ``StorageError``
naming the output (retryable, exit 75).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec

from elcrec_dist.errors import PermanentError
from elcrec_dist.rundir import filesystem, storage_errors

MANIFEST = "manifest.json"
PENDING = "_PENDING.json"


class OutputFolderError(PermanentError, ValueError):
    """The output folder holds something this command must not overwrite. Permanent."""


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the output folder
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


class OutputFolder:
    """One command's output folder at ``url``; ``kind`` names the command's format (it is the
    manifest's ``format``), ``request`` what was asked (model, dataset, arguments): a folder
    holding the same kind for another request is refused, never mixed."""

    def __init__(self, url: str, *, kind: str, request: dict[str, Any]) -> None:
        self.url = url
        self.kind = kind
        self.request = json.loads(json.dumps(request, sort_keys=True))  # plain JSON values
        fs, root = filesystem(url)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root
        self.local = url_is_local(fs)

    @contextmanager
    def _storage(self) -> Iterator[None]:
        with storage_errors(f"output {self.url}", remote=not self.local):
            yield

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def _entries(self) -> list[str]:
        with self._storage():
            if not self.fs.exists(self.root):
                return []
            if not self.fs.isdir(self.root):
                raise OutputFolderError(f"{self.url}: exists and is not a folder")
            found = self.fs.find(self.root, withdirs=False)
        return sorted(posixpath.relpath(p, self.root) for p in found)

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            with self._storage(), self.fs.open(self.path(name), "r") as handle:
                value = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def claim(self) -> bool:
        """Check the folder before anything is written; returns True when it already holds this
        request's complete output (nothing to do). Raises ``OutputFolderError`` otherwise."""
        entries = self._entries()
        if not entries:
            return False
        if MANIFEST in entries:
            manifest = self._read_json(MANIFEST) or {}
            if manifest.get("format") == self.kind and manifest.get("request") == self.request:
                return True
            what = (f"a complete {manifest.get('format')!r} output for another request"
                    if manifest.get("format") == self.kind else
                    f"a manifest of format {manifest.get('format')!r}")
            raise OutputFolderError(
                f"{self.url} already holds {what}; remove it or choose another --output"
            )
        if PENDING in entries:
            pending = self._read_json(PENDING) or {}
            if pending.get("format") == self.kind and pending.get("request") == self.request:
                return False  # an unfinished attempt of this very request: continue over it
            raise OutputFolderError(
                f"{self.url} holds an unfinished output of another request "
                f"({pending.get('format')!r}); remove it or choose another --output"
            )
        shown = ", ".join(entries[:5]) + (
            f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        )
        raise OutputFolderError(
            f"{self.url} is not empty ({shown}) and holds no output of this command; "
            f"choose an empty or new folder"
        )

    def begin(self) -> None:
        """Mark the folder as this request's unfinished output (after ``claim``, before the
        first file)."""
        with self._storage():
            self.fs.makedirs(self.root, exist_ok=True)
        self.put_bytes(PENDING, _json_bytes({"format": self.kind, "request": self.request}))

    def put_bytes(self, name: str, data: bytes) -> FileRecord:
        """Write ``data`` to ``name`` whole (local: a temporary file renamed into place; object
        stores: one PUT, which appears whole or not at all)."""
        target = self.path(name)
        parent = posixpath.dirname(target)
        if self.local:
            os.makedirs(parent, exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        else:
            with self._storage():
                self.fs.pipe_file(target, data)
        return FileRecord(name, len(data), hashlib.sha256(data).hexdigest())

    def commit(self, files: list[FileRecord], body: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest last (format, request, ``body``, every file), then drop the
        pending marker and any file of an earlier attempt that this output does not list."""
        manifest = {
            "format": self.kind,
            "request": self.request,
            **body,
            "files": [f.to_dict() for f in sorted(files, key=lambda f: f.path)],
        }
        self.put_bytes(MANIFEST, _json_bytes(manifest))
        listed = {f.path for f in files} | {MANIFEST}
        self.fs.invalidate_cache(self.root)  # an object store's listing may predate the writes
        for name in self._entries():
            if name not in listed:
                with self._storage():
                    self.fs.rm(self.path(name))
        return manifest


def _json_bytes(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def read_manifest(url: str, *, kind: str) -> dict[str, Any]:
    """The manifest of a committed output of ``kind`` at ``url`` (``OutputFolderError`` if the
    folder holds none)."""
    fs, root = filesystem(url)
    path = posixpath.join(root, MANIFEST)
    with storage_errors(f"output {url}", remote=not url_is_local(fs)):
        if not fs.exists(path):
            raise OutputFolderError(f"{url}: no {MANIFEST}; not a complete output")
        with fs.open(path, "r") as handle:
            manifest = json.load(handle)
    if manifest.get("format") != kind:
        raise OutputFolderError(f"{url}: format {manifest.get('format')!r}, expected {kind!r}")
    return dict(manifest)


def url_is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (its errors are the system's own)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
