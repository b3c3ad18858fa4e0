"""Daily retraining: start a run from an earlier run's model on a newly prepared build
(``train.init_from``, ``launcher/train.py --init-from RUN``).

Items are matched by their *original* ids through the two builds' id maps (``item_map.parquet``,
written by ``data_prep.build``): an item of the new build that the earlier run knew gets its row
exactly as trained; a new item gets a fresh row (the model's own initialisation, seeded by
``train.seed``); an item that left the catalogue is dropped with its row. The padding row, the
position embeddings, the encoder and the intent centres carry over unchanged (so the k-means
start of the centres is skipped). Users need nothing: ELCRec holds no per-user parameter, a user
is encoded from their sequence, so returning users are served by the carried encoder and new
users alike.

A warm start is a *new* run: a fresh optimizer (Adam's moments start at zero), step 0, the new
build's data. ``--resume`` is the other thing: it continues one run exactly where it stopped
(and a resumed warm-started run continues from its checkpoint, not from ``init_from`` again).

Refused with exit 2, before the run folder is touched (``check_init_from``): a source whose
model shape differs from the config (layers, hidden size, heads, max_len, centres), a source or
a build without id maps, original ids of different kinds (int vs string).

Memory: the earlier table [N_old + 1, D] (memory-mapped from its file) and two arrays of
original ids, one per catalogue: it grows with the catalogues, never with users.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from elcrec_dist.checkpoint import BEST_MODEL, CheckpointError
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.idmaps import IdMaps
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import DatasetError, DatasetInfo, read_info
from elcrec_dist.saved_model import model_location

TABLE = "item_embeddings.weight"
# model keys that fix a parameter's shape or meaning; a warm start needs them equal
SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "max_len", "num_clusters")


class WarmStartError(CheckpointError):
    """``--init-from`` names a model or a build a warm start cannot use. Permanent."""


@dataclass(frozen=True)
class Source:
    """The earlier run's model file: its weights (memory-mapped) and the config it recorded."""

    path: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any]


@dataclass(frozen=True)
class ItemMatch:
    """Item ids of the new build [M] and of the earlier one [M] for the M items both hold."""

    new_ids: np.ndarray
    old_ids: np.ndarray
    new_items: int  # N of the new build
    old_items: int  # N of the earlier one

    def figures(self) -> dict[str, float]:
        kept = len(self.new_ids)
        return {"warm_start/items_kept": float(kept),
                "warm_start/items_new": float(self.new_items - kept),
                "warm_start/items_dropped": float(self.old_items - kept)}


def read_source(init_from: str) -> Source:
    """The model file of ``init_from`` (a run folder's ``best_model.pt``, or a model file)."""
    try:
        path = Path(model_location(init_from))
    except CheckpointError as exc:
        raise WarmStartError(f"--init-from {exc}") from None
    if not path.is_file():  # mmap below needs a local file
        raise WarmStartError(f"--init-from {init_from}: no local model file (a run folder holding "
                             f"{BEST_MODEL}, or a model file)")
    try:  # mmap: only what is read of the weights comes off the disk
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise WarmStartError(f"--init-from {path}: not a readable model file: {exc}") from exc
    if not isinstance(payload, dict) or not {"model", "config"} <= set(payload):
        raise WarmStartError(f"--init-from {path}: not an elcrec-dist model file")
    return Source(path, dict(payload["model"]), dict(payload["config"]))


def check_model(source: Source, config: ExperimentConfig, num_items: int) -> None:
    """The source's weights fit ``config``'s model (every tensor but the item table's rows)."""
    recorded = source.config.get("model", {})
    wanted = config.model
    differ = [f"model.{key}: {recorded.get(key)!r} in {source.path}, {getattr(wanted, key)!r} now"
              for key in SHAPE_KEYS if recorded.get(key) != getattr(wanted, key)]
    if not differ:
        fresh = ELCRec(wanted, num_items=num_items).state_dict()
        for name, tensor in fresh.items():
            got = source.state.get(name)
            if got is None:
                differ.append(f"{name}: missing from {source.path}")
            elif name == TABLE:
                if got.dim() != 2 or got.shape[1] != tensor.shape[1]:
                    differ.append(f"{name}: {tuple(got.shape)}, rows of {tensor.shape[1]} wanted")
            elif got.shape != tensor.shape:
                differ.append(f"{name}: {tuple(got.shape)} in the file, {tuple(tensor.shape)} now")
    if differ:
        raise WarmStartError(
            "--init-from: the earlier model does not fit this config (" + "; ".join(differ) + "). "
            "A warm start carries the encoder and the centres over: their shapes must match; "
            "start afresh (no --init-from) to change them"
        )


