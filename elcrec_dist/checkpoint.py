"""Checkpoints: the whole resumable state, committed by a manifest written last. Everything
about checkpoints lives here: the on-disk format (commit, verify, load), what a resume may
change, pruning, and the ``Checkpointer`` a run uses to save and restore its engine.

Layout under the run folder::

    RUN/checkpoints/step-00001234/      DeepSpeed engine state (model, optimizer partitions)
    RUN/checkpoints/step-00001234/COMMITTED.json
                                        written last by rank 0: every file with its size and
                                        sha256, plus the training state (epoch, step, data
                                        cursor, best metric, early-stopping counter, config)
    RUN/best_model.pt                   the best weights so far (model state + config + meta)

A checkpoint directory without ``COMMITTED.json``, or whose files no longer match it, does not
count: ``latest_checkpoint`` skips it and a later save prunes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.config import ExperimentConfig, safe_load
from elcrec_dist.errors import PermanentError, one_line
from elcrec_dist.rundir import FileRecord, Folder, agree, gather, scratch
from elcrec_dist.runlog import logger

COMMIT_NAME = "COMMITTED.json"
CHECKPOINTS = "checkpoints"
FORMAT = "elcrec-dist-checkpoint"


class CheckpointError(PermanentError, ValueError):
    """A checkpoint is missing or does not fit. Permanent."""


@dataclass
class TrainState:
    """Everything besides the engine that a resumed run needs to continue exactly.

    Randomness needs no saved generator state: every step's generators (augmentations,
    negatives, dropout) are seeded from (seed, rank, global_step), so a resumed step draws what
    the uninterrupted run drew.
    """

    epoch: int = 0  # the epoch in progress (data cursor, with step_in_epoch)
    step_in_epoch: int = 0  # optimizer steps of ``epoch`` already taken
    global_step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    valid_history: list[float] = field(default_factory=list)
    world_size: int = 1
    finished: bool = False
    # wall seconds spent so far in clustering (k-means start or per-epoch k-means), training
    # steps and validation; older checkpoints without it resume with zeros
    seconds: dict[str, float] = field(
        default_factory=lambda: {"clustering": 0.0, "train": 0.0, "eval": 0.0}
    )
    # users won by each centre so far in ``epoch`` (summed over ranks), for the epoch's centre
    # statistics; a checkpoint from before this field resumes the epoch's counts from zero
    centre_wins: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        return cls(**values)


def tag_of(global_step: int) -> str:
    return f"step-{global_step:08d}"


def _is_checkpoint_file(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return name != COMMIT_NAME and not name.endswith(".tmp") and ".tmp-" not in name


def commit(folder: str | Path | Folder, *, state: TrainState, config: dict[str, Any],
           dataset: dict[str, Any] | None = None, files: list[FileRecord] | None = None) -> None:
    """Write ``COMMITTED.json`` (files, sizes, sha256, state, config, the dataset's fingerprint)
    last, whole. ``files``: the records of what was uploaded and checked (an object store);
    None hashes every file in the folder (a local or mounted one). Rank 0 only."""
    folder = Folder.of(folder)
    if files is None:
        files = [FileRecord(rel, size, folder.sha256(rel))
                 for rel, size in folder.files().items() if _is_checkpoint_file(rel)]
    payload: dict[str, Any] = {"format": FORMAT, "state": state.to_dict(), "config": config,
                               "files": [f.to_dict() for f in sorted(files, key=lambda f: f.path)]}
    if dataset is not None:
        payload["dataset"] = dataset
    folder.write_text(json.dumps(payload, indent=2) + "\n", COMMIT_NAME)


def _read_record(folder: Folder) -> dict[str, Any] | None:
    """The commit record of ``folder`` as written, or None if absent or not one."""
    try:
        payload = json.loads(folder.read_bytes(COMMIT_NAME))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == FORMAT else None


def recorded_files(record: dict[str, Any]) -> list[FileRecord]:
    return [FileRecord(e["path"], int(e["bytes"]), e["sha256"]) for e in record.get("files", [])]


INCOMPLETE = f"no {COMMIT_NAME} (a save that did not finish)"


def problem_of(folder: str | Path | Folder) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)`` for a complete checkpoint; else ``(record or None, why)``, where ``why``
    says what is wrong: no commit record (a save that did not finish), an unreadable one, or a
    file missing, of another size, or with another sha256 than recorded (damaged or changed).
    A storage failure while reading raises (``StorageError``): it says nothing of the files."""
    folder = Folder.of(folder)
    try:
        text = folder.read_bytes(COMMIT_NAME)
    except FileNotFoundError:
        return None, INCOMPLETE
    try:
        payload = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{COMMIT_NAME} is not valid JSON ({exc})"
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return None, f"{COMMIT_NAME} is not an {FORMAT} record"
    sizes = folder.files()
    try:
        files = recorded_files(payload)
    except (KeyError, TypeError, ValueError) as exc:
        return payload, f"{COMMIT_NAME} lists its files wrongly ({exc!r})"
    for entry in files:
        size = sizes.get(entry.path)
        if size is None:
            return payload, f"{entry.path} is missing"
        if size != entry.bytes:
            return payload, f"{entry.path} has {size} bytes, the record says {entry.bytes}"
        if folder.sha256(entry.path) != entry.sha256:
            return payload, f"{entry.path} has another sha256 than the record (damaged or changed)"
    return payload, None


def verify(folder: str | Path | Folder) -> dict[str, Any] | None:
    """The commit record of a complete checkpoint, or None if it is incomplete or changed
    (``problem_of`` says why)."""
    record, problem = problem_of(folder)
    return record if problem is None else None


# Config keys a resumed run may change: where the data and the run folder are, how long to train,
# how often to log and save, how evaluation is batched and which cut-offs it reports, the
# kernels' summation order, and how ZeRO buckets its collectives (smaller buckets after an
# out-of-memory kill). Every other key decides what the run computes; resuming with another
# value would continue one run under another run's settings, so it is refused.
# deepspeed.item_exchange changes how the item table's gradient travels, not what it sums to: on
# 2 ranks bitwise the same update; on 3 or more only the order of float additions, as the
# bucket sizes change it. The sampled metrics add reported numbers and select nothing. How many
# non-finite steps a run tolerates and how long a collective waits for a peer decide when a
# run stops, not what it computes (a preempted run may resume with a longer timeout).
# How long to train is fixed once the learning rate follows a schedule over train.epochs.
RESUMABLE_KEYS = frozenset({
    "name", "data.path", "train.run_dir", "train.epochs", "train.patience", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.deterministic", "eval.batch_size",
    "eval.ks", "kmeans.batch_size", "deepspeed.reduce_bucket_size",
    "deepspeed.allgather_bucket_size", "deepspeed.overlap_comm", "deepspeed.item_exchange",
    "eval.sampled_negatives",
    "eval.sampled_distribution", "train.max_nonfinite_steps", "train.collective_timeout_s",
    "eval.tile_items",  # items scored at a time: the same ranks and metrics whatever its value
})


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class ConfigChanges:
    """How a resumed run's config differs from the one in its checkpoint (dotted keys)."""

    # key -> (checkpoint's value, now), keys a resume may not change
    changed: dict[str, tuple[Any, Any]]
    unrecorded: list[str]  # keys the checkpoint does not record (written before they existed)
    dropped: list[str]  # keys the checkpoint records that this version no longer has


UNRECORDED = "not recorded (written before the key existed)"


class _Unrecorded(str):
    """The old value of a key its checkpoint predates: a sentence, printed without quotes by
    every message that lists changed keys with ``!r``."""

    def __repr__(self) -> str:
        return str(self)


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> ConfigChanges:
    """Compare the config a checkpoint recorded with the one a resume brings (both ``to_dict``
    form).

    A key the checkpoint does not record was added after it was written; the code that wrote it
    behaved as the key's default does (a new key's default keeps the old behaviour). So such a
    key set away from its default changes what the run computes, like any recorded key, and is
    listed as changed with ``UNRECORDED`` and the default as its old value. A record with no
    config at all says nothing about any key: its keys are only listed as unrecorded."""
    old = _flatten(json.loads(json.dumps(stored)))  # the JSON round trip a checkpoint went through
    new = _flatten(json.loads(json.dumps(current)))
    defaults = _flatten(json.loads(json.dumps(ExperimentConfig().to_dict())))
    resumable = RESUMABLE_KEYS
    if old.get("train.lr_schedule", "constant") != "constant":
        resumable = RESUMABLE_KEYS - {"train.epochs"}  # the schedule's length: its rate per step
    changed: dict[str, tuple[Any, Any]] = {
        key: (old[key], new[key])
        for key in sorted(old.keys() & new.keys())
        if old[key] != new[key] and key not in resumable
    }
    unrecorded = sorted(new.keys() - old.keys())
    for key in unrecorded if old else ():
        if key in defaults and new[key] != defaults[key] and key not in resumable:
            changed[key] = (_Unrecorded(f"{UNRECORDED}, so the default {defaults[key]!r}"),
                            new[key])
    return ConfigChanges(dict(sorted(changed.items())), unrecorded,
                         sorted(old.keys() - new.keys()))


def _refuse_changed_config(folder: Folder | Path, changes: ConfigChanges) -> None:
    if changes.changed:
        listed = "; ".join(
            f"{key}: {before!r} in the checkpoint, {after!r} now"
            for key, (before, after) in changes.changed.items()
        )
        raise CheckpointError(
            f"cannot resume from {folder}: the config differs from the one the run was started "
            f"with ({listed}). "
            "Resume with the run's own settings (its config.yaml), or start a new run folder"
        )


def check_resume(
    folder: Folder | Path,
    record: dict[str, Any],
    *,
    config: dict[str, Any],
    dataset: dict[str, Any],
    world: int,
) -> ConfigChanges:
    """Raise ``CheckpointError`` if resuming from ``folder`` (commit ``record``) would change what
    the run computes: another number of ranks (each rank's data shard and optimizer partition),
    a config key outside ``RESUMABLE_KEYS``, or another dataset (``dataset`` is
    ``DatasetInfo.fingerprint()``; a record from before fingerprints were kept is not checked).
    Returns the config comparison, for its warnings about keys the record lacks."""
    written_by = record.get("state", {}).get("world_size", world)
    if written_by != world:
        raise CheckpointError(f"{folder} was written by {written_by} ranks; this run has {world}")
    changes = config_changes(record.get("config", {}), config)
    _refuse_changed_config(folder, changes)
    recorded = record.get("dataset")
    if recorded is not None and recorded != dataset:
        listed = "; ".join(
            f"{key}: {recorded.get(key)!r} in the checkpoint, {value!r} now"
            for key, value in dataset.items()
            if recorded.get(key) != value
        )
        raise CheckpointError(
            f"cannot resume from {folder}: it was trained on another dataset ({listed}); "
            "a rebuilt or different dataset needs a new run folder"
        )
    return changes


def newest_record(run_dir: str | Path | Folder) -> tuple[Folder, dict[str, Any]] | None:
    """The newest checkpoint's commit record, without verifying its files (cheap, for checks made
    before anything is loaded; ``latest_checkpoint`` verifies before anything is restored)."""
    for folder in checkpoint_folders(run_dir):
        payload = _read_record(folder)
        if payload is not None:
            return folder, payload
    return None


def checkpoint_folders(run_dir: str | Path | Folder) -> list[Folder]:
    """Every ``step-N`` folder under ``run_dir/checkpoints``, newest first, complete or not."""
    root = Folder.of(run_dir).child(CHECKPOINTS)
    return sorted((f for f in root.folders() if f.name.startswith("step-")),
                  key=lambda f: f.name, reverse=True)


def latest_checkpoint(run_dir: str | Path | Folder) -> tuple[Folder, dict[str, Any]] | None:
    """The newest complete checkpoint under ``run_dir`` and its commit record, or None for a
    fresh run folder. Each newer folder passed over is logged with what is wrong with it.

    Raises ``CheckpointError`` when the newest complete checkpoint holds a pickle that a
    weights-only load refuses (``refuse_unsafe_pickles``), and when no checkpoint is usable
    but the folder has committed checkpoints that are now damaged: starting afresh there would
    lay a second history over the first (and ``--resume auto`` would do it silently), so the
    run folder is left for a person to look at. A folder with logged steps but no checkpoint at
    all is a run killed before its first save; ``Checkpointer.check_resumable`` decides whether
    it may start afresh (only with the settings it was started with).
    """
    run_dir = Folder.of(run_dir)
    damaged: list[str] = []
    for folder in checkpoint_folders(run_dir):
        record, problem = problem_of(folder)
        if problem is None and record is not None:
            refuse_unsafe_pickles(folder, record)
            return folder, record
        logger.warning("checkpoint %s is not usable: %s; trying an older one", folder, problem)
        if problem != INCOMPLETE:
            damaged.append(f"{folder.name} ({problem})")
    if damaged:
        raise CheckpointError(
            f"{run_dir}: no usable checkpoint, but the run folder has a history (committed "
            f"checkpoints that no longer verify: {'; '.join(damaged)}). Refusing to start afresh "
            "over it: restore the checkpoints from a copy, or move the folder aside (or pass "
            "another --run-dir) to start a new run"
        )
    return None


METRICS_FILE = "metrics.jsonl"  # the run log's rows (``RunLogger``)
CONFIG_FILE = "config.yaml"  # the resolved config a run writes into its folder


def _logged_training_steps(run_dir: Folder) -> int:
    """How many rows of the run log are at a step past 0 (rows at step 0 are logged before the
    first step: a run killed then has trained nothing)."""
    try:
        text = run_dir.read_text(METRICS_FILE)
    except FileNotFoundError:
        return 0
    count = 0
    for line in text.splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line of a killed run
        count += isinstance(step, int) and step > 0
    return count


# Checkpoints that verified in this process (rank 0), by folder and commit record: each is
# hashed once, not at every prune (a run holds its folder's lock: nobody else writes there).
_VERIFIED: set[tuple[str, str]] = set()


def _verified_key(folder: Folder) -> tuple[str, str] | None:
    try:
        return folder.url, hashlib.sha256(folder.read_bytes(COMMIT_NAME)).hexdigest()
    except FileNotFoundError:
        return None


def prune(run_dir: str | Path | Folder, *, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints that verify (their files match their record); remove
    older ones and every incomplete or damaged one, logging why. Whether a checkpoint counts is
    decided by its hashes, never by the presence of its commit record alone, so a damaged
    checkpoint cannot push a good one out.

    Call it only while no rank is writing a checkpoint (rank 0, after the save's barrier, or
    before training starts).
    """
    kept = 0
    for folder in checkpoint_folders(run_dir):
        if kept < keep:
            key = _verified_key(folder)
            if key is None:
                problem: str | None = INCOMPLETE
            else:
                problem = None if key in _VERIFIED else problem_of(folder)[1]
            if problem is None and key is not None:
                _VERIFIED.add(key)
                kept += 1
                continue
            logger.warning("removing checkpoint %s: %s", folder, problem)
        folder.remove()


def save_model(path: str | Path, *, state: dict[str, torch.Tensor], config: dict[str, Any],
               meta: dict[str, Any]) -> None:
    """Write {model state, resolved config, meta} to ``path`` (a local path or URL), whole."""
    parent, name = _split(path)
    payload = {
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "config": config,
        "meta": meta,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    parent.write_bytes(buffer.getvalue(), name)


def _split(path: str | Path) -> tuple[Folder, str]:
    """The folder holding the file at ``path`` and the file's name."""
    text = str(path).rstrip("/")
    head, _, name = text.rpartition("/")
    return Folder(head if head else "."), name


def _load_weights_only(data: bytes, *, source: str = "") -> Any:
    # weights_only: a file in a run folder may have been written by anyone who can write there
    where = source or "the file"
    if not data.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip nor a bare pickle
        raise CheckpointError(f"{where}: not a torch checkpoint file")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        # a truncated copy, or a pickle naming code to run (refused, never run)
        raise CheckpointError(f"{where}: not a checkpoint this project can load "
                              f"({_load_failure(exc)})") from None


def _load_failure(exc: BaseException) -> str:
    """What torch.load's long message says, in a few words: the global a weights-only load
    refused, or its first sentence."""
    text = one_line(str(exc))
    refused = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    return refused.group(0) if refused else text.split(". ")[0]


def load_model(path: str | Path) -> dict[str, Any]:
    parent, name = _split(path)
    try:
        data = parent.read_bytes(name)
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"{path}: no such checkpoint") from None
    payload = _load_weights_only(data, source=str(path))
    if not isinstance(payload, dict) or not {"model", "config", "meta"} <= set(payload):
        raise CheckpointError(f"{path}: not an elcrec-dist model checkpoint")
    return payload


# DeepSpeed's file of module weights (data parallel: one)
MODEL_STATES = "mp_rank_00_model_states.pt"
OBJECTIVE_PREFIX = "model."  # the engine wraps the model as ``ELCRecObjective.model``


def load_model_weights(path: str | Path | Folder) -> dict[str, torch.Tensor]:
    """The model's weights from a model file (``best_model.pt``) or a committed training
    checkpoint folder (``RUN/checkpoints/step-N``), local or a URL, named like
    ``ELCRec.state_dict()``, fp32.

    A folder counts only when its manifest verifies (``verify``). Under bf16 its module weights
    are DeepSpeed's bf16 working copy, not the fp32 master partition, so they are rounded.
    """
    folder = Folder.of(path)
    if not folder.is_dir():
        return {k: v.float() for k, v in load_model(str(path))["model"].items()}
    if verify(folder) is None:
        raise CheckpointError(
            f"{folder}: not a complete checkpoint (no {COMMIT_NAME}, or its files changed)"
        )
    try:
        states = _load_weights_only(folder.read_bytes(MODEL_STATES),
                                    source=folder.show(MODEL_STATES))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: the checkpoint has no {MODEL_STATES}") from None
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict) or not all(k.startswith(OBJECTIVE_PREFIX) for k in module):
        raise CheckpointError(
            f"{folder.show(MODEL_STATES)}: no module weights named {OBJECTIVE_PREFIX}*"
        )
    return {k[len(OBJECTIVE_PREFIX):]: v.float() for k, v in module.items()}


