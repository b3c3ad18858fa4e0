"""``RunLogger.rewind``: what a resumed run forgets before it logs again."""

from __future__ import annotations

import json
from pathlib import Path

from elcrec_dist.runlog import RunLogger


def test_rewind_forgets_later_steps_and_end_of_run_rows_at_the_checkpoint_step(
    tmp_path: Path,
) -> None:
    log = RunLogger(tmp_path, enabled=True)
    log.log({"loss/total": 1.0}, step=1)
    log.log({"loss/total": 0.9}, step=2)
    # epoch end, before the checkpoint
    log.log({"valid/NDCG@20": 0.1, "centres/dead_fraction": 0.0}, step=2)
    log.log({"test/NDCG@20": 0.2}, step=2)  # after the last checkpoint: the run ended there
    log.log({"baseline/popularity/NDCG@20": 0.05}, step=2)
    log.log({"loss/total": 0.8}, step=3)
    log.rewind(2)
    log.log({"test/NDCG@20": 0.2}, step=2)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 1, "loss/total": 1.0},
        {"step": 2, "loss/total": 0.9},
        {"step": 2, "valid/NDCG@20": 0.1, "centres/dead_fraction": 0.0},
        {"step": 2, "test/NDCG@20": 0.2},
    ]


def test_a_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    log = RunLogger(tmp_path / "rank1", enabled=False)
    log.log({"loss/total": 1.0}, step=1)
    log.rewind(0)
    assert not (tmp_path / "rank1").exists()
