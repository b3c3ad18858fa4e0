"""A trained model as its run saved it: the weights and the resolved config they were trained
with, from ``RUN/best_model.pt`` or a committed checkpoint folder ``RUN/checkpoints/step-N``.

The model is built from the stored config, so a wrong ``--config`` cannot build another shape
and end in ``load_state_dict``'s raw size mismatch: a config given anyway must agree with the
stored one on the model section, and a dataset must have the catalogue the item table was
trained for. Each disagreement is a permanent error that names it, raised before any work.
"""

from __future__ import annotations

import copy
import dataclasses
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

    @property
    def num_items(self) -> int:
        """The catalogue the item table was trained for (its rows less the padding row)."""
        return int(self.weights[ITEM_TABLE].shape[0]) - 1


def read_saved_model(source: str) -> SavedModel:
    """Weights and stored config of a model file or a committed checkpoint folder."""
    weights = ckpt.load_model_weights(source)  # refuses an incomplete or changed folder
    folder = Folder.of(source)
    if folder.is_dir():  # its commit record, verified just now, holds the run's config
        record = json.loads(folder.read_text(ckpt.COMMIT_NAME))
        stored, dataset = record.get("config"), record.get("dataset")
    else:
        payload = ckpt.load_model(source)
        stored, dataset = payload["config"], payload["meta"].get("dataset")
    if not isinstance(stored, dict) or not stored:
        raise ckpt.CheckpointError(f"{source}: holds no config of its run")
    if ITEM_TABLE not in weights:
        raise ckpt.CheckpointError(f"{source}: holds no {ITEM_TABLE}")
    return SavedModel(source, stored, weights, dataset if isinstance(dataset, dict) else None)


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
    """The model ``config`` describes, holding the saved weights (on the CPU)."""
    model = ELCRec(config.model, num_items=saved.num_items)
    try:
        model.load_state_dict(saved.weights)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(
            f"{saved.source}: the weights do not fit the model its config builds: "
            f"{one_line(str(exc))}"
        ) from None
    return model
