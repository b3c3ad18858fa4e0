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
from elcrec_dist.checkpoint import (
    BEST_MODEL,
    CHECKPOINTS,
    Checkpointer,
    CheckpointError,
    Restored,
    TrainState,
    latest_checkpoint,
    tag_of,
)
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.errors import PermanentError, RetryableError
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import DatasetError
from elcrec_dist.runlog import RunLogger, logger, progress
from elcrec_dist.stream import StreamingDataset
from elcrec_dist.tracking import embedding_norms
from elcrec_dist.trainer.engine import (
    NONFINITE_RANKS,
    STOP_RANKS,
    base_optimizer,
    build_engine,
    engine_state_finite,
    init_model,
    run_step,
)
from elcrec_dist.trainer.exchange import exchange_figures
from elcrec_dist.trainer.intents import CentreWins, centre_stats, intent_source
from elcrec_dist.trainer.schedule import learning_rate, set_learning_rate
from elcrec_dist.trainer.validation import evaluate_sharded
from elcrec_dist.trainer.warmstart import warm_start


class TrainingDiverged(PermanentError, RuntimeError):
    """Steps kept failing to be finite, or the weights are no longer finite. Permanent: the same
    settings diverge again; nothing non-finite was committed."""


class StoppedOnRequest(RetryableError):
    """Asked to stop (SIGTERM, the launcher gone); a checkpoint was committed first. Retryable:
    the same command with ``--resume`` continues where it stopped."""


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
        self.checkpointer = Checkpointer(
            config.train.run_dir,
            config=config,
            dataset=data.info.fingerprint(),
            before_commit=run_log.sync,
        )
        self.state = TrainState(world_size=self.world)
        self.nonfinite_in_row = 0  # steps skipped in a row for a non-finite loss or gradient
        self.nonfinite_steps = 0  # all steps skipped so far by this process
        self.model: ELCRec
        self.engine: Any
        self.wins: CentreWins

    def fit(self) -> FitResult:
        """Train with early stopping on validation, then evaluate the best model on test."""
        started, train = time.time(), self.config.train
        stop = self.restore_or_start() and self.state.bad_evals >= train.patience
        if stop:  # killed after its last checkpoint with only the test pass left
            logger.info(
                "training had stopped early (best epoch %d); evaluating the best model on test",
                self.state.best_epoch,
            )
        last = self.state.epoch if stop else train.epochs
        epochs = range(self.state.epoch, last)
        with dist_utils.stop_requests():  # SIGTERM: checkpoint at the next step, exit 75
            for epoch in progress(epochs, desc="epochs", main=dist_utils.is_main(),
                                  total=len(epochs)):
                self.train_epoch(epoch)
                if (epoch + 1) % train.eval_every == 0 or epoch + 1 == train.epochs:
                    stop = self.validate(epoch)
                self.save_checkpoint()
                if self.stop_requested():  # asked during the epoch's last step or its evaluation
                    raise self.stopped()
                if stop:
                    logger.info("early stop after epoch %d: no better %s for %d evaluations",
                                epoch, self.config.eval.select_metric, self.state.bad_evals)
                    break
        test = self.test_best()
        state = self.state
        return FitResult(
            state.best_epoch,
            state.best_metric,
            state.epoch,
            test,
            state.valid_history,
            time.time() - started,
            state.global_step,
            time_split=dict(state.seconds),
            peak_memory=dist_utils.peak_memory(self.device),
        )

    def restore_or_start(self) -> bool:
        """Build the model; continue from the newest complete checkpoint when resuming, else let
        the intent source start the centres; build the engine. Returns whether it resumed."""
        self.model = init_model(self.config, num_items=self.data.info.num_items, device=self.device)
        restored = self.checkpointer.find(self.resume)
        if restored is None and self.resume:  # killed before its first checkpoint: log afresh
            self.run_log.rewind(-1)
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
        self.wins = CentreWins(
            self.config.model.num_clusters, self.device, restored=self.state.centre_wins
        )
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
        batches = self.data.train_batches(
            epoch=epoch,
            rank=self.rank,
            world=self.world,
            batch_size=train.batch_size,
            seed=train.seed,
            start_step=state.step_in_epoch,
        )
        total_steps = train.epochs * self.data.steps_per_epoch(train.batch_size)
        optimizer = base_optimizer(self.engine)
        for step_in_epoch, users in batches:
            record: dict[str, torch.Tensor] = {}
            lr = learning_rate(train, step=state.global_step, total_steps=total_steps)
            set_learning_rate(optimizer, lr)
            terms = run_step(
                self.engine,
                users.sequences,
                self.config,
                num_items=self.data.info.num_items,
                rank=self.rank,
                global_step=state.global_step,
                record=record,
            )
            applied = self.count_nonfinite(record)  # a skipped step still uses up its batch
            if applied and "assignment" in record:
                self.wins.add(record["assignment"])
            state.global_step, state.step_in_epoch = state.global_step + 1, step_in_epoch + 1
            seen += len(users)
            if state.global_step % train.log_every == 0:
                self.run_log.log({**terms, **exchange_figures(self.engine), "lr": lr,
                                  **embedding_norms(self.model)}, step=state.global_step)
            stop = float(record[STOP_RANKS]) > 0 and self.mid_epoch()  # the epoch's end: in fit
            if stop or self.mid_epoch_checkpoint_due():
                state.centre_wins = self.wins.snapshot()
                self.save_checkpoint()
            if stop:
                raise self.stopped()
        self.close_epoch(
            epoch, seconds=max(time.time() - started, 1e-9), seen=seen, clustering_s=clustering_s
        )

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

    def mid_epoch(self) -> bool:
        """Whether the epoch has steps left (its last step's checkpoint is the epoch's own)."""
        return self.state.step_in_epoch < self.data.steps_per_epoch(self.config.train.batch_size)

    def mid_epoch_checkpoint_due(self) -> bool:
        every = self.config.train.checkpoint_every
        return bool(every) and self.state.global_step % every == 0 and self.mid_epoch()

    def count_nonfinite(self, record: dict[str, torch.Tensor]) -> bool:
        """Count a step that was skipped for a non-finite loss or gradient (``train_step``; every
        rank sees the same record) and stop the run after ``train.max_nonfinite_steps`` in a
        row. Returns whether the step was applied."""
        ranks = int(record[NONFINITE_RANKS])
        if ranks == 0:
            self.nonfinite_in_row = 0
            return True
        self.nonfinite_in_row += 1
        self.nonfinite_steps += 1
        step, limit = self.state.global_step, self.config.train.max_nonfinite_steps
        logger.warning("step %d: the loss or a gradient was not finite on %d rank(s); its update "
                       "was skipped (%d in a row, the run stops at %d)", step, ranks,
                       self.nonfinite_in_row, limit)
        self.run_log.log({"train/nonfinite_steps": self.nonfinite_steps}, step=step + 1)
        if self.nonfinite_in_row >= limit:
            raise self.diverged(f"{self.nonfinite_in_row} steps in a row up to step {step} had a "
                                "non-finite loss or gradient (train.max_nonfinite_steps); their "
                                "updates were skipped")
        return False

    def save_checkpoint(self) -> None:
        """Commit a checkpoint of the state so far (``require_finite`` first)."""
        self.require_finite("checkpoint")
        self.checkpointer.save(self.engine, self.state)

    def require_finite(self, what: str) -> None:
        """Raise ``TrainingDiverged`` rather than write ``what`` from non-finite weights or
        optimizer state. Collective: each rank checks what it holds (a ZeRO partition)."""
        bad = float(not engine_state_finite(self.engine))
        if dist_utils.all_reduce_max({"bad": bad}, self.device)["bad"] > 0:
            raise self.diverged(f"at step {self.state.global_step} the weights or the optimizer "
                                f"state are not finite; no {what} of them was written")

    def diverged(self, what: str) -> TrainingDiverged:
        """The error that ends a diverging run, naming the last good checkpoint. Collective."""
        newest = None
        if dist_utils.is_main():
            try:
                found = latest_checkpoint(self.checkpointer.run_dir)
                newest = str(found[0]) if found is not None else None
            except CheckpointError as exc:
                newest = f"none usable ({exc})"
        newest = dist_utils.broadcast_object(newest)
        newest = newest or "none (nothing was committed)"
        return TrainingDiverged(f"training diverged: {what}. The last good checkpoint is {newest}; "
                                "lower train.lr or check the data, and start again in a new run "
                                "folder")

    def stop_requested(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank gets the same answer)."""
        local = float(dist_utils.stop_reason() is not None)
        return dist_utils.all_reduce_max({"stop": local}, self.device)["stop"] > 0

    def stopped(self) -> StoppedOnRequest:
        """The error that ends a run asked to stop, once its checkpoint is committed."""
        reason = dist_utils.stop_reason() or "another rank was asked to stop"
        step = self.state.global_step
        folder = f"{self.checkpointer.run_dir}/{CHECKPOINTS}/{tag_of(step)}"
        return StoppedOnRequest(f"stopped on request ({reason}) at step {step}, after committing "
                                f"{folder}; run the same command with --resume to continue")

    def close_epoch(self, epoch: int, *, seconds: float, seen: int, clustering_s: float) -> None:
        state = self.state
        state.seconds["train"] += seconds
        total_seen = dist_utils.all_reduce_sums({"seen": float(seen)}, self.device)["seen"]
        self.run_log.log(
            {
                "train/sequences_per_s": total_seen / seconds,
                "train/epoch": epoch,
                "time/clustering_s": clustering_s,
                "time/train_s": seconds,
            },
            step=state.global_step,
        )
        wins = self.wins.close_epoch()
        self.run_log.log(
            centre_stats(self.model.cluster_centers.detach(), wins), step=state.global_step
        )
        self.run_log.histogram("centres/users_per_centre", wins.cpu(), step=state.global_step)
        state.epoch, state.step_in_epoch, state.centre_wins = epoch + 1, 0, []

    def validate(self, epoch: int) -> bool:
        """Validation pass; keeps the best model. Returns whether to stop early."""
        state, select = self.state, self.config.eval.select_metric
        t0 = time.perf_counter()
        valid = evaluate_sharded(
            self.model, self.data, self.config, split="valid", device=self.device
        )
        eval_s = time.perf_counter() - t0
        state.seconds["eval"] += eval_s
        self.run_log.log({**{f"valid/{k}": v for k, v in valid.items()}, "time/eval_s": eval_s},
                         step=state.global_step)
        state.valid_history.append(valid[select])
        logger.info("epoch %d: valid %s = %.4f (best %.4f)", epoch, select, valid[select],
                    max(state.best_metric, valid[select]))
        if valid[select] > state.best_metric:
            self.require_finite(BEST_MODEL)
            state.best_metric, state.best_epoch, state.bad_evals = valid[select], epoch, 0
            self.checkpointer.save_best(self.model, {"epoch": epoch, select: valid[select],
                                                     "dataset": self.data.info.fingerprint(),
                                                     "global_step": state.global_step})
        else:
            state.bad_evals += 1
        return state.bad_evals >= self.config.train.patience

    def test_best(self) -> dict[str, float]:
        """The best-validation model on test (the model as trained if validation never ran)."""
        dist_utils.barrier()
        self.checkpointer.load_best(self.model)
        test = evaluate_sharded(
            self.model, self.data, self.config, split="test", device=self.device
        )
        self.run_log.log({f"test/{k}": v for k, v in test.items()}, step=self.state.global_step)
        self.state.finished = True
        return test


def verify_data(data: StreamingDataset) -> None:
    """Refuse, on every rank, a dataset whose files differ from its manifest's sha256 (each rank
    hashes its share of the files; collective). Before anything is written to the run folder."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    mine = data.verify_checksums(rank=rank, world=world)
    problems = [problem for found in dist_utils.all_gather_object(mine) for problem in found]
    if problems:
        raise DatasetError(f"{data.url}: refusing to train on it: {'; '.join(problems)}. "
                           "Rebuild or copy the dataset again")


def fit(
    config: ExperimentConfig,
    data: StreamingDataset,
    *,
    device: torch.device,
    run_log: RunLogger,
    resume: str | None = None,
) -> tuple[FitResult, ELCRec]:
    """Train ``config`` on ``data`` (see ``Trainer.fit``); returns the result and the best model."""
    trainer = Trainer(config, data, device=device, run_log=run_log, resume=resume)
    return trainer.fit(), trainer.model
