"""Shared fixtures: the ../shared folder beside the repository and a prepared Beauty dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

# The repository sits next to ``shared/`` (here /work/main beside /work/shared; CI clones the
# repo elsewhere with ../shared beside it).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


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
def beauty_sequences(beauty_prepared: Path):
    """(info, user ids, sequences) of the prepared Beauty dataset."""
    from elcrec_dist.prepared import load_sequences

    return load_sequences(str(beauty_prepared))
