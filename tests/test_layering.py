"""The library does not depend on the data-preparation package; errors still map to exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_training_imports_no_data_prep_module() -> None:
    code = ("import sys, elcrec_dist.train, elcrec_dist.session, elcrec_dist.errors, elcrec_dist.planted; "
            "elcrec_dist.errors.permanent_error_types(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'data_prep'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_prep_error_is_permanent() -> None:
    from data_prep.writer import PrepError
    from elcrec_dist.errors import EXIT_PERMANENT, exit_code_for

    assert exit_code_for(PrepError("bad column")) == EXIT_PERMANENT
    assert exit_code_for(RuntimeError("bug")) == 1
