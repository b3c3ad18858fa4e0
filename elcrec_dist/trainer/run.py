"""A training run around ``fit``: the resumability check, the run folder (resolved config,
logs), and the final ``results.json`` with its baselines and diagnostics. Files are written by
rank 0 only, through ``rundir.Folder``: the run folder is a local path or an ``s3://`` URL."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
import yaml

from elcrec_dist import distributed as dist_utils
from elcrec_dist.checkpoint import Checkpointer
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.diagnostics import intent_recovery
from elcrec_dist.model import ELCRec
from elcrec_dist.planted import read_planted
from elcrec_dist.rundir import Folder, agree
from elcrec_dist.runlock import hold_run_folder
from elcrec_dist.runlog import RunLogger, logger
from elcrec_dist.stream import StreamingDataset
from elcrec_dist.tracking import record_run
from elcrec_dist.trainer.loop import FitResult, fit, verify_data
from elcrec_dist.trainer.validation import popularity_sharded


def train(config: ExperimentConfig, data: StreamingDataset, *, device: torch.device,
          resume: str | None = None) -> tuple[Folder, FitResult]:
    """One training run end to end: refuse a resume that does not fit and a dataset whose files
    differ from its manifest before anything is written, hold the run folder's lock (a second
    trainer there exits 2), prepare the run folder, train, test, write ``results.json``.
    Collective."""
    info = data.info
    if resume:
        Checkpointer(
            config.train.run_dir, config=config, dataset=info.fingerprint()
        ).check_resumable()
    verify_data(data)
    with hold_run_folder(config.train.run_dir):
        run_dir = prepare_run_dir(config)
        run_log = agree(lambda: RunLogger(run_dir, enabled=dist_utils.is_main()))
        logger.info("run folder %s; %d users, %d items, world size %d", run_dir, info.num_users,
                    info.num_items, dist_utils.world_size())
        started = time.time()
        try:
            result, model = fit(config, data, device=device, run_log=run_log, resume=resume)
            finish_run(config, result, model, data=data, run_log=run_log,
                       seconds=time.time() - started, device=device)
        except BaseException:
            run_log.close(quiet=True)  # the run's own error is the one to report
            raise
        run_log.close()
    return run_dir, result


def prepare_run_dir(config: ExperimentConfig) -> Folder:
    """The run folder every rank agrees on; the resolved config is written into it (rank 0;
    a failure there stops every rank)."""
    run_dir = Folder(dist_utils.broadcast_object(config.train.run_dir))

    def write_config() -> None:
        run_dir.makedirs()
        run_dir.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")

    agree(lambda: write_config() if dist_utils.is_main() else None)
    return run_dir


def diagnostics(model: ELCRec, data: StreamingDataset, config: ExperimentConfig, *,
                device: torch.device) -> dict[str, Any]:
    """For results.json: a most-popular baseline (test) and, on planted-intent data, how well
    the centres recover the planted intents (on a bounded sample, rank 0)."""
    out: dict[str, Any] = {"popularity_test": popularity_sharded(data, config, device=device)}
    planted = read_planted(data.url)
    if planted is not None and dist_utils.is_main():
        sample = data.sample_sequences(
            rank=0, world=1, count=config.kmeans.sample_users, seed=config.train.seed + 1
        )
        labels = np.asarray(planted.for_users(sample.user_ids))
        out["intent_recovery"] = intent_recovery(
            model, sample.sequences, labels, seed=config.train.seed
        )
    return out


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
    """Baselines and diagnostics for the record; writes ``results.json`` (rank 0; a failure
    there stops every rank, so that every pod of a job exits with the same code)."""
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
    summary.update(diagnostics(model, data, config, device=device))
    agree(lambda: _record(config, result, summary, model, data=data, run_log=run_log)
          if dist_utils.is_main() else None)
    return summary


def _record(config: ExperimentConfig, result: FitResult, summary: dict[str, Any], model: ELCRec, *,
            data: StreamingDataset, run_log: RunLogger) -> None:
    run_log.log({f"baseline/popularity/{k}": v for k, v in summary["popularity_test"].items()},
                step=result.global_step)
    logger.info("test %s; popularity baseline NDCG@20 %.4f", json.dumps(result.test),
                summary["popularity_test"].get("NDCG@20", float("nan")))
    if "intent_recovery" in summary:
        logger.info("intent recovery: %s", json.dumps(summary["intent_recovery"]))
    record_run(run_log, config.to_dict(), summary, model, data_url=data.url, info=data.info,
               step=result.global_step)  # config text, hparams, norms, projector
    run_log.sync()  # the logs are complete in the run folder before results.json says "done"
    Folder(config.train.run_dir).write_text(json.dumps(summary, indent=2) + "\n", "results.json")
