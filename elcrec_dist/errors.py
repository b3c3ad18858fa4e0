"""Exit codes shared by every entry point, so a scheduler can tell retryable from permanent.

- ``EXIT_OK`` (0): success.
- ``EXIT_PERMANENT`` (2): bad config, bad data, a checkpoint that does not fit or is unsafe, a
  run that diverged, a run folder another trainer holds. Retrying the same job cannot help; a
  Kubernetes ``podFailurePolicy`` fails the job on it.
- ``EXIT_RETRYABLE`` (75, ``EX_TEMPFAIL``): storage trouble (a refused or timed-out connection,
  a full disk), a lost or hung peer, a preemption. Running the job again (resuming) may succeed.

An error class carries its own code (``exit_code``): every error of the project derives from
``PermanentError`` or ``RetryableError`` where it is defined, so this module imports nothing of
the project (nor torch: every entry point would pay for it before its first message). Errors
of other libraries are mapped by family in ``failure_of``, which also gives the one-line
message an entry point prints; anything it does not know is a bug (exit 1, with its traceback).
docs/RELIABILITY.md holds the contract and the fault table.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

EXIT_OK = 0
EXIT_PERMANENT = 2
EXIT_RETRYABLE = 75
EXIT_BUG = 1


class PermanentError(Exception):
    """Retrying cannot fix it (bad config, bad data, a checkpoint that does not fit)."""

    exit_code = EXIT_PERMANENT


class RetryableError(Exception):
    """Running the job again may succeed (storage trouble, a lost peer, a timeout)."""

    exit_code = EXIT_RETRYABLE


@dataclass(frozen=True)
class Failure:
    """What an entry point does about an exception: its exit code and a one-line message."""

    code: int
    message: str


# torch.distributed's failures of a peer or of the rendezvous store, by class name
_DIST_ERRORS = ("DistBackendError", "DistNetworkError", "DistStoreError")
# A collective over gloo (or NCCL) whose peer died, hung past the timeout or never came: torch
# raises a plain RuntimeError carrying the transport's message, so the family is told by it.
_PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out waiting"
    r"|Connection refused|Socket Timeout|collective operation timeout"
    r"|NCCL communicator was aborted"
)
# torch.save to a path writes through its own C++ writer, whose failure names no errno
_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed|file write failed|unexpected pos \d+")
# object-store clients' connection and timeout errors, by class name anywhere in the MRO
# (botocore's ConnectionError family, its timeouts, aiohttp's client errors under s3fs)
_STORAGE_CLASSES = frozenset({
    "botocore.exceptions.ConnectionError", "botocore.exceptions.HTTPClientError",
    "botocore.exceptions.ReadTimeoutError", "botocore.exceptions.ConnectTimeoutError",
    "aiohttp.client_exceptions.ClientError", "urllib3.exceptions.HTTPError",
})
# file-system errors that a retry cannot fix: the same path stays read-only or forbidden
_PERMANENT_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*\.?\s*")  # "[.../pair.cc:553] "


def one_line(text: str) -> str:
    """``text`` as one line: a C++ source prefix dropped, whitespace runs collapsed."""
    return " ".join(_SOURCE_PREFIX.sub("", text.strip()).split())


def _qualified_names(exc: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__name__}" for cls in type(exc).__mro__}


def _own_failure(exc: BaseException) -> Failure | None:
    """The family of ``exc`` itself (not its causes), or None when no family claims it."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return Failure(code, str(exc) or type(exc).__name__)  # the project's own words
    if _qualified_names(exc) & _STORAGE_CLASSES:
        return Failure(EXIT_RETRYABLE, f"storage unreachable: {one_line(str(exc))}")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        if exc.errno in _FULL_ERRNOS:
            return Failure(EXIT_RETRYABLE, f"{where}No space left on device "
                           "(free space or grow the volume, then resume)")
        if exc.errno in _PERMANENT_ERRNOS:
            return Failure(EXIT_PERMANENT, f"{where}{exc.strerror or exc}")
        return Failure(EXIT_RETRYABLE, one_line(str(exc)) or type(exc).__name__)
    if type(exc).__name__ in _DIST_ERRORS:
        return Failure(EXIT_RETRYABLE, f"a collective failed: {one_line(str(exc))}")
    if isinstance(exc, RuntimeError):
        text = str(exc)
        if _PEER_LOST.search(text):
            return Failure(EXIT_RETRYABLE, f"lost a peer (a collective failed): {one_line(text)}")
        if _WRITE_FAILED.search(text):
            return Failure(EXIT_RETRYABLE,
                           f"a file write failed (is the disk full?): {one_line(text)}")
    return None


def failure_of(exc: BaseException) -> Failure:
    """The documented exit code and a one-line message for ``exc``.

    Its own family first (an ``exit_code`` attribute, then the foreign families above); else
    the family of an exception it was raised ``from`` (a library that wraps a refused
    connection); else ``EXIT_BUG`` (1): an unexpected error, whose traceback should be seen.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _own_failure(current)
        if found is not None:
            if current is not exc:  # say what happened at the top, then why
                found = Failure(found.code, f"{one_line(str(exc))}: {found.message}")
            return found
        current = current.__cause__
    return Failure(EXIT_BUG, f"{type(exc).__name__}: {one_line(str(exc))}")


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for ``exc``; 1 for anything unexpected (a bug: let it trace)."""
    return failure_of(exc).code
