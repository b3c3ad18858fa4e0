"""Exit codes shared by every entry point, so a scheduler can tell retryable from permanent.

- ``EXIT_OK`` (0): success.
- ``EXIT_PERMANENT`` (2): bad config, bad data, a checkpoint that does not fit. Retrying the
  same job cannot help; a Kubernetes ``podFailurePolicy`` should fail the job on it.
- ``EXIT_RETRYABLE`` (75, ``EX_TEMPFAIL``): storage hiccups, a lost peer, a timeout. Running the
  job again (resuming) may succeed.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PERMANENT = 2
EXIT_RETRYABLE = 75


class PermanentError(Exception):
    """Base for errors of other packages (e.g. ``data_prep.writer.PrepError``) that retrying
    cannot fix; the library's own permanent errors are listed in ``permanent_error_types``."""


def permanent_error_types() -> tuple[type[BaseException], ...]:
    from elcrec_dist.checkpoint import CheckpointError
    from elcrec_dist.config import ConfigError
    from elcrec_dist.prepared import DatasetError
    from elcrec_dist.reference import ReferenceError

    return (PermanentError, ConfigError, DatasetError, ReferenceError, CheckpointError)


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, permanent_error_types()):
        return EXIT_PERMANENT
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return EXIT_RETRYABLE
    if type(exc).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return EXIT_RETRYABLE
    return 1
