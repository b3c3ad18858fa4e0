"""Import a published ELCRec checkpoint (the official code's plain state_dict) into our model.

Key layout of the published files (spec: "The reference checkpoint"): ``item_embeddings.weight``
[N + 2, D] (padding 0, items 1..N, one unused extra id), ``position_embeddings.weight`` [T, D],
``cluster_centers`` [k, D], top-level ``LayerNorm.*`` and per layer
``item_encoder.layer.{i}.attention.{query,key,value,dense,LayerNorm}.*`` and
``item_encoder.layer.{i}.intermediate.{dense_1,dense_2,LayerNorm}.*``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from elcrec_dist.errors import PermanentError
from elcrec_dist.model import ELCRec


class ReferenceError(PermanentError, ValueError):
    """A published checkpoint does not fit the configured model. Permanent."""


_LAYER = re.compile(r"^item_encoder\.layer\.(\d+)\.(.+)$")
_LAYER_PARTS = {
    "attention.query": "attention.query",
    "attention.key": "attention.key",
    "attention.value": "attention.value",
    "attention.dense": "attention.dense",
    "attention.LayerNorm": "attention.layer_norm",
    "intermediate.dense_1": "feed_forward.dense_1",
    "intermediate.dense_2": "feed_forward.dense_2",
    "intermediate.LayerNorm": "feed_forward.layer_norm",
}


def map_reference_key(key: str) -> str | None:
    """Our parameter name for a published key; None for keys we do not know."""
    if key in ("item_embeddings.weight", "position_embeddings.weight", "cluster_centers"):
        return key
    if key.startswith("LayerNorm."):
        return "layer_norm." + key.split(".", 1)[1]
    match = _LAYER.match(key)
    if match:
        index, rest = match.groups()
        for theirs, ours in _LAYER_PARTS.items():
            if rest.startswith(theirs + "."):
                return f"blocks.{index}.{ours}.{rest[len(theirs) + 1:]}"
    return None


def convert_reference_state(
    published: dict[str, torch.Tensor], model: ELCRec
) -> dict[str, torch.Tensor]:
    """Map and shape-check a published state dict onto ``model``'s parameter names.

    The published item table has one extra trailing row (an id the reference reserves); it is
    dropped after checking the table has exactly N + 2 rows. Every mismatch is reported at once.
    """
    ours = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    named: set[str] = set()
    for key, tensor in published.items():
        name = map_reference_key(key)
        if name is None:
            problems.append(f"unknown key {key!r}")
            continue
        named.add(name)
        if name not in ours:
            problems.append(
                f"{key} has no counterpart: the config builds {model.config.num_layers} layer(s)"
            )
            continue
        if name == "item_embeddings.weight":
            expected_rows = model.num_items + 2
            if tensor.shape[0] != expected_rows or tensor.shape[1:] != ours[name].shape[1:]:
                problems.append(
                    f"{key} is {list(tensor.shape)}; the dataset has {model.num_items} items, so "
                    f"[{expected_rows}, {ours[name].shape[1]}] (padding + items + 1 reserved) "
                    "was expected"
                )
                continue
            tensor = tensor[: model.num_items + 1]
        elif tensor.shape != ours[name].shape:
            hint = " (model.num_clusters)" if name == "cluster_centers" else ""
            problems.append(
                f"{key} is {list(tensor.shape)}, the config expects {list(ours[name].shape)}{hint}"
            )
            continue
        converted[name] = tensor.to(ours[name].dtype)
    missing = sorted(set(ours) - named)
    if missing:
        problems.append(
            f"checkpoint lacks {', '.join(missing)} (does the config have more layers?)"
        )
    if problems:
        raise ReferenceError("published checkpoint does not fit the config: " + "; ".join(problems))
    return converted


def load_reference(path: str | Path, model: ELCRec) -> None:
    """Load a published checkpoint into ``model`` in place (``weights_only=True``)."""
    try:
        published = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ReferenceError(f"{path}: no such file") from None
    except Exception as exc:  # unpickling errors have many types; all mean "not a state dict"
        raise ReferenceError(f"{path}: cannot be read as a weights-only checkpoint: {exc}") from exc
    if not isinstance(published, dict) or not all(
        isinstance(v, torch.Tensor) for v in published.values()
    ):
        raise ReferenceError(f"{path}: expected a plain state_dict of tensors")
    model.load_state_dict(convert_reference_state(published, model), strict=True)
