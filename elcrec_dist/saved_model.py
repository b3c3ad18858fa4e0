"""A trained model as its run saved it: the weights and the resolved config they were trained
with, from a run folder (its ``best_model.pt``), a model file, or a committed checkpoint folder
``RUN/checkpoints/step-N``; local or in object storage. Every command that starts from a
trained model (evaluate, infer, export, the intent report, a warm start) finds it here.

The model is built from the stored config, so a wrong ``--config`` cannot build another shape
and end in ``load_state_dict``'s raw size mismatch: a config given anyway must agree with the
stored one on the model section, and a dataset must have the catalogue the item table was
trained for. Each disagreement is a permanent error that names it, raised before any work.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from elcrec_dist import checkpoint as ckpt
from elcrec_dist.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    load_config,
    parse_override,
    set_dotted,
)
from elcrec_dist.errors import one_line
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import DatasetInfo
from elcrec_dist.rundir import Folder

ITEM_TABLE = "item_embeddings.weight"


@dataclass(frozen=True)
class SavedModel:
    source: str  # where it was read from, for messages
    config: dict[str, Any]  # the run's resolved config (``ExperimentConfig.to_dict`` form)
    weights: dict[str, torch.Tensor]  # named like ``ELCRec.state_dict()``, fp32
    # the fingerprint of the dataset it was trained on (``DatasetInfo.fingerprint``), where the
    # file records one (commit records do; best_model.pt from this version on)
    dataset: dict[str, Any] | None = None
    # sha256 of the model file (of the commit record, for a checkpoint folder): what an output
    # made from this model records to say which model made it
    sha256: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # the model file's meta

    @property
    def num_items(self) -> int:
        """The catalogue the item table was trained for (its rows less the padding row)."""
        return int(self.weights[ITEM_TABLE].shape[0]) - 1


def model_location(run: str) -> str:
    """Where the model of ``run`` is: a committed checkpoint folder or a model file as given, a
    run folder's ``best_model.pt``; a ``CheckpointError`` when there is none."""
    folder = Folder.of(run)
    if folder.is_dir() and not folder.is_file(ckpt.COMMIT_NAME):
        if folder.is_file(ckpt.BEST_MODEL):
            return folder.show(ckpt.BEST_MODEL)
        raise ckpt.CheckpointError(
            f"{run}: no model file (expected a run folder holding {ckpt.BEST_MODEL}, a model "
            "file, or a committed checkpoint folder)"
        )
    return str(run)


def read_saved_model(source: str) -> SavedModel:
    """Weights and stored config of a run folder, a model file or a committed checkpoint
    folder (see ``model_location``)."""
    source = model_location(str(source))
    folder = Folder.of(source)
    if folder.is_dir():  # its commit record, verified by the load, holds the run's config
        weights = ckpt.load_model_weights(source)  # refuses an incomplete or changed folder
        raw = folder.read_bytes(ckpt.COMMIT_NAME)
        record = json.loads(raw)
        stored, dataset, meta = record.get("config"), record.get("dataset"), {}
    else:
        payload = ckpt.load_model(source)
        weights = {k: v.float() for k, v in payload["model"].items()}
        stored, dataset, meta = payload["config"], payload["meta"].get("dataset"), payload["meta"]
        parent, name = source.rstrip("/").rpartition("/")[::2]
        raw = Folder(parent or ".").read_bytes(name)
    if not isinstance(stored, dict) or not stored:
        raise ckpt.CheckpointError(f"{source}: holds no config of its run")
    if ITEM_TABLE not in weights or weights[ITEM_TABLE].dim() != 2:
        raise ckpt.CheckpointError(f"{source}: holds no {ITEM_TABLE}")
    return SavedModel(source, stored, weights, dataset if isinstance(dataset, dict) else None,
                      sha256=hashlib.sha256(raw).hexdigest(), meta=dict(meta))


def resolve_config(
    saved: SavedModel, *, files: Sequence[str] | None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """The config to run the saved model with: ``files`` then ``overrides`` when files are
    given, else the stored config then ``overrides``. Its model section must equal the stored
    one (the weights were trained as that model), or a ``ConfigError`` names each key."""
    try:
        stored = config_from_dict(copy.deepcopy(saved.config))
    except ConfigError as exc:
        raise ConfigError(f"{saved.source}: its stored config does not load: {exc}") from None
    if files:
        config = load_config(list(files), list(overrides))
        given = f"--config {' '.join(files)}"
    else:
        tree = copy.deepcopy(saved.config)
        for text in overrides:
            set_dotted(tree, *parse_override(text))
        try:
            config = config_from_dict(tree)
        except ConfigError as exc:
            raise ConfigError(f"{saved.source}'s config with --set: {exc}") from None
        given = "--set"
    differences = [
        f"model.{f.name}: {getattr(stored.model, f.name)!r} in the checkpoint, "
        f"{getattr(config.model, f.name)!r} from {given}"
        for f in dataclasses.fields(stored.model)
        if getattr(stored.model, f.name) != getattr(config.model, f.name)
    ]
    if differences:
        raise ConfigError(
            f"{saved.source} was trained as another model than {given} describes "
            f"({'; '.join(differences)}). Leave out --config to use the checkpoint's own, or "
            "pass the config it was trained with"
        )
    return config


def check_catalogue(saved: SavedModel, info: DatasetInfo, data: str) -> None:
    """Refuse a dataset whose catalogue is not the one the item table was trained for."""
    if saved.num_items != info.num_items:
        raise ckpt.CheckpointError(
            f"{saved.source} scores a catalogue of {saved.num_items} items (item table of "
            f"{saved.num_items + 1} rows), but the dataset {data} has {info.num_items} items: "
            "evaluate it on the dataset it was trained on"
        )
    now = info.fingerprint()
    if saved.dataset is not None and saved.dataset != now:  # same size, other users or items
        differs = "; ".join(f"{key}: {saved.dataset.get(key)!r} when trained, {value!r} now"
                            for key, value in now.items() if saved.dataset.get(key) != value)
        raise ckpt.CheckpointError(
            f"{saved.source} was trained on another dataset than {data} ({differs}): evaluate it "
            "on the dataset it was trained on"
        )


def build_model(saved: SavedModel, config: ExperimentConfig) -> ELCRec:
    """The model ``config`` describes, holding the saved weights (on the CPU). A tensor the
    config makes another shape (or leaves out) is a ``CheckpointError`` naming it."""
    model = ELCRec(config.model, num_items=saved.num_items)
    for name, tensor in model.state_dict().items():
        got = saved.weights.get(name)
        if got is None or got.shape != tensor.shape:
            shape = None if got is None else tuple(got.shape)
            raise ckpt.CheckpointError(
                f"{saved.source}: {name} is {shape}, its config (model section) makes it "
                f"{tuple(tensor.shape)}"
            )
    try:
        model.load_state_dict(saved.weights)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(
            f"{saved.source}: the weights do not fit the model its config builds: "
            f"{one_line(str(exc))}"
        ) from None
    return model
