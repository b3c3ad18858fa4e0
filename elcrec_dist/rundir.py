"""Where a run's files live: a local folder or an object-store URL (``s3://``), one interface.

A ``Folder`` is a location on a filesystem that fsspec opens: a local path (or ``file://``), or
``s3://BUCKET/PREFIX``. A run folder is one; so is each checkpoint folder inside it. The
trainer's files go through it (``RunLogger``: ``metrics.jsonl`` and TensorBoard events;
``Checkpointer``: checkpoints, ``best_model.pt``; ``trainer.run``: ``config.yaml``,
``results.json``), and datasets are opened through ``filesystem`` for the same storage policy.

Locations
    Text that looks like a URL (``scheme:/...``) is never taken for a local path: a scheme this
    module does not know (``SCHEMES``), or a URL without ``//``, is ``LocationError`` (exit 2).
    ``check_location`` is the preflight an entry point runs before any work: the scheme, the
    credentials (for ``s3``: anything botocore's credential chain finds: environment, shared
    files, a pod's web identity, instance metadata) and that the bucket exists; a missing
    credential or bucket is permanent (exit 2), an unreachable endpoint retryable (exit 75).

Writes
    A file appears under its name only once complete: on a local disk it is written to a
    temporary name and renamed; an object store publishes an object only when its upload
    completes. Every object-store write is verified: the size and sha256 of what landed are
    read back and compared with what was sent (``upload`` returns them for a commit record).

Storage faults
    Transient faults are retried by the storage library's own configuration, set here
    explicitly (``s3_storage_options``) for every read and write of data, checkpoints and logs:
    botocore's ``standard`` retry mode, at most ``AWS_MAX_ATTEMPTS`` attempts per request
    (default ``DEFAULT_ATTEMPTS``), on throttling (503 SlowDown), 5xx answers and broken or
    refused connections, waiting a random 0..2^(n-1) s before retry n (at most 20 s; botocore's
    backoff, not configurable; its retry quota may stop retrying sooner in a long outage);
    connect timeout ``CONNECT_TIMEOUT_S``, read timeout ``READ_TIMEOUT_S``. s3fs's own retry
    loop around a call is set to one pass, so the budget is exactly that many attempts, not a
    product of two loops (a response body that breaks off mid-read is therefore not re-read: it
    fails the call). Past the budget a storage call raises ``StorageError`` (exit 75: rerunning
    the job may succeed), and nothing is committed.

Endpoint and credentials come only from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...; on Kubernetes from a Secret), never from a config file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from elcrec_dist.errors import PermanentError, RetryableError

DEFAULT_ATTEMPTS = 6  # waits before giving up: at most 1 + 2 + 4 + 8 + 16 = 31 s
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"  # botocore's own name for the total number of attempts
_CHUNK = 1 << 20
# ``scheme:/`` at the start: a URL, or a URL whose ``//`` was lost (``pathlib`` makes
# ``s3:/b/x`` of ``s3://b/x``). One-letter schemes would be Windows drives; none are supported.
_URL_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


class LocationError(PermanentError, ValueError):
    """A location cannot be used: unknown scheme, malformed URL, no credentials, no bucket."""


class StorageError(RetryableError, OSError):
    """A storage operation failed after the library's retries, or wrote what it did not send.
    Retryable: the job can be run again (and resumes from its last committed checkpoint)."""


class PeerError(Exception):
    """Another rank's storage (or checkpoint) work failed: this rank stops too, with that
    failure's exit code and message, rather than wait for it in a collective."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def attempts() -> int:
    """Attempts per storage request: ``AWS_MAX_ATTEMPTS`` if set, else ``DEFAULT_ATTEMPTS``."""
    text = os.environ.get(ATTEMPTS_ENV)
    if text is None:
        return DEFAULT_ATTEMPTS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise LocationError(f"{ATTEMPTS_ENV}={text!r}: the number of storage attempts must be an "
                            "integer >= 1")
    return value


