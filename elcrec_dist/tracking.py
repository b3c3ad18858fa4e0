"""What a run shows a person in TensorBoard beyond its scalars (issue 17, item 6): the resolved
config as text, hparams with the best validation metric (runs compare in the HParams tab), a
projector view of the item table and the intent centres labelled with original ids, and the
norms of the embeddings. Everything goes through ``RunLogger`` (the one logging interface);
this module only computes what to show.
"""

from __future__ import annotations

from typing import Any

import torch
import yaml

from elcrec_dist.idmaps import IdMaps
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import DatasetInfo
from elcrec_dist.runlog import RunLogger

PROJECTOR_ITEMS = 20000  # the projector stays responsive to tens of thousands of points


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, float | int | str | bool]:
    """The resolved config as TensorBoard hparams: ``section.key`` -> a scalar (lists as text)."""
    flat: dict[str, float | int | str | bool] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def config_text(config: dict[str, Any]) -> str:
    """The resolved config as Markdown (TensorBoard's text tab renders it)."""
    body = yaml.safe_dump(config, sort_keys=False)
    return "    " + body.rstrip("\n").replace("\n", "\n    ")  # an indented block: kept verbatim


def embedding_norms(model: ELCRec) -> dict[str, float]:
    """Mean L2 norm of the item rows (padding excluded) and of the centres."""
    with torch.no_grad():
        items = model.item_embeddings.weight[1:].float().norm(dim=1)
        centres = model.cluster_centers.float().norm(dim=1)
    return {"norms/item_embedding_mean": float(items.mean()),
            "norms/item_embedding_max": float(items.max()),
            "norms/centre_mean": float(centres.mean())}


def projector_points(model: ELCRec, idmaps: IdMaps, *, max_items: int = PROJECTOR_ITEMS
                     ) -> tuple[torch.Tensor, list[list[str]]]:
    """Items 1..min(N, max_items) and every centre as rows [n, D], with metadata rows
    (label, kind): items by original id, centres as ``intent c``."""
    count = min(model.num_items, max_items)
    items = model.item_embeddings.weight[1 : count + 1].detach().float().cpu()
    centres = model.cluster_centers.detach().float().cpu()
    labels = [
        [str(o), "item"] for o in idmaps.items(torch.arange(1, count + 1).numpy()).to_pylist()
    ]
    labels += [[f"intent {c}", "intent"] for c in range(centres.shape[0])]
    return torch.cat([items, centres]), labels


def record_run(run_log: RunLogger, config: dict[str, Any], summary: dict[str, Any], model: ELCRec,
               *, data_url: str, info: DatasetInfo, step: int) -> None:
    """At the end of a run (rank 0): config text, hparams with the best validation metric and
    the test metrics, the embedding norms, and the projector of items and centres."""
    run_log.text("config", config_text(config), step=step)
    metrics = {f"hparam/best_valid_{config['eval']['select_metric']}": summary["best_valid"]}
    metrics.update({f"hparam/test_{k}": v for k, v in summary["test"].items()})
    run_log.hparams(flat_hparams(config), metrics)
    run_log.log(embedding_norms(model), step=step)
    matrix, labels = projector_points(model, IdMaps.open(data_url, info))
    run_log.embedding(matrix, labels, header=["label", "kind"], tag="items_and_intents", step=step)
