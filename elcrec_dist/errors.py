"""Exit codes shared by every entry point, so a scheduler can tell retryable from permanent.

- ``EXIT_OK`` (0): success.
- ``EXIT_PERMANENT`` (2): bad config, bad data, a checkpoint that does not fit. Retrying the
  same job cannot help; a Kubernetes ``podFailurePolicy`` should fail the job on it.
- ``EXIT_RETRYABLE`` (75, ``EX_TEMPFAIL``): storage hiccups, a lost peer, a timeout. Running the
  job again (resuming) may succeed.

An error class carries its own code (``exit_code``): every permanent error of the project
derives from ``PermanentError`` where it is defined, so this module imports nothing of the
project. Errors of other libraries are mapped by family in ``exit_code_for``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PERMANENT = 2
EXIT_RETRYABLE = 75


class PermanentError(Exception):
    """Retrying cannot fix it (bad config, bad data, a checkpoint that does not fit)."""

    exit_code = EXIT_PERMANENT


class RetryableError(Exception):
    """Running the job again may succeed (storage trouble, a lost peer, a timeout)."""

    exit_code = EXIT_RETRYABLE


# torch.distributed's failures of a peer or of the rendezvous store (by name: importing torch
# here would make every entry point pay for it before its first message)
_RETRYABLE_NAMES = ("DistBackendError", "DistNetworkError", "DistStoreError")


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for ``exc``; 1 for anything unexpected (a bug: let it trace)."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return EXIT_RETRYABLE
    if type(exc).__name__ in _RETRYABLE_NAMES:
        return EXIT_RETRYABLE
    return 1
