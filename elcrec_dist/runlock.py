"""One trainer per run folder: a lock that rank 0 takes before anything is written there.

Two trainers on one run folder would interleave their logs, overwrite each other's model and
results, and prune each other's checkpoints. The second one to start exits 2 (``RunFolderBusy``)
having written nothing; the lock is released when its holder ends.

Local (or mounted) folder: ``RUN/.lock``, held with ``flock`` on an open descriptor for the
whole run. The kernel releases it when the process ends, however it ends (SIGKILL, OOM), so a
killed run leaves no stale lock. Over NFS, Linux clients map ``flock`` to NFS byte-range locks:
the server frees a dead client's lock when its lease (typically 90 s) runs out. A file system
without locks makes ``flock`` fail: that is an error (exit 2), never an unlocked run.

Object store (``s3://``): ``RUN/.lock`` is a lease object. It is created only if absent (a
conditional write, ``If-None-Match: *``: AWS S3, MinIO and moto honour it), and its holder
rewrites it every ``LEASE_RENEW_S`` seconds. A trainer that finds the object watches it for up
to ``LEASE_EXPIRY_S`` seconds: if it is rewritten meanwhile, another trainer is alive and this
one exits 2; if not, the holder is gone (killed without releasing it) and the lease is taken
over with a conditional overwrite (``If-Match`` on the stale version), which only one of
several waiting trainers can win. A trainer restarted after a hard kill therefore waits up to
``LEASE_EXPIRY_S`` before it starts. Limits: a holder stalled for longer than that (a stopped
process) loses its lease without knowing it; a store that ignores conditional writes gives no
mutual exclusion (the lock is then only a record of who runs).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from elcrec_dist import distributed as dist_utils
from elcrec_dist.errors import PermanentError
from elcrec_dist.rundir import Folder, storage_errors
from elcrec_dist.runlog import logger

LOCK_NAME = ".lock"
LEASE_RENEW_S = 15.0
LEASE_EXPIRY_S = 60.0


class RunFolderBusy(PermanentError, RuntimeError):
    """Another trainer holds the run folder. Permanent: this job must not write there."""


def _holder_text(token: str) -> bytes:
    return (
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "id": token,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ).encode()
        + b"\n"
    )


def _token_of(text: bytes) -> str | None:
    try:
        token = json.loads(text).get("id")
    except (ValueError, AttributeError):
        return None
    return token if isinstance(token, str) else None


def _describe(text: bytes) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown holder"


class LocalLock:
    """``flock`` on ``RUN/.lock`` (see the module docstring)."""

    def __init__(self, folder: Folder) -> None:
        self.path = folder.local_path(LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # creates, never truncates
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            held = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            holder = os.pread(fd, 4096, 0)
            os.close(fd)
            if held:
                raise RunFolderBusy(
                    f"{self.path.parent}: another trainer is using this run folder "
                    f"({_describe(holder)}); wait for it to end or pass another --run-dir"
                ) from None
            raise RunFolderBusy(
                f"{self.path}: cannot lock the run folder ({exc}); a file system "
                "without locks cannot keep two trainers apart"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text(uuid.uuid4().hex), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock; the file stays, unlocked
            self.fd = None


class LeaseLock:
    """A lease object in an object store (see the module docstring)."""

    def __init__(
        self, folder: Folder, *, renew_s: float = LEASE_RENEW_S, expiry_s: float = LEASE_EXPIRY_S
    ) -> None:
        self.folder, self.renew_s, self.expiry_s = folder, renew_s, expiry_s
        self.path = folder.path(LOCK_NAME)
        self.etag: str | None = None
        self.token = uuid.uuid4().hex  # names this holder inside the lease object
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, **condition: str) -> str | None:
        """Write the lease under ``condition``; its new ETag, or None if the condition failed.
        A write retried after its answer was lost fails its own condition: the object then
        names this holder, and counts as written."""
        try:
            with storage_errors(self.folder.show(LOCK_NAME)):
                self.folder.fs.pipe_file(self.path, _holder_text(self.token), **condition)
                return str(self.folder.fs.info(self.path)["ETag"])
        except Exception as exc:  # the store answers a failed condition with 412
            if not _precondition_failed(exc):
                raise
        current = self._current()
        return current[0] if current is not None and _token_of(current[1]) == self.token else None

    def _current(self) -> tuple[str, bytes] | None:
        with storage_errors(self.folder.show(LOCK_NAME)):
            try:
                etag = str(self.folder.fs.info(self.path)["ETag"])
                return etag, bytes(self.folder.fs.cat_file(self.path))
            except FileNotFoundError:
                return None

    def acquire(self) -> None:
        self.etag = self._put(mode="create")
        if self.etag is None:
            self.etag = self._take_over_stale()
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()

    def _take_over_stale(self) -> str:
        seen = self._current()
        deadline = time.monotonic() + self.expiry_s
        while seen is not None and time.monotonic() < deadline:
            time.sleep(min(1.0, self.renew_s / 4))
            now = self._current()
            if now is None:  # released meanwhile: take it as if it had been free
                seen = None
                break
            if now[0] != seen[0]:  # rewritten: its holder renews it, it is alive
                raise RunFolderBusy(
                    f"{self.folder}: another trainer is using this run folder ({_describe(now[1])})"
                ) from None
        if seen is None:  # released while we looked: create it as usual
            etag = self._put(mode="create")
        else:
            logger.warning(
                "%s: the lease of %s was not renewed for %.0f s; taking it over",
                self.folder,
                _describe(seen[1]),
                self.expiry_s,
            )
            etag = self._put(IfMatch=seen[0])
        if etag is None:
            raise RunFolderBusy(f"{self.folder}: another trainer took this run folder first")
        return etag

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                etag = self._put(IfMatch=self.etag or "")
            except Exception as exc:  # a storage hiccup: the lease lasts; try again next time
                logger.warning("%s: could not renew the run folder's lease (%s)", self.folder, exc)
                continue
            if etag is None:
                logger.error(
                    "%s: the run folder's lease was taken over by another trainer", self.folder
                )
                self.lost.set()
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._current() if not self.lost.is_set() else None
        if current is not None and current[0] == self.etag:
            with (
                storage_errors(self.folder.show(LOCK_NAME)),
                contextlib.suppress(FileNotFoundError),
            ):
                self.folder.fs.rm_file(self.path)


def _precondition_failed(exc: BaseException) -> bool:
    current: BaseException | None = exc
    while current is not None:
        text = f"{type(current).__name__} {current}"
        if "PreconditionFailed" in text or "412" in text or isinstance(current, FileExistsError):
            return True
        current = current.__cause__ or current.__context__
    return False


def _lock_for(folder: Folder) -> LocalLock | LeaseLock:
    return LocalLock(folder) if folder.local else LeaseLock(folder)


@contextlib.contextmanager
def hold_run_folder(location: str | Any) -> Iterator[None]:
    """Hold the lock of the run folder at ``location`` for the duration (rank 0 takes it; every
    rank raises ``RunFolderBusy`` if it is held elsewhere). Collective. Run it before anything
    is written into the folder."""
    folder = Folder.of(location)
    lock = _lock_for(folder) if dist_utils.is_main() else None
    problem = None
    if lock is not None:
        try:
            lock.acquire()
        except RunFolderBusy as exc:
            problem = str(exc)
    problem = dist_utils.broadcast_object(problem)
    if problem is not None:
        raise RunFolderBusy(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