BEST_MODEL = "best_model.pt"


@dataclass(frozen=True)
class Restored:
    """The checkpoint a resumed run continues from: its folder, training state and files."""

    folder: Folder
    state: TrainState
    files: tuple[FileRecord, ...] = ()


class Checkpointer:
    """One run folder's checkpoints: the resumability checks, restore, save (commit record
    last), prune, and the best model file. Collective methods are called by every rank; shared
    files (commit records, the best model) are written and removed by rank 0 only.

    The run folder is a ``Folder``: a local (or mounted) path, where the engine reads and writes
    its files in place, or an object-store URL, where each rank's engine writes into a local
    scratch folder that the rank uploads and checks (size and sha256 of what landed); rank 0
    commits once every rank's files have landed. A resume downloads the committed files,
    checked against the record, into a scratch folder for the engine to load.

    ``config`` is the run's resolved config and ``dataset`` the dataset's fingerprint
    (``DatasetInfo.fingerprint()``): both go into every commit record, and a resume is checked
    against them. ``before_commit`` runs on rank 0 just before a commit record is written (the
    run log stores its files there, so that a resumed run finds every row up to its step).
    """

    def __init__(
        self,
        run_dir: str | Path | Folder,
        *,
        config: ExperimentConfig,
        dataset: dict[str, Any],
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir = Folder.of(run_dir)
        self.config = config
        self.dataset = dataset
        self.before_commit = before_commit
        self.best_path = self.run_dir.show(BEST_MODEL)

    def check_resumable(self) -> None:
        """Refuse, before anything in the run folder is written, a resume that would change
        what the run computes: its number of ranks, its config (``RESUMABLE_KEYS`` lists what
        may change) or its dataset. Reads the newest commit record without hashing its files
        (cheap); ``find`` verifies before anything is restored. Every rank raises."""
        agree(lambda: self._check_newest() if dist_utils.is_main() else None)

    def _check_newest(self) -> None:
        found = newest_record(self.run_dir)
        if found is not None:
            check_resume(*found, config=self.config.to_dict(), dataset=self.dataset,
                         world=dist_utils.world_size())
            return
        steps = _logged_training_steps(self.run_dir)
        if steps:
            self._check_killed_before_first_save(steps)

    def _check_killed_before_first_save(self, steps: int) -> None:
        """Logged training steps and no checkpoint: a run killed before its first save (a pod
        killed in its first epoch). Its retry starts afresh, the log rewound, but only with the
        settings in the folder's ``config.yaml``: other settings would lay another run's
        history over this one's."""
        history = f"{steps} logged training step(s) in {METRICS_FILE} and no checkpoint"
        try:
            stored = safe_load(self.run_dir.read_text(CONFIG_FILE))
        except FileNotFoundError:
            stored = None
        if not isinstance(stored, dict):
            raise CheckpointError(
                f"{self.run_dir}: no usable checkpoint, but the run folder has a history "
                f"({history}) and no {CONFIG_FILE} saying which run made it. Refusing to start "
                "afresh over it: move the folder aside (or pass another --run-dir)"
            )
        changes = config_changes(stored, self.config.to_dict())
        if changes.changed:
            listed = "; ".join(f"{key}: {before!r} in {CONFIG_FILE}, {after!r} now"
                               for key, (before, after) in changes.changed.items())
            raise CheckpointError(
                f"{self.run_dir}: no usable checkpoint, but the run folder has a history "
                f"({history}) of a run with other settings ({listed}). Refusing to start "
                "afresh over it: resume with its settings, or pass another --run-dir"
            )
        logger.warning("%s: %s, written with these settings: a run killed before its first "
                       "checkpoint; starting afresh (its log is rewound)", self.run_dir, history)

    def find(self, resume: str | None) -> Restored | None:
        """The newest complete checkpoint to resume from, as rank 0 chose it (every rank gets
        the same), checked against this run's config, dataset and ranks. ``resume``: None
        starts afresh; ``"required"`` raises if there is none; ``"auto"`` returns None then."""
        chosen = agree(lambda: latest_checkpoint(self.run_dir)
                       if resume and dist_utils.is_main() else None)
        found = dist_utils.broadcast_object(chosen)
        if resume == "required" and found is None:
            raise CheckpointError(
                f"--resume: no complete checkpoint under {self.run_dir.show(CHECKPOINTS)}"
            )
        if found is None:
            return None
        folder, committed = found
        changes = check_resume(
            folder,
            committed,
            config=self.config.to_dict(),
            dataset=self.dataset,
            world=dist_utils.world_size(),
        )
        if changes.unrecorded and dist_utils.is_main():
            logger.warning(
                "%s does not record %s (written before they existed); "
                "continuing with this run's values",
                folder,
                ", ".join(changes.unrecorded),
            )
        if changes.dropped and dist_utils.is_main():
            logger.warning(
                "%s records %s, which this version no longer has",
                folder,
                ", ".join(changes.dropped),
            )
        return Restored(
            folder, TrainState.from_dict(committed["state"]), tuple(recorded_files(committed))
        )

    def load(self, engine: Any, restored: Restored) -> None:
        """Restore the engine (model, optimizer partitions) from ``restored``; then drop the
        partial saves a killed run may have left (rank 0, after every rank has read)."""
        with local_copy(restored) as local:
            engine.load_checkpoint(
                str(local.parent), tag=local.name, load_lr_scheduler_states=False
            )
        agree(lambda: prune(self.run_dir, keep=self.config.train.keep_checkpoints)
              if dist_utils.is_main() else None)

    def save(self, engine: Any, state: TrainState) -> None:
        """Every rank writes its engine state and makes sure it landed; then rank 0 commits
        (record last) and prunes to ``train.keep_checkpoints``. A storage failure on any rank
        stops every rank (``rundir.agree``), with nothing committed."""
        folder = self.run_dir.child(CHECKPOINTS, tag_of(state.global_step))
        if folder.local:
            engine.save_checkpoint(
                str(folder.local_path().parent), tag=folder.name, client_state={}, save_latest=False
            )
            dist_utils.barrier()
            files = None  # rank 0 hashes the shared folder
        else:
            with scratch("elcrec-save-") as local:
                engine.save_checkpoint(
                    str(local), tag=folder.name, client_state={}, save_latest=False
                )
                uploaded = gather(agree(lambda: _upload_tree(local / folder.name, folder)))
            files = [record for records in uploaded for record in records]
            duplicated = sorted({f.path for f in files if sum(g.path == f.path for g in files) > 1})
            if duplicated:
                raise CheckpointError(f"{folder}: ranks wrote the same files {duplicated}")

        def commit_and_prune() -> None:
            if self.before_commit is not None:
                self.before_commit()
            commit(
                folder, state=state, config=self.config.to_dict(), dataset=self.dataset, files=files
            )
            prune(self.run_dir, keep=self.config.train.keep_checkpoints)

        agree(lambda: commit_and_prune() if dist_utils.is_main() else None)

    def save_best(self, model: torch.nn.Module, meta: dict[str, Any]) -> None:
        """The best weights so far, with the config and ``meta`` (rank 0 writes; collective, so
        that a failed write stops every rank)."""
        agree(lambda: save_model(self.best_path, state=model.state_dict(),
                                 config=self.config.to_dict(), meta=meta)
              if dist_utils.is_main() else None)

    def load_best(self, model: torch.nn.Module) -> bool:
        """Load the best weights into ``model`` if a best model was saved (every rank reads the
        run folder's file); returns whether it was. Collective."""
        payload = agree(lambda: load_model(self.best_path)
                        if self.run_dir.exists(BEST_MODEL) else None)
        if payload is None:
            return False
        model.load_state_dict(payload["model"])
        return True


@contextlib.contextmanager
def local_copy(restored: Restored) -> Iterator[Path]:
    """The restored checkpoint's files on this rank's local disk, where the engine reads them:
    a local run folder's checkpoint itself, or a scratch copy of an object-store one, each file
    checked against the commit record as it arrives (removed afterwards). Collective."""
    folder = restored.folder
    if folder.local:
        yield folder.local_path()
        return
    with scratch("elcrec-restore-") as local:
        agree(lambda: _download_tree(folder, restored.files, local / folder.name))
        yield local / folder.name


def _download_tree(folder: Folder, files: tuple[FileRecord, ...], local: Path) -> None:
    """Copy the recorded ``files`` of ``folder`` into ``local``, each checked against its record."""
    for record in files:
        folder.download(record.path, local / record.path, expect=record)


def _upload_tree(local: Path, folder: Folder) -> list[FileRecord]:
    """Upload every file under ``local`` to the same relative path in ``folder``; their records."""
    return [folder.upload(path, path.relative_to(local).as_posix())
            for path in sorted(local.rglob("*")) if path.is_file()]


# --- the engine's own files: loaded weights-only ---------------------------------------------
#
# DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``: unpickling a
# file that anyone who can write the run folder (a shared volume, a bucket) could have replaced
# runs whatever code the pickle names. Every engine this project builds reads through
# ``SafeCheckpointEngine`` instead: ``weights_only=True``, which admits tensors, containers and
# plain values, plus the three DeepSpeed classes its ZeRO files hold (``ENGINE_SAFE_GLOBALS``),
# each restored by setting fields, never by calling code of the file's choosing. Before that,
# ``refuse_unsafe_pickles`` reads the pickles' opcodes (without running them) on rank 0, so a
# file naming anything else is refused on every rank with a message, not half-way through a
# load.

# What DeepSpeed 0.19 stores besides tensors and containers (``zero_pp_rank_*_optim_states.pt``,
# at ZeRO 1 and 2, fp32 and bf16; ``tests/reliability/test_checkpoint_safety.py`` checks the
# list against the files the engine writes).
ENGINE_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # the static scale 1: plain attributes
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an int enum
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass of two ints
)


