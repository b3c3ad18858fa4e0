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

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.errors import PermanentError
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
    seconds: dict[str, float] = field(default_factory=lambda: {"clustering": 0.0, "train": 0.0, "eval": 0.0})
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMMIT_NAME and not p.name.endswith(".tmp"))


def commit(folder: Path, *, state: TrainState, config: dict[str, Any], dataset: dict[str, Any] | None = None) -> None:
    """Write ``COMMITTED.json`` (files, sizes, sha256, state, config, the dataset's fingerprint)
    last, atomically. Rank 0 only."""
    files = [
        {"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files_of(folder)
    ]
    payload: dict[str, Any] = {"format": FORMAT, "state": state.to_dict(), "config": config, "files": files}
    if dataset is not None:
        payload["dataset"] = dataset
    tmp = folder / (COMMIT_NAME + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, folder / COMMIT_NAME)


def verify(folder: Path) -> dict[str, Any] | None:
    """The commit record of a complete checkpoint, or None if it is incomplete or changed."""
    marker = folder / COMMIT_NAME
    if not marker.is_file():
        return None
    try:
        payload = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    if payload.get("format") != FORMAT:
        return None
    for entry in payload.get("files", []):
        path = folder / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            return None
    return payload


# Config keys a resumed run may change: where the data and the run folder are, how long to train,
# how often to log and save, how evaluation is batched and which cut-offs it reports, the
# kernels' summation order, and how ZeRO buckets its collectives (smaller buckets after an
# out-of-memory kill). Every other key decides what the run computes; resuming with another
# value would continue one run under another run's settings, so it is refused.
# deepspeed.item_exchange changes how the item table's gradient travels, not what it sums to: on
# 2 ranks bitwise the same update; on 3 or more only the order of float additions, as the
# bucket sizes change it. The sampled metrics add reported numbers and select nothing.
RESUMABLE_KEYS = frozenset({
    "name", "data.path", "train.run_dir", "train.epochs", "train.patience", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.deterministic", "eval.batch_size",
    "eval.ks", "kmeans.batch_size", "deepspeed.reduce_bucket_size", "deepspeed.allgather_bucket_size",
    "deepspeed.overlap_comm", "deepspeed.item_exchange", "eval.sampled_negatives",
    "eval.sampled_distribution",
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

    changed: dict[str, tuple[Any, Any]]  # key -> (checkpoint's value, now), keys a resume may not change
    unrecorded: list[str]  # keys the checkpoint does not record (written before they existed)
    dropped: list[str]  # keys the checkpoint records that this version no longer has


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> ConfigChanges:
    """Compare the config a checkpoint recorded with the one a resume brings (both ``to_dict`` form)."""
    old = _flatten(json.loads(json.dumps(stored)))  # the JSON round trip a checkpoint went through
    new = _flatten(json.loads(json.dumps(current)))
    changed = {
        key: (old[key], new[key])
        for key in sorted(old.keys() & new.keys())
        if old[key] != new[key] and key not in RESUMABLE_KEYS
    }
    return ConfigChanges(changed, sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys()))


def _refuse_changed_config(folder: Path, changes: ConfigChanges) -> None:
    if changes.changed:
        listed = "; ".join(f"{key}: {before!r} in the checkpoint, {after!r} now" for key, (before, after) in changes.changed.items())
        raise CheckpointError(
            f"cannot resume from {folder}: the config differs from the one the run was started with ({listed}). "
            "Resume with the run's own settings (its config.yaml), or start a new run folder"
        )


def check_resume(
    folder: Path, record: dict[str, Any], *, config: dict[str, Any], dataset: dict[str, Any], world: int
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
            f"{key}: {recorded.get(key)!r} in the checkpoint, {value!r} now" for key, value in dataset.items() if recorded.get(key) != value
        )
        raise CheckpointError(
            f"cannot resume from {folder}: it was trained on another dataset ({listed}); "
            "a rebuilt or different dataset needs a new run folder"
        )
    return changes


def newest_record(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint's commit record, without verifying its files (cheap, for checks made
    before anything is loaded; ``latest_checkpoint`` verifies before anything is restored)."""
    for folder in checkpoint_folders(run_dir):
        try:
            payload = json.loads((folder / COMMIT_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            return folder, payload
    return None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every ``step-N`` folder under ``run_dir/checkpoints``, newest first, complete or not."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True)


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint under ``run_dir`` and its commit record."""
    for folder in checkpoint_folders(run_dir):
        record = verify(folder)
        if record is not None:
            return folder, record
    return None


def prune(run_dir: Path, *, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints; remove older and incomplete ones.

    Call it only while no rank is writing a checkpoint (rank 0, after the save's barrier, or
    before training starts).
    """
    kept = 0
    for folder in checkpoint_folders(run_dir):
        if (folder / COMMIT_NAME).is_file() and kept < keep:
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)


def save_model(path: str | Path, *, state: dict[str, torch.Tensor], config: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write {model state, resolved config, meta} to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    payload = {"model": {k: v.detach().cpu() for k, v in state.items()}, "config": config, "meta": meta}
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_model(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or not {"model", "config", "meta"} <= set(payload):
        raise CheckpointError(f"{path}: not an elcrec-dist model checkpoint")
    return payload


MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file of module weights (data parallel: one)
OBJECTIVE_PREFIX = "model."  # the engine wraps the model as ``ELCRecObjective.model``


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's weights from a model file (``best_model.pt``) or a committed training
    checkpoint folder (``RUN/checkpoints/step-N``), named like ``ELCRec.state_dict()``, fp32.

    A folder counts only when its manifest verifies (``verify``). Under bf16 its module weights
    are DeepSpeed's bf16 working copy, not the fp32 master partition, so they are rounded.
    """
    path = Path(path)
    if path.is_dir():
        if verify(path) is None:
            raise CheckpointError(f"{path}: not a complete checkpoint (no {COMMIT_NAME}, or its files changed)")
        states = path / MODEL_STATES
        if not states.is_file():
            raise CheckpointError(f"{path}: the checkpoint has no {MODEL_STATES}")
        module = torch.load(states, map_location="cpu", weights_only=True).get("module")
        if not isinstance(module, dict) or not all(k.startswith(OBJECTIVE_PREFIX) for k in module):
            raise CheckpointError(f"{states}: no module weights named {OBJECTIVE_PREFIX}*")
        return {k[len(OBJECTIVE_PREFIX):]: v.float() for k, v in module.items()}
    return {k: v.float() for k, v in load_model(path)["model"].items()}


BEST_MODEL = "best_model.pt"


@dataclass(frozen=True)
class Restored:
    """The checkpoint a resumed run continues from: its folder and training state."""

    folder: Path
    state: TrainState


class Checkpointer:
    """One run folder's checkpoints: the resumability checks, restore, save (commit record
    last), prune, and the best model file. Collective methods are called by every rank; files
    are written and removed by rank 0 only.

    ``config`` is the run's resolved config and ``dataset`` the dataset's fingerprint
    (``DatasetInfo.fingerprint()``): both go into every commit record, and a resume is checked
    against them.
    """

    def __init__(self, run_dir: str | Path, *, config: ExperimentConfig, dataset: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.dataset = dataset
        self.best_path = self.run_dir / BEST_MODEL

    def check_resumable(self) -> None:
        """Refuse, before anything in the run folder is written, a resume that would change
        what the run computes: its number of ranks, its config (``RESUMABLE_KEYS`` lists what
        may change) or its dataset. Reads the newest commit record without hashing its files
        (cheap); ``find`` verifies before anything is restored. Every rank raises."""
        problem = None
        if dist_utils.is_main():
            found = newest_record(self.run_dir)
            if found is not None:
                try:
                    check_resume(*found, config=self.config.to_dict(), dataset=self.dataset,
                                 world=dist_utils.world_size())
                except CheckpointError as exc:
                    problem = str(exc)
        problem = dist_utils.broadcast_object(problem)
        if problem is not None:
            raise CheckpointError(problem)

    def find(self, resume: str | None) -> Restored | None:
        """The newest complete checkpoint to resume from, as rank 0 chose it (every rank gets
        the same), checked against this run's config, dataset and ranks. ``resume``: None
        starts afresh; ``"required"`` raises if there is none; ``"auto"`` returns None then."""
        found = latest_checkpoint(self.run_dir) if resume and dist_utils.is_main() else None
        found = dist_utils.broadcast_object(found)
        if resume == "required" and found is None:
            raise CheckpointError(f"--resume: no complete checkpoint under {self.run_dir / CHECKPOINTS}")
        if found is None:
            return None
        folder, committed = found
        changes = check_resume(folder, committed, config=self.config.to_dict(), dataset=self.dataset,
                               world=dist_utils.world_size())
        if changes.unrecorded and dist_utils.is_main():
            logger.warning("%s does not record %s (written before they existed); continuing with this run's values",
                           folder, ", ".join(changes.unrecorded))
        if changes.dropped and dist_utils.is_main():
            logger.warning("%s records %s, which this version no longer has", folder, ", ".join(changes.dropped))
        return Restored(folder, TrainState.from_dict(committed["state"]))

    def load(self, engine: Any, restored: Restored) -> None:
        """Restore the engine (model, optimizer partitions) from ``restored``; then drop the
        partial saves a killed run may have left (rank 0, after every rank has read)."""
        folder = restored.folder
        engine.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False)
        dist_utils.barrier()
        if dist_utils.is_main():
            prune(self.run_dir, keep=self.config.train.keep_checkpoints)

    def save(self, engine: Any, state: TrainState) -> None:
        """Every rank writes its engine state; after a barrier rank 0 commits (record last) and
        prunes to ``train.keep_checkpoints``."""
        folder = self.run_dir / CHECKPOINTS / tag_of(state.global_step)
        engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state={}, save_latest=False)
        dist_utils.barrier()
        if dist_utils.is_main():
            commit(folder, state=state, config=self.config.to_dict(), dataset=self.dataset)
            prune(self.run_dir, keep=self.config.train.keep_checkpoints)
        dist_utils.barrier()

    def save_best(self, model: torch.nn.Module, meta: dict[str, Any]) -> None:
        """The best weights so far, with the config and ``meta`` (rank 0)."""
        if dist_utils.is_main():
            save_model(self.best_path, state=model.state_dict(), config=self.config.to_dict(), meta=meta)

    def load_best(self, model: torch.nn.Module) -> bool:
        """Load the best weights into ``model`` if a best model was saved (the run folder is
        shared by every rank); returns whether it was."""
        if not self.best_path.exists():
            return False
        model.load_state_dict(load_model(self.best_path)["model"])
        return True
