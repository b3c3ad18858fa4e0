"""Export a trained model for serving: weights, tables and two graphs in forms servers load.

One output folder (``elcrec_dist.outputs``, manifest last), every file loadable without
pickle:

| file | what |
|---|---|
| ``model.safetensors`` | every weight, named like ``ELCRec.state_dict()`` |
| ``manifest.json`` | format and version, the resolved config, the catalogue, the graphs' inputs
  and outputs, the checks below, every file with its sha256 |
| ``items.parquet`` | the item table: ``item`` (original id), ``item_id``, ``vector`` [D] (what an
  ANN index or a vector database ingests) |
| ``intents.parquet`` | the intent centres: ``intent``, ``vector`` [D] (raw; intents compare by
  cosine) |
| ``user_encoder.onnx`` / ``.pt2`` | item-id history ``items`` [B, T] int64 (left-padded with 0,
  newest last) -> ``user_vector`` [B, D] float32 |
| ``topk_scorer.onnx`` / ``.pt2`` | ``user_vector`` [B, D], ``exclude`` [B, L] int64 item ids (0:
  none) -> ``items`` [B, K] int64, ``scores`` [B, K] float32 |

ONNX runs in ONNX Runtime (and Triton's ONNX backend); ``.pt2`` is ``torch.export``'s archive
(``torch.export.load``), saved without its example inputs, so that it holds JSON and raw tensor
bytes only. The graphs speak contiguous item ids; ``items.parquet`` maps them to original ids.
The scorer ranks as ``elcrec_dist.evaluation`` does (padding never, excluded ids never, best
first) on a dense [B, N + 1] product: a serving batch is small; the tiled running top-K is for
the batch jobs over the whole catalogue.

Each graph is checked against the PyTorch model when exported, on a seeded probe batch of
random histories; the largest differences go into the manifest (``checks``).
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from elcrec_dist.config import ExperimentConfig, config_from_dict
from elcrec_dist.idmaps import IdMaps
from elcrec_dist.inference import TrainedModel
from elcrec_dist.model import ELCRec
from elcrec_dist.outputs import FileRecord, OutputFolder, read_manifest

FORMAT = "elcrec-export"
FORMAT_VERSION = 1
PROBE_USERS = 64


class UserEncoder(nn.Module):
    """items [B, T] int64 (left-padded) -> the prediction vector [B, D] (eval mode)."""

    def __init__(self, model: ELCRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.model.user_vector(self.model(items, last_only=True))


class TopKScorer(nn.Module):
    """user_vector [B, D], exclude [B, L] int64 -> (items [B, K] int64, scores [B, K]).

    Padding (column 0) and the excluded ids score -inf, so they come last; a user who excludes
    all but fewer than K items gets -inf scores at the tail."""

    def __init__(self, table: torch.Tensor, k: int) -> None:
        super().__init__()
        self.table: torch.Tensor
        self.register_buffer("table", table.detach().clone())
        self.k = k

    def forward(
        self, user_vector: torch.Tensor, exclude: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = user_vector @ self.table.T  # [B, N + 1]
        minus_inf = torch.full_like(exclude, 0, dtype=scores.dtype) - torch.inf  # [B, L]
        scores = scores.scatter(1, exclude, minus_inf)
        scores = torch.cat([torch.full_like(scores[:, :1], -torch.inf), scores[:, 1:]], dim=1)
        values, items = torch.topk(scores, self.k, dim=1)
        return items, values


@dataclass(frozen=True)
class Graph:
    """One exported graph: its inputs and outputs (names in order) and dynamic axes."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]


def graphs(model: ELCRec, k: int) -> list[Graph]:
    return [
        Graph("user_encoder", UserEncoder(model).eval(), ("items",), ("user_vector",),
              {"items": {0: "batch"}}),
        Graph("topk_scorer", TopKScorer(model.item_embeddings.weight, k).eval(),
              ("user_vector", "exclude"), ("items", "scores"),
              {"user_vector": {0: "batch"}, "exclude": {0: "batch", 1: "history"}}),
    ]