def s3_storage_options() -> dict[str, Any]:
    """The s3fs options of every S3 filesystem this project opens (see the module docstring)."""
    return {
        "config_kwargs": {
            "retries": {"mode": "standard", "total_max_attempts": attempts()},
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
        },
        # list the store on every call: other ranks and pods write into the same prefixes
        "use_listings_cache": False,
    }


@dataclass(frozen=True)
class Scheme:
    """A supported kind of location: its storage options and whether credentials are checked."""

    options: Callable[[], dict[str, Any]]  # fsspec storage options
    s3: bool = False


SCHEMES: dict[str, Scheme] = {
    "file": Scheme(options=dict),
    "s3": Scheme(options=s3_storage_options, s3=True),
}


def scheme_of(location: str | Path) -> str:
    """``"file"`` for a local path (or ``file://``), else the URL's scheme, checked: text that
    looks like a URL is never a local path."""
    text = str(location)
    match = _URL_LIKE.match(text)
    if match is None:
        return "file"
    scheme = match.group(1).lower()
    if not text[match.end() :].startswith("/"):
        raise LocationError(f"{text!r} looks like a URL but is not one (expected {scheme}://...)")
    if scheme not in SCHEMES:
        raise LocationError(f"{text!r}: unsupported scheme {scheme}:// (supported: a local path, "
                            f"{', '.join(s + '://' for s in SCHEMES)})")
    return scheme


