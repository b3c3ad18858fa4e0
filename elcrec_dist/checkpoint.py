"""Model checkpoints written atomically (temporary file, then rename).

A file either exists whole or not at all; loading uses ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing or does not fit. Permanent."""


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