def _engine_safe_globals() -> list[Any]:
    import importlib

    found = []
    for name in ENGINE_SAFE_GLOBALS:
        module, _, attribute = name.rpartition(".")
        found.append(getattr(importlib.import_module(module), attribute))
    return found


def unsafe_globals(folder: Folder, relative: str) -> list[str]:
    """The globals (functions, classes) that the pickle in the checkpoint file ``relative``
    below ``folder`` names beyond torch's weights-only set and ``ENGINE_SAFE_GLOBALS``, read
    statically (nothing is unpickled); a file that is not a torch zip checkpoint says so."""
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    try:
        with safe_globals(_engine_safe_globals()), \
                folder.fs.open(folder.path(relative), "rb") as handle:
            return sorted(get_unsafe_globals_in_checkpoint(handle))
    except (ValueError, RuntimeError) as exc:  # not a zip archive, or no data.pkl in it
        return [f"<not a torch checkpoint: {one_line(str(exc))}>"]


def refuse_unsafe_pickles(folder: Folder, record: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` if a ``.pt`` file listed in ``record`` names anything that a
    weights-only load would refuse."""
    for entry in recorded_files(record):
        if not entry.path.endswith(".pt"):
            continue
        found = unsafe_globals(folder, entry.path)
        if found:
            raise CheckpointError(
                f"{folder.show(entry.path)}: refusing to load it: its pickle names "
                f"{', '.join(found)}, which a weights-only load does not run (a checkpoint this "
                "project wrote names none of them; someone who can write the run folder may have "
                "replaced it). Restore the run folder from a trusted copy, or start a new one"
            )


def safe_checkpoint_engine() -> Any:
    """A DeepSpeed checkpoint engine that loads weights-only (see above) and writes through a
    Python file object, so that a failed write (a full disk) raises ``OSError`` with its errno
    instead of torch's writer's bare "unexpected pos"."""
    import pickle

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict: Any, path: str) -> None:
            with open(path, "wb") as handle:
                torch.save(state_dict, handle)

        def load(self, path: str, map_location: Any = None) -> Any:
            from torch.serialization import safe_globals

            try:
                with safe_globals(_engine_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"{path}: refusing to load it: {_load_failure(exc)}"
                ) from None

    return SafeCheckpointEngine()
