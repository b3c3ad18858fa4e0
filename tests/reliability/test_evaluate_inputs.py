"""``launcher/evaluate.py --checkpoint`` with what is not this dataset's model (issue 20, item
8): a random file, a truncated one, a model of another dataset of the same size; each a
one-line error and exit 2, never a traceback."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PreparedSets, write_prepared
from faults import DATA, REPO, TINY

from elcrec_dist.checkpoint import save_model
from elcrec_dist.config import load_config
from elcrec_dist.errors import EXIT_PERMANENT
from elcrec_dist.model import ELCRec
from elcrec_dist.stream import StreamingDataset


def _evaluate(checkpoint: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "launcher/evaluate.py",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(data),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == EXIT_PERMANENT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.slow
def test_evaluate_refuses_what_is_not_this_datasets_model(
    prepared_sets: PreparedSets, tmp_path: Path
) -> None:
    data = prepared_sets(DATA)
    info = StreamingDataset.open(str(data)).info
    config = load_config("configs/demo.yaml", [*TINY, f"data.path={data}"])
    model = ELCRec(config.model, num_items=info.num_items)
    best = tmp_path / "best_model.pt"
    save_model(
        best,
        state=model.state_dict(),
        config=config.to_dict(),
        meta={"epoch": 0, "dataset": info.fingerprint()},
    )

    random = tmp_path / "random.pt"
    random.write_bytes(os.urandom(4096))
    assert "random.pt: not a torch checkpoint file" in _error_line(_evaluate(random, data))

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(best.read_bytes()[:2000])
    assert "truncated.pt: not a checkpoint this project can load" in _error_line(
        _evaluate(truncated, data)
    )

    # another dataset with the same catalogue size: same shapes, other users and item ids
    other = write_prepared(tmp_path / "other", dataclasses.replace(DATA, seed=DATA.seed + 1))
    assert StreamingDataset.open(str(other)).info.num_items == info.num_items
    line = _error_line(_evaluate(best, other))
    assert "was trained on another dataset" in line and "files_sha256" in line

    # and the model on its own dataset evaluates
    assert _evaluate(best, data).returncode == 0
    assert torch.load(best, weights_only=True)["meta"]["dataset"] == info.fingerprint()
