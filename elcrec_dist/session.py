"""Run-folder bookkeeping around ``fit``: choosing the folder, writing the resolved config and the
final ``results.json``. Files are written by rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from elcrec_dist import checkpoint as ckpt
from elcrec_dist import distributed as dist_utils
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import DatasetInfo
from elcrec_dist.runlog import RunLogger, logger
from elcrec_dist.stream import StreamingDataset
from elcrec_dist.train import FitResult, popularity_and_recovery


def check_resumable(config: ExperimentConfig, info: DatasetInfo) -> None:
    """Refuse, before anything in the run folder is written, a resume that would change what the
    run computes: its number of ranks, its config (``checkpoint.RESUMABLE_KEYS`` lists what may
    change) or its dataset. Every rank raises."""
    problem = None
    if dist_utils.is_main():
        found = ckpt.newest_record(Path(config.train.run_dir))
        if found is not None:
            try:
                ckpt.check_resume(*found, config=config.to_dict(), dataset=info.fingerprint(), world=dist_utils.world_size())
            except ckpt.CheckpointError as exc:
                problem = str(exc)
    problem = dist_utils.broadcast_object(problem)
    if problem is not None:
        raise ckpt.CheckpointError(problem)


def prepare_run_dir(config: ExperimentConfig) -> Path:
    """The run folder every rank agrees on; the resolved config is written into it."""
    run_dir = Path(dist_utils.broadcast_object(config.train.run_dir))
    if dist_utils.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def finish_run(
    config: ExperimentConfig,
    result: FitResult,
    model: ELCRec,
    *,
    data: StreamingDataset,
    run_log: RunLogger,
    seconds: float,
    device: torch.device,
) -> dict[str, Any]:
    """Baselines and diagnostics for the record; writes ``results.json`` (rank 0)."""
    summary: dict[str, Any] = {
        "test": result.test,
        "best_epoch": result.best_epoch,
        "best_valid": result.best_valid,
        "epochs_run": result.epochs_run,
        "global_steps": result.global_step,
        "valid_history": result.valid_history,
        "train_seconds": seconds,
        "time_split": {f"{name}_s": value for name, value in result.time_split.items()},
        "peak_memory": result.peak_memory,
        "world_size": dist_utils.world_size(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    summary.update(popularity_and_recovery(model, data, config, device=device))
    if not dist_utils.is_main():
        return summary
    run_log.log({f"baseline/popularity/{k}": v for k, v in summary["popularity_test"].items()}, step=result.global_step)
    logger.info("test %s; popularity baseline NDCG@20 %.4f", json.dumps(result.test), summary["popularity_test"].get("NDCG@20", float("nan")))
    if "intent_recovery" in summary:
        logger.info("intent recovery: %s", json.dumps(summary["intent_recovery"]))
    path = Path(config.train.run_dir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)
    return summary
