"""``bench/checkpoint_sweep.py``: every complete checkpoint evaluated, the summary by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import checkpoint_sweep as sweep
from elcrec_dist import checkpoint as ckpt
from elcrec_dist.config import load_config
from elcrec_dist.evaluation import evaluate
from elcrec_dist.model import ELCRec

REPO = Path(__file__).resolve().parents[1]


def test_summary_by_hand() -> None:
    valid = [{"NDCG@20": 0.10}, {"NDCG@20": 0.30}, {"NDCG@20": 0.20}, {"NDCG@20": 0.30}]
    test = [
        {"NDCG@20": 1.0, "HR@5": 4.0},
        {"NDCG@20": 3.0, "HR@5": 2.0},
        {"NDCG@20": 2.0, "HR@5": 2.0},
        {"NDCG@20": 5.0, "HR@5": 0.0},
    ]
    out = sweep.sweep_summary(valid, test, select="NDCG@20")
    ndcg = out["NDCG@20"]
    assert ndcg["test_mean"] == pytest.approx(2.75)
    assert ndcg["test_sd"] == pytest.approx(
        np.sqrt(((1 - 2.75) ** 2 + (3 - 2.75) ** 2 + (2 - 2.75) ** 2 + (5 - 2.75) ** 2) / 3)
    )
    assert (ndcg["test_min"], ndcg["test_max"]) == (1.0, 5.0)
    assert ndcg["test_at_valid_best"] == 3.0  # the first of the two equal valid bests
    assert out["HR@5"]["test_at_valid_best"] == 2.0
    # changes of valid (+0.2, -0.1, +0.1) against changes of test (+2, -1, +3)
    dv, dt = np.array([0.2, -0.1, 0.1]), np.array([2.0, -1.0, 3.0])
    expected = ((dv - dv.mean()) * (dt - dt.mean())).sum() / np.sqrt(
        ((dv - dv.mean()) ** 2).sum() * ((dt - dt.mean()) ** 2).sum()
    )
    assert ndcg["change_correlation"] == pytest.approx(expected)


def _commit(run: Path, model: ELCRec, *, epoch: int, step_in_epoch: int, global_step: int) -> Path:
    folder = run / ckpt.CHECKPOINTS / ckpt.tag_of(global_step)
    folder.mkdir(parents=True)
    torch.save(
        {"module": {"model." + k: v for k, v in model.state_dict().items()}},
        folder / ckpt.MODEL_STATES,
    )
    ckpt.commit(
        folder,
        state=ckpt.TrainState(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step),
        config={},
    )
    return folder


def test_every_complete_checkpoint_is_evaluated_and_incomplete_ones_skipped(
    tmp_path: Path, small_synthetic: Path
) -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    from elcrec_dist.prepared import load_sequences

    info, _, sequences = load_sequences(str(small_synthetic))
    run = tmp_path / "run"
    models = []
    for seed, (epoch, within, step) in zip((1, 2), [(3, 0, 30), (3, 4, 34)], strict=True):
        torch.manual_seed(seed)
        models.append(ELCRec(config.model, num_items=info.num_items).eval())
        _commit(run, models[-1], epoch=epoch, step_in_epoch=within, global_step=step)
    broken = run / ckpt.CHECKPOINTS / ckpt.tag_of(40)  # written but never committed
    broken.mkdir()
    torch.save({"module": {}}, broken / ckpt.MODEL_STATES)
    assert [(f.name, e, s) for f, e, s in sweep.complete_checkpoints(run)] == [
        ("step-00000030", 2, 30),  # end of epoch 2: the cursor already points at epoch 3
        ("step-00000034", 3, 34),  # mid-epoch 3
    ]
    out = subprocess.run(
        [sys.executable, "-m", "bench.checkpoint_sweep", "--config", "configs/demo.yaml",
         "--data", str(small_synthetic), "--run", str(run)],
        check=True, cwd=REPO, capture_output=True, text=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert [row["step"] for row in report["checkpoints"]] == [30, 34]
    for row, model in zip(report["checkpoints"], models, strict=True):
        for split in ("valid", "test"):
            expected = evaluate(model, list(sequences), split=split, ks=config.eval.ks)
            assert row[split] == pytest.approx(expected, abs=1e-12)


def test_a_run_without_checkpoints_is_refused(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.checkpoint_sweep", "--config", "configs/demo.yaml",
         "--data", str(tmp_path), "--run", str(tmp_path / "nothing")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 2 and "no checkpoints/ folder" in out.stderr
