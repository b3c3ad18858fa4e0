"""The training loop: restore or start, train an epoch, validate and stop early, test the best.

``Trainer.fit`` reads like the method's algorithm; each phase is a method of a few lines that
delegates to the component owning it: the engine and the step (``trainer.engine``), the intent
source (``trainer.intents``), evaluation (``trainer.validation``) and the checkpointer
(``elcrec_dist.checkpoint``). Data arrive through ``StreamingDataset``: each rank reads only its
share of the row groups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.checkpoint import Checkpointer, Restored, TrainState
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.model import ELCRec
from elcrec_dist.runlog import RunLogger, logger, progress
from elcrec_dist.stream import StreamingDataset
from elcrec_dist.tracking import embedding_norms
from elcrec_dist.trainer.engine import build_engine, init_model, run_step
from elcrec_dist.trainer.exchange import exchange_figures
from elcrec_dist.trainer.intents import CentreWins, centre_stats, intent_source
from elcrec_dist.trainer.validation import evaluate_sharded
from elcrec_dist.trainer.warmstart import warm_start


@dataclass
class FitResult:
    best_epoch: int
    best_valid: float
    epochs_run: int
    test: dict[str, float]
    valid_history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    global_step: int = 0
    time_split: dict[str, float] = field(default_factory=dict)  # clustering / train / eval seconds
    peak_memory: dict[str, float | None] = field(default_factory=dict)


class Trainer:
    """One run on one dataset: the model and its engine, the intent source, the checkpointer,
    and the training state (epoch, step, best metric, early-stopping counter) they share."""

    def __init__(self, config: ExperimentConfig, data: StreamingDataset, *, device: torch.device,
                 run_log: RunLogger, resume: str | None = None) -> None:
        self.config, self.data, self.device, self.run_log = config, data, device, run_log
        self.resume = resume  # None: start afresh; "required" / "auto": see Checkpointer.find
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.intents = intent_source(config.model.intents)
        self.checkpointer = Checkpointer(config.train.run_dir, config=config,
                                         dataset=data.info.fingerprint(), before_commit=run_log.sync)
        self.state = TrainState(world_size=self.world)
        self.model: ELCRec
        self.engine: Any
        self.wins: CentreWins

    def fit(self) -> FitResult:
        """Train with early stopping on validation, then evaluate the best model on test."""
        started, train = time.time(), self.config.train
        stop = self.restore_or_start() and self.state.bad_evals >= train.patience
        if stop:  # killed after its last checkpoint with only the test pass left
            logger.info("training had stopped early (best epoch %d); evaluating the best model on test",
                        self.state.best_epoch)
        last = self.state.epoch if stop else train.epochs
        epochs = range(self.state.epoch, last)
        for epoch in progress(epochs, desc="epochs", main=dist_utils.is_main(), total=len(epochs)):
            self.train_epoch(epoch)
            if (epoch + 1) % train.eval_every == 0 or epoch + 1 == train.epochs:
                stop = self.validate(epoch)
            self.checkpointer.save(self.engine, self.state)
            if stop:
                logger.info("early stop after epoch %d: no better %s for %d evaluations",
                            epoch, self.config.eval.select_metric, self.state.bad_evals)
                break
        test = self.test_best()
        state = self.state
        return FitResult(state.best_epoch, state.best_metric, state.epoch, test, state.valid_history,
                         time.time() - started, state.global_step, time_split=dict(state.seconds),
                         peak_memory=dist_utils.peak_memory(self.device))

    def restore_or_start(self) -> bool:
        """Build the model; continue from the newest complete checkpoint when resuming, else let
        the intent source start the centres; build the engine. Returns whether it resumed."""
        self.model = init_model(self.config, num_items=self.data.info.num_items, device=self.device)
        restored = self.checkpointer.find(self.resume)
        if restored is None and self.config.train.init_from:  # daily retraining: carry over
            self.run_log.log(warm_start(self.model, self.config, self.data.info, self.data.url),
                             step=0)
        elif restored is None:
            self.start_intents()
        else:
            self.state = restored.state
        self.engine = build_engine(self.model, self.config)
        if restored is not None:
            self.continue_from(restored)
        self.wins = CentreWins(self.config.model.num_clusters, self.device, restored=self.state.centre_wins)
        return restored is not None

    def start_intents(self) -> None:
        t0 = time.perf_counter()
        started = self.intents.start(self.model, self.data, self.config)
        if started is not None:
            seconds = time.perf_counter() - t0
            self.state.seconds["clustering"] += seconds
            self.run_log.log({**started, "time/kmeans_start_s": seconds}, step=0)

    def continue_from(self, restored: Restored) -> None:
        self.checkpointer.load(self.engine, restored)
        logger.info("resumed from %s (epoch %d, step %d of the epoch)", restored.folder,
                    self.state.epoch, self.state.step_in_epoch)
        self.run_log.rewind(self.state.global_step)

    def train_epoch(self, epoch: int) -> None:
        """The rest of ``epoch`` from the state's step in it: steps, loss logs, mid-epoch
        checkpoints, then the epoch's speed and centre statistics."""
        state, train = self.state, self.config.train
        state.epoch = epoch
        clustering_s = self.refresh_intents(epoch)
        self.model.train()
        started, seen = time.time(), 0
        batches = self.data.train_batches(epoch=epoch, rank=self.rank, world=self.world, batch_size=train.batch_size,
                                          seed=train.seed, start_step=state.step_in_epoch)
        for step_in_epoch, users in batches:
            record: dict[str, torch.Tensor] = {}
            terms = run_step(self.engine, users.sequences, self.config, num_items=self.data.info.num_items,
                             rank=self.rank, global_step=state.global_step, record=record)
            if "assignment" in record:
                self.wins.add(record["assignment"])
            state.global_step, state.step_in_epoch = state.global_step + 1, step_in_epoch + 1
            seen += len(users)
            if state.global_step % train.log_every == 0:
                self.run_log.log({**terms, **exchange_figures(self.engine), "lr": train.lr,
                                  **embedding_norms(self.model)}, step=state.global_step)
            if self.mid_epoch_checkpoint_due():
                state.centre_wins = self.wins.snapshot()
                self.checkpointer.save(self.engine, state)
        self.close_epoch(epoch, seconds=max(time.time() - started, 1e-9), seen=seen, clustering_s=clustering_s)

    def refresh_intents(self, epoch: int) -> float:
        """The intent source's epoch start (not mid-epoch: the checkpoint holds this epoch's
        centres); returns the seconds it took."""
        if self.state.step_in_epoch != 0:
            return 0.0
        t0 = time.perf_counter()
        refreshed = self.intents.epoch_start(self.model, self.data, self.config, epoch=epoch)
        if refreshed is None:
            return 0.0
        seconds = time.perf_counter() - t0
        self.state.seconds["clustering"] += seconds
        self.run_log.log(refreshed, step=self.state.global_step)
        return seconds

    def mid_epoch_checkpoint_due(self) -> bool:
        every, state = self.config.train.checkpoint_every, self.state
        steps = self.data.steps_per_epoch(self.config.train.batch_size)
        return bool(every) and state.global_step % every == 0 and state.step_in_epoch < steps

    def close_epoch(self, epoch: int, *, seconds: float, seen: int, clustering_s: float) -> None:
        state = self.state
        state.seconds["train"] += seconds
        total_seen = dist_utils.all_reduce_sums({"seen": float(seen)}, self.device)["seen"]
        self.run_log.log({"train/sequences_per_s": total_seen / seconds, "train/epoch": epoch,
                          "time/clustering_s": clustering_s, "time/train_s": seconds}, step=state.global_step)
        wins = self.wins.close_epoch()
        self.run_log.log(centre_stats(self.model.cluster_centers.detach(), wins), step=state.global_step)
        self.run_log.histogram("centres/users_per_centre", wins.cpu(), step=state.global_step)
        state.epoch, state.step_in_epoch, state.centre_wins = epoch + 1, 0, []

    def validate(self, epoch: int) -> bool:
        """Validation pass; keeps the best model. Returns whether to stop early."""
        state, select = self.state, self.config.eval.select_metric
        t0 = time.perf_counter()
        valid = evaluate_sharded(self.model, self.data, self.config, split="valid", device=self.device)
        eval_s = time.perf_counter() - t0
        state.seconds["eval"] += eval_s
        self.run_log.log({**{f"valid/{k}": v for k, v in valid.items()}, "time/eval_s": eval_s},
                         step=state.global_step)
        state.valid_history.append(valid[select])
        logger.info("epoch %d: valid %s = %.4f (best %.4f)", epoch, select, valid[select],
                    max(state.best_metric, valid[select]))
        if valid[select] > state.best_metric:
            state.best_metric, state.best_epoch, state.bad_evals = valid[select], epoch, 0
            self.checkpointer.save_best(self.model, {"epoch": epoch, select: valid[select],
                                                     "global_step": state.global_step})
        else:
            state.bad_evals += 1
        return state.bad_evals >= self.config.train.patience

    def test_best(self) -> dict[str, float]:
        """The best-validation model on test (the model as trained if validation never ran)."""
        dist_utils.barrier()
        self.checkpointer.load_best(self.model)
        test = evaluate_sharded(self.model, self.data, self.config, split="test", device=self.device)
        self.run_log.log({f"test/{k}": v for k, v in test.items()}, step=self.state.global_step)
        self.state.finished = True
        return test


def fit(config: ExperimentConfig, data: StreamingDataset, *, device: torch.device, run_log: RunLogger,
        resume: str | None = None) -> tuple[FitResult, ELCRec]:
    """Train ``config`` on ``data`` (see ``Trainer.fit``); returns the result and the best model."""
    trainer = Trainer(config, data, device=device, run_log=run_log, resume=resume)
    return trainer.fit(), trainer.model