def item_originals(url: str, info: DatasetInfo, *, role: str) -> pa.Array:
    """Original ids of items 1..N of the build at ``url`` (its ``item_map.parquet``)."""
    if not dict(info.extra).get("item_map_file"):
        raise WarmStartError(
            f"--init-from: {role} {url} has no id maps (its manifest names no item_map_file): "
            "a warm start matches items by their original ids, so both builds must come from "
            "`python -m data_prep.build`"
        )
    return IdMaps.open(url, info).all_items()


def match_items(old: pa.Array, new: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the items both catalogues hold: (new positions [M], old positions [M]),
    0-based, in new-id order. Original ids must be of one kind (int or string)."""
    if old.type != new.type:
        raise WarmStartError(f"--init-from: original item ids are {old.type} in the earlier build "
                             f"and {new.type} in the new one; they cannot be matched")
    where = pc.index_in(new, value_set=old)  # [N_new], null for items the earlier build lacks
    found = where.is_valid().to_numpy(zero_copy_only=False)
    new_pos = np.flatnonzero(found)
    old_pos = where.drop_null().to_numpy().astype(np.int64)
    return new_pos, old_pos


def plan_warm_start(
    config: ExperimentConfig, info: DatasetInfo, url: str
) -> tuple[Source, ItemMatch]:
    """Everything a warm start needs, checked: the source model, and which items carry over.
    Raises ``WarmStartError`` (exit 2) for a model that does not fit or builds without id maps."""
    source = read_source(config.train.init_from)
    check_model(source, config, info.num_items)
    old_url = str(source.config.get("data", {}).get("path") or "")
    if not old_url:
        raise WarmStartError(f"--init-from {source.path}: its config names no dataset (data.path)")
    try:
        old_info = read_info(old_url)
    except DatasetError as exc:
        raise WarmStartError(f"--init-from {source.path}: its dataset {old_url} cannot be read "
                             f"(its id map is needed to match items): {exc}") from exc
    old_rows = source.state[TABLE].shape[0] - 1
    if old_info.num_items != old_rows:
        raise WarmStartError(f"--init-from {source.path}: {old_rows} items in the model, "
                             f"{old_info.num_items} in its dataset {old_url}")
    old = item_originals(old_url, old_info, role="the earlier run's dataset")
    new = item_originals(url, info, role="the new build")
    new_pos, old_pos = match_items(old, new)
    return source, ItemMatch(new_pos + 1, old_pos + 1, info.num_items, old_info.num_items)


def check_init_from(config: ExperimentConfig, info: DatasetInfo, url: str) -> None:
    """``plan_warm_start``'s checks alone, for the entry point to run before anything is written
    (a no-op without ``train.init_from``)."""
    if config.train.init_from:
        plan_warm_start(config, info, url)


@torch.no_grad()
def warm_start(
    model: ELCRec, config: ExperimentConfig, info: DatasetInfo, url: str
) -> dict[str, float]:
    """Write the earlier run's weights into the freshly initialised ``model`` (its item table
    [N_new + 1, D]): matched items' rows, the padding row and every other tensor exactly; new
    items keep their fresh rows. Every rank does the same. Returns what to log."""
    source, match = plan_warm_start(config, info, url)
    table = model.item_embeddings.weight
    old_table = source.state[TABLE]
    rows = old_table.index_select(0, torch.from_numpy(match.old_ids))
    table.index_copy_(0, torch.from_numpy(match.new_ids).to(table.device), rows.to(table))
    table[0] = old_table[0].to(table)
    rest = {name: tensor for name, tensor in source.state.items() if name != TABLE}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if missing != [TABLE] or unexpected:  # check_model saw every tensor; never expected here
        raise WarmStartError(
            f"--init-from {source.path}: tensors missing {missing}, unexpected {unexpected}"
        )
    return match.figures()
