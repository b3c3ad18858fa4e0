"""The library does not depend on the data-preparation package; errors still map to exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_training_imports_no_data_prep_module() -> None:
    code = ("import sys, elcrec_dist.trainer, elcrec_dist.errors, elcrec_dist.planted; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'data_prep'))")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_prep_error_is_permanent() -> None:
    from data_prep.writer import PrepError
    from elcrec_dist.errors import EXIT_PERMANENT, exit_code_for

    assert exit_code_for(PrepError("bad column")) == EXIT_PERMANENT
    assert exit_code_for(RuntimeError("bug")) == 1


def test_every_library_error_carries_its_exit_code() -> None:
    """errors.py imports nothing of the project: each error class carries its code."""
    from elcrec_dist.checkpoint import CheckpointError
    from elcrec_dist.config import ConfigError
    from elcrec_dist.errors import EXIT_PERMANENT, EXIT_RETRYABLE, RetryableError, exit_code_for
    from elcrec_dist.prepared import DatasetError
    from elcrec_dist.reference import ReferenceError

    for error in (ConfigError, DatasetError, ReferenceError, CheckpointError):
        assert exit_code_for(error("bad")) == EXIT_PERMANENT, error
        assert issubclass(error, ValueError)  # callers that catch ValueError keep working
    assert exit_code_for(RetryableError("later")) == EXIT_RETRYABLE
    assert exit_code_for(ConnectionResetError("peer")) == EXIT_RETRYABLE
    code = ("import sys, elcrec_dist.errors; "
            "print(sorted(m for m in sys.modules if m.startswith('elcrec_dist')))")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "['elcrec_dist', 'elcrec_dist.errors']"