def filesystem(location: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``location`` and the path in it, with the project's storage
    options (retries, timeouts) for its scheme. Raises ``LocationError`` for an unknown one."""
    scheme = scheme_of(location)
    text = str(location)
    if scheme == "file" and "://" not in text:
        text = os.path.abspath(text)
    fs, path = fsspec.core.url_to_fs(text, **SCHEMES[scheme].options())
    if SCHEMES[scheme].s3:
        fs.retries = 1  # s3fs's own loop: one pass; botocore's retries are the budget
    return fs, path.rstrip("/") or path


def check_location(location: str | Path, *, what: str) -> None:
    """Preflight for ``location`` (``what`` names it in messages, e.g. ``--run-dir``): a
    supported scheme, credentials, and an existing bucket. Reads nothing else."""
    scheme = scheme_of(location)
    if not SCHEMES[scheme].s3:
        return
    import botocore.session

    if botocore.session.Session().get_credentials() is None:
        raise LocationError(
            f"{what} {location}: no storage credentials found. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY in the environment (on Kubernetes from a Secret), or give the "
            "pod a cloud identity; never in the config file"
        )
    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    with storage_errors(f"{what} {location}"):
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise LocationError(f"{what} {location}: bucket {bucket!r} does not exist") from None
        except PermissionError as exc:
            raise LocationError(f"{what} {location}: access to bucket {bucket!r} denied "
                                f"({exc}); check the credentials") from None


@contextlib.contextmanager
def storage_errors(where: str, *, remote: bool = True) -> Iterator[None]:
    """For an object store (``remote``): turn what the storage library raises once its retries
    are spent (``OSError``, botocore's and aiohttp's errors) into ``StorageError`` naming
    ``where`` and the attempts made, and a refused access into ``LocationError`` (permanent).
    Missing files stay ``FileNotFoundError`` (the caller decides what absence means), local
    errors stay as the system raised them (``errors`` maps a full disk, a read-only one)."""
    try:
        yield
    except (FileNotFoundError, PermanentError, RetryableError):
        raise
    except PermissionError as exc:
        if not remote:
            raise
        raise LocationError(f"{where}: access denied ({exc}); check the credentials and what "
                            "they may read and write") from exc
    except Exception as exc:
        library = type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp")
        if remote and (isinstance(exc, OSError) or library):
            raise StorageError(f"{where}: storage failed after {attempts()} attempt(s): "
                               f"{type(exc).__name__}: {exc}") from exc
        raise


@dataclass(frozen=True)
class FileRecord:
    """One file of a commit record: its path relative to the folder, size and sha256."""

    path: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A private local folder (under ``TMPDIR``; on Kubernetes the pod's ``/tmp`` volume),
    removed afterwards: where the engine writes or reads files that live in an object store."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Folder:
    """A folder at a local path or URL. Paths below it are given as parts (``"checkpoints",
    "step-00000010"``) or as ``/``-separated relative paths."""

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.scheme = scheme_of(text)
        self.fs, self.root = filesystem(text)
        self.local = self.scheme == "file"
        self.url = text.rstrip("/") or text  # as given: messages show what the user wrote

    @classmethod
    def of(cls, location: str | Path | Folder) -> Folder:
        return location if isinstance(location, Folder) else cls(location)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Folder({self.url!r})"

    def __reduce__(self) -> tuple[type[Folder], tuple[str]]:
        # sent between ranks as its location: the receiver opens the filesystem with the
        # project's storage options (an unpickled s3fs instance would lose ``retries``)
        return Folder, (self.url,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Folder) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def _errors(self, *parts: str) -> contextlib.AbstractContextManager[None]:
        return storage_errors(self.show(*parts), remote=not self.local)

    @property
    def name(self) -> str:
        return posixpath.basename(self.root)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` below this folder."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def show(self, *parts: str) -> str:
        """``parts`` as the user's kind of location, for messages."""
        return posixpath.join(self.url, *parts) if parts else self.url

    def child(self, *parts: str) -> Folder:
        return Folder(self.show(*parts))

    def local_path(self, *parts: str) -> Path:
        """The local path of ``parts`` (local folders only)."""
        if not self.local:
            raise ValueError(f"{self.url} is not a local folder")
        return Path(self.path(*parts))

    # --- reading ------------------------------------------------------------------------------

    def exists(self, *parts: str) -> bool:
        with self._errors(*parts):
            return bool(self.fs.exists(self.path(*parts)))

    def is_file(self, *parts: str) -> bool:
        with self._errors(*parts):
            return bool(self.fs.isfile(self.path(*parts)))

    def is_dir(self, *parts: str) -> bool:
        with self._errors(*parts):
            return bool(self.fs.isdir(self.path(*parts)))

    def folders(self) -> list[Folder]:
        """The folders directly inside this one, sorted by name; none if it does not exist."""
        with self._errors():
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return []
        names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                       if e["type"] == "directory")
        return [self.child(name) for name in names]

    def files(self) -> dict[str, int]:
        """Every file below this folder (recursively): relative path -> size in bytes."""
        with self._errors():
            try:
                found = self.fs.find(self.root, detail=True)
            except FileNotFoundError:
                return {}
        prefix = self.root.rstrip("/") + "/"
        return {name[len(prefix):]: int(entry["size"]) for name, entry in sorted(found.items())
                if name.startswith(prefix) and entry["type"] == "file"}

    def size(self, *parts: str) -> int:
        with self._errors(*parts):
            return int(self.fs.size(self.path(*parts)))

    def sha256(self, *parts: str) -> str:
        digest = hashlib.sha256()
        with self._errors(*parts), self.fs.open(self.path(*parts), "rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(block)
        return digest.hexdigest()

    def read_bytes(self, *parts: str) -> bytes:
        """The file's bytes; ``FileNotFoundError`` if it is absent."""
        with self._errors(*parts):
            return bytes(self.fs.cat_file(self.path(*parts)))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def download(self, relative: str, dest: Path, *, expect: FileRecord | None = None) -> None:
        """Copy the file at ``relative`` to the local ``dest``; with ``expect``, check that its
        size and sha256 are the recorded ones (``StorageError`` if not: it changed or broke)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(relative):
            if self.local:
                shutil.copyfile(self.path(relative), dest)
            else:
                self.fs.get_file(self.path(relative), str(dest))
        if expect is not None:
            size, digest = dest.stat().st_size, sha256_file(dest)
            if (size, digest) != (expect.bytes, expect.sha256):
                raise StorageError(f"{self.show(relative)}: read {size} bytes, sha256 {digest}; "
                                   f"the record says {expect.bytes} bytes, {expect.sha256}")

    # --- writing ------------------------------------------------------------------------------

    def makedirs(self) -> None:
        if self.local:
            os.makedirs(self.root, exist_ok=True)  # object stores have no folders to make

    def write_bytes(self, data: bytes, *parts: str) -> FileRecord:
        """Write the file at ``parts`` whole: it appears under its name only once complete.
        Returns its record (an object-store write is read back and checked first)."""
        final = self.path(*parts)
        record = FileRecord("/".join(parts), len(data), hashlib.sha256(data).hexdigest())
        if self.local:
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with self._errors(*parts):
                    os.makedirs(posixpath.dirname(final), exist_ok=True)
                    with open(tmp, "wb") as handle:
                        handle.write(data)
                    os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return record
        with self._errors(*parts):
            self.fs.pipe_file(final, data)
        self._check_landed(record)
        return record

    def write_text(self, text: str, *parts: str) -> FileRecord:
        return self.write_bytes(text.encode("utf-8"), *parts)

    def upload(self, source: Path, relative: str) -> FileRecord:
        """Copy the local file ``source`` to ``relative`` below this folder and return its
        record, after checking that what landed has the size and sha256 of what was sent."""
        record = FileRecord(relative, source.stat().st_size, sha256_file(source))
        if self.local:
            final = self.local_path(relative)
            tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:12]}")
            with self._errors(relative):
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp)
                os.replace(tmp, final)
        else:
            with self._errors(relative):
                self.fs.put_file(str(source), self.path(relative))
        self._check_landed(record)
        return record

    def _check_landed(self, record: FileRecord) -> None:
        size, digest = self.size(record.path), self.sha256(record.path)
        if (size, digest) != (record.bytes, record.sha256):
            raise StorageError(f"{self.show(record.path)}: wrote {record.bytes} bytes, sha256 "
                               f"{record.sha256}; the store holds {size} bytes, sha256 {digest}")

    def remove(self, *parts: str) -> None:
        """Remove the file or folder at ``parts`` (this folder if none), if it exists."""
        path = self.path(*parts)
        with self._errors(*parts):
            if self.local:
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.exists(path):
                    os.remove(path)
                return
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)


# --- storage work of several ranks -----------------------------------------------------------

T = TypeVar("T")


def agree(work: Callable[[], T]) -> T:
    """Run ``work`` on every rank (it may do nothing on some) and return this rank's value. If
    it raises one of the project's errors (a ``StorageError`` past the retries, a refused
    checkpoint, ...) on any rank, every rank raises: that rank its own error, the others a
    ``PeerError`` with its exit code and message. So a failed upload, commit or download on one
    rank stops every rank at once, none waits for it in a later collective, and every pod of a
    job exits with the same code. Collective."""
    from elcrec_dist import distributed as dist_utils

    error: PermanentError | RetryableError | None = None
    value: Any = None
    try:
        value = work()
    except (PermanentError, RetryableError) as exc:
        error = exc
    mine = None if error is None else (int(error.exit_code), f"rank {dist_utils.rank()}: {error}")
    problems = [p for p in gather(mine) if p is not None]
    if error is not None:
        raise error
    if problems:
        raise PeerError("; ".join(message for _, message in problems), problems[0][0])
    return value


def gather(value: T) -> list[T]:
    """Every rank's (picklable) ``value``, in rank order, on every rank. Collective."""
    import torch.distributed as dist

    from elcrec_dist import distributed as dist_utils

    if not dist.is_initialized() or dist_utils.world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist_utils.world_size()
    dist.all_gather_object(out, value)
    return out