def probe_inputs(
    model: ELCRec, *, users: int = PROBE_USERS, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A seeded batch of random histories of every length 1..T, and items to exclude."""
    gen = torch.Generator().manual_seed(seed)
    t, n = model.config.max_len, model.num_items
    items = torch.randint(1, n + 1, (users, t), generator=gen)
    lengths = torch.arange(users) % t + 1
    items = torch.where(torch.arange(t)[None, :] >= t - lengths[:, None], items, 0)
    with torch.no_grad():
        vectors = UserEncoder(model)(items)
    return {"items": items, "user_vector": vectors, "exclude": items}


def _example(graph: Graph, probe: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(probe[name] for name in graph.inputs)


def _dims(graph: Graph) -> dict[str, dict[int, Any]]:
    names: dict[str, Any] = {}
    return {
        name: {axis: names.setdefault(label, torch.export.Dim(label, min=1))
               for axis, label in axes.items()}
        for name, axes in graph.dynamic.items()
    }


def onnx_bytes(graph: Graph, probe: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{graph.name}.onnx"
        torch.onnx.export(graph.module, _example(graph, probe), str(path), dynamo=True,
                          input_names=list(graph.inputs), output_names=list(graph.outputs),
                          dynamic_shapes=_dims(graph), verbose=False,
                          external_data=False)
        return path.read_bytes()


def program_bytes(graph: Graph, probe: dict[str, torch.Tensor]) -> bytes:
    program = torch.export.export(graph.module, _example(graph, probe), dynamic_shapes=_dims(graph))
    program.example_inputs = None  # else saved with torch.save (pickle) inside the archive
    sink = io.BytesIO()
    torch.export.save(program, sink)
    return sink.getvalue()


# --- running an export --------------------------------------------------------------------------

Runner = Callable[..., tuple[np.ndarray, ...]]


def onnx_runner(data: bytes) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(session.run(None, dict(zip(names, args, strict=True))))

    return run


def program_runner(data: bytes) -> Runner:
    module = torch.export.load(io.BytesIO(data)).module()

    def run(*args: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(a) for a in args))
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.numpy() for o in out)

    return run


RUNNERS: dict[str, Callable[[bytes], Runner]] = {"onnx": onnx_runner, "pt2": program_runner}


def compare(graph: Graph, runner: Runner, probe: dict[str, torch.Tensor]) -> dict[str, float]:
    """An export against the PyTorch module on the probe: the largest absolute difference of
    each float output and the share of users whose top-K item lists are identical."""
    args = _example(graph, probe)
    with torch.no_grad():
        expected = graph.module(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = runner(*(a.numpy() for a in args))
    out: dict[str, float] = {}
    for name, want, have in zip(graph.outputs, expected, got, strict=True):
        want_np = want.numpy()
        if want_np.dtype.kind == "f":
            finite = np.isfinite(want_np)
            out[f"{name}_max_abs_diff"] = float(np.abs(want_np[finite] - have[finite]).max())
        else:
            out[f"{name}_identical_rows"] = float(np.mean(np.all(want_np == have, axis=1)))
    return out


# --- the export folder --------------------------------------------------------------------------


def _vectors(matrix: torch.Tensor) -> pa.FixedSizeListArray:
    values = matrix.detach().float().cpu().numpy()
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", store_schema=True)
    return sink.getvalue()


def export_request(
    trained: TrainedModel, info_fingerprint: dict[str, Any], k: int
) -> dict[str, Any]:
    return {"model_sha256": trained.sha256, "dataset": info_fingerprint, "k": k}


def write_export(
    trained: TrainedModel, idmaps: IdMaps, out: OutputFolder, *, k: int
) -> dict[str, Any]:
    """Write every file of the export (``out`` claimed by the caller), then the manifest."""
    from safetensors.torch import save as safetensors_bytes

    model = trained.model.cpu().eval()
    if not 1 <= k <= model.num_items:
        raise ValueError(f"k={k} must be in 1..{model.num_items} (the catalogue)")
    out.begin()
    files: list[FileRecord] = []
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    files.append(out.put_bytes("model.safetensors", safetensors_bytes(state)))
    table = model.item_embeddings.weight[1:]
    files.append(out.put_bytes("items.parquet", _parquet(pa.table({
        "item": idmaps.all_items(),
        "item_id": pa.array(np.arange(1, model.num_items + 1), pa.int64()),
        "vector": _vectors(table),
    }))))
    centres = model.cluster_centers
    files.append(out.put_bytes("intents.parquet", _parquet(pa.table({
        "intent": pa.array(np.arange(centres.shape[0]), pa.int32()),
        "vector": _vectors(centres),
    }))))
    probe = probe_inputs(model)
    checks: dict[str, dict[str, float]] = {}
    described = {}
    for graph in graphs(model, k):
        for kind, make in (("onnx", onnx_bytes), ("pt2", program_bytes)):
            data = make(graph, probe)
            name = f"{graph.name}.{kind}"
            files.append(out.put_bytes(name, data))
            checks[name] = compare(graph, RUNNERS[kind](data), probe)
        described[graph.name] = {"inputs": list(graph.inputs), "outputs": list(graph.outputs),
                                 "dynamic_axes": graph.dynamic}
    body = {
        "format_version": FORMAT_VERSION,
        "config": trained.config.to_dict(),
        "num_items": model.num_items,
        "hidden_size": model.config.hidden_size,
        "max_len": model.config.max_len,
        "num_intents": int(centres.shape[0]),
        "k": k,
        "graphs": described,
        "checks": checks,
        "model": {"path": str(trained.path), "sha256": trained.sha256},
    }
    return out.commit(files, body)


@dataclass(frozen=True)
class Export:
    """A committed export folder, read without pickle."""

    url: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, url: str) -> Export:
        manifest = read_manifest(url, kind=FORMAT)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{url}: export format_version {manifest.get('format_version')!r}, "
                             f"this version reads {FORMAT_VERSION}")
        return cls(url, manifest)

    def read(self, name: str) -> bytes:
        import hashlib

        import fsspec

        record = next((f for f in self.manifest["files"] if f["path"] == name), None)
        if record is None:
            raise FileNotFoundError(f"{self.url}: the export lists no {name}")
        with fsspec.open(f"{self.url.rstrip('/')}/{name}", "rb") as handle:
            data: bytes = handle.read()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ValueError(f"{self.url}/{name}: sha256 differs from the manifest")
        return data

    @property
    def config(self) -> ExperimentConfig:
        return config_from_dict(json.loads(json.dumps(self.manifest["config"])))

    def model(self) -> ELCRec:
        """The PyTorch model from ``model.safetensors`` and the manifest's config (eval mode)."""
        from safetensors.torch import load as safetensors_load

        model = ELCRec(self.config.model, num_items=int(self.manifest["num_items"]))
        model.load_state_dict(safetensors_load(self.read("model.safetensors")))
        return model.eval()

    def runner(self, name: str) -> Runner:
        """``user_encoder.onnx`` etc. as a function of numpy arrays."""
        kind = name.rsplit(".", 1)[-1]
        return RUNNERS[kind](self.read(name))
