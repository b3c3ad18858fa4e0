"""Batch inference: every user of a prepared dataset to a row of recommendations and vectors.

Per user (one Parquet row): the original user id, the top-K original item ids with their
scores (best first), the user vector (the prediction vector, ``E[:, -1]``) and the nearest
intent with its cosine. The ranking is evaluation's (``elcrec_dist.evaluation``): the catalogue
scored in item tiles with a running top-K, items of the input history excluded unless
``keep_history``, ties to the lower item id. The intent is the project's one assignment rule
(``clustering.nearest_centre``) applied as the intent-CL positives and the diagnostics apply
it: the L2-normalised mean-pooled embedding of the same input against the normalised centres,
so the nearest centre is the one of highest cosine.

What the input is:
- serving (``split=None``): the whole stored sequence, to recommend what comes next;
- ``split="valid"`` or ``"test"``: the split's input (``elcrec_dist.data``), the held-out item
  not shown, and excluded exactly as evaluation excludes: the history minus the held-out item
  (a repeated purchase stays rankable). HR@K and NDCG@K recomputed from these top-K lists equal
  ``launcher/evaluate.py``'s.

Sharding. Users are cut, in manifest order, into ``S = ceil(U / shard_users)`` output shards
(``stream.cut``, as if for S ranks), independent of the number of processes; process r of W
takes shards ``[r·S // W, (r+1)·S // W)`` and reads only their row groups. Each shard is scored
in the same batches whatever W is, so W processes write the bytes one process writes. Shards
are written as they finish; rank 0 writes the manifest last (``elcrec_dist.outputs``).
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from elcrec_dist import distributed as dist_utils
from elcrec_dist.clustering import nearest_centre
from elcrec_dist.config import ExperimentConfig
from elcrec_dist.data import HELD_OUT, Split, left_pad
from elcrec_dist.evaluation import top_k_items, user_vectors
from elcrec_dist.idmaps import IdMaps
from elcrec_dist.model import ELCRec
from elcrec_dist.outputs import FileRecord, OutputFolder, read_manifest
from elcrec_dist.prepared import DatasetError, DatasetInfo
from elcrec_dist.runlog import logger
from elcrec_dist.saved_model import SavedModel, build_model, read_saved_model, resolve_config
from elcrec_dist.saved_model import check_catalogue as saved_check_catalogue
from elcrec_dist.stream import StreamingDataset

FORMAT = "elcrec-recommendations"
FORMAT_VERSION = 1
DEFAULT_SHARD_USERS = 65536  # users per output file: a few tens of MB at K=20, D=64


# --- the trained model --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """A trained model with the resolved config it was trained with (read from the file)."""

    model: ELCRec
    config: ExperimentConfig
    path: str  # the model file (a local path or a URL)
    sha256: str
    meta: dict[str, Any]
    saved: SavedModel


def load_trained(run: str | Path) -> TrainedModel:
    """The model of a run folder (or model file, or committed checkpoint folder), local or in
    object storage, with its own stored config, in eval mode (``saved_model``).

    No ``--config`` is needed or taken: a config that does not fit the weights cannot be
    given by mistake. A file whose config or tensors do not fit each other is a
    ``CheckpointError`` naming the mismatch."""
    saved = read_saved_model(str(run))
    config = resolve_config(saved, files=None)
    return TrainedModel(build_model(saved, config).eval(), config, saved.source, saved.sha256,
                        saved.meta, saved)


def check_catalogue(trained: TrainedModel, info: DatasetInfo, *, data: str) -> None:
    """The dataset must be the one the model was trained for (``saved_model.check_catalogue``:
    its item count, and its fingerprint where the model recorded one)."""
    saved_check_catalogue(trained.saved, info, data)


# --- one batch ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    """One batch of users. items [B, K] int64 (0 where fewer than K candidates remain), scores
    [B, K] float32 (-inf there), vectors [B, D] float32, intents [B] int64, cosines [B] float32."""

    items: np.ndarray
    scores: np.ndarray
    vectors: np.ndarray
    intents: np.ndarray
    cosines: np.ndarray


def split_inputs(
    sequences: Sequence[np.ndarray], split: Split | None
) -> tuple[list[np.ndarray], torch.Tensor]:
    """Inputs (full sequences, or the split's input) and the items to exclude [B, L] (0 where
    empty): the input history, less the held-out item under a split (as evaluation does)."""
    if split is None:
        inputs = list(sequences)
        excluded = inputs
    else:
        cut = HELD_OUT[split]
        inputs = [seq[:-cut] for seq in sequences]
        excluded = [h[h != seq[-cut]] for h, seq in zip(inputs, sequences, strict=True)]
    width = max([len(e) for e in excluded] + [1])
    history = np.zeros((len(excluded), width), dtype=np.int64)
    for row, items in enumerate(excluded):
        history[row, : len(items)] = items
    return inputs, torch.from_numpy(history)


@torch.no_grad()
def infer_batch(
    model: ELCRec,
    sequences: Sequence[np.ndarray],
    *,
    k: int,
    keep_history: bool = False,
    split: Split | None = None,
    tile_items: int,
) -> BatchResult:
    """Top-``k``, user vectors and nearest intents of a batch of users (model in eval mode)."""
    inputs, history = split_inputs(sequences, split)
    padded = left_pad(inputs, model.config.max_len)
    users = user_vectors(model, padded)  # [B, D], the very vectors evaluation ranks with
    table = model.item_embeddings.weight
    top = top_k_items(users, table, history.to(users.device), k=k, keep_history=keep_history,
                      tile_items=tile_items)
    pooled = F.normalize(model.pooled(model(padded.to(users.device))).float(), dim=-1)  # [B, D]
    centres = F.normalize(model.cluster_centers.float(), dim=-1)  # [k, D]
    intents = nearest_centre(pooled, centres)
    cosines = (pooled * centres[intents]).sum(dim=-1)
    return BatchResult(
        items=top.items.cpu().numpy(),
        scores=top.scores.cpu().numpy(),
        vectors=users.float().cpu().numpy(),
        intents=intents.cpu().numpy(),
        cosines=cosines.cpu().numpy(),
    )


# --- rows and shards ----------------------------------------------------------------------------


def output_schema(idmaps: IdMaps, dim: int) -> pa.Schema:
    return pa.schema([
        ("user", idmaps.user_type),
        ("items", pa.list_(idmaps.item_type)),
        ("scores", pa.list_(pa.float32())),
        ("user_vector", pa.list_(pa.float32(), dim)),
        ("intent", pa.int32()),
        ("intent_cosine", pa.float32()),
    ])


def rows_table(result: BatchResult, users: pa.Array, idmaps: IdMaps, schema: pa.Schema) -> pa.Table:
    """A batch as output rows; entries with no candidate left (item 0) are dropped from the
    lists rather than written as a fake item."""
    found = result.items > 0  # [B, K]
    offsets = np.concatenate([[0], np.cumsum(found.sum(axis=1))]).astype(np.int32)
    items = idmaps.items(result.items[found])
    dim = result.vectors.shape[1]
    return pa.table(
        {
            "user": users,
            "items": pa.ListArray.from_arrays(pa.array(offsets), items),
            "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(result.scores[found])),
            "user_vector": pa.FixedSizeListArray.from_arrays(
                pa.array(result.vectors.reshape(-1).astype(np.float32)), dim),
            "intent": pa.array(result.intents.astype(np.int32)),
            "intent_cosine": pa.array(result.cosines.astype(np.float32)),
        },
        schema=schema,
    )


def shard_count(num_users: int, shard_users: int) -> int:
    if shard_users < 1:
        raise ValueError(f"shard_users must be >= 1, got {shard_users}")
    return max(1, math.ceil(num_users / shard_users))


def shard_name(shard: int, shards: int) -> str:
    return f"part-{shard:05d}-of-{shards:05d}.parquet"


def my_shards(shards: int, *, rank: int, world: int) -> range:
    """The contiguous shards of process ``rank`` of ``world`` (manifest order: a process reads
    the data files, and their user maps, one after the other)."""
    return range(rank * shards // world, (rank + 1) * shards // world)


@dataclass(frozen=True)
class InferenceSettings:
    k: int = 20
    keep_history: bool = False
    split: Split | None = None
    shard_users: int = DEFAULT_SHARD_USERS
    batch_size: int = 1024
    tile_items: int = 16384

    def request(self) -> dict[str, Any]:
        """What decides the output's bytes (batch size and tiles only decide how it is cut)."""
        return {"k": self.k, "keep_history": self.keep_history, "split": self.split,
                "shard_users": self.shard_users, "batch_size": self.batch_size}


@dataclass(frozen=True)
class InferenceStats:
    users: int
    seconds: float


def write_shard(
    trained: TrainedModel, data: StreamingDataset, idmaps: IdMaps, settings: InferenceSettings,
    *, shard: int, shards: int, out: OutputFolder,
) -> tuple[FileRecord, int]:
    """Score output shard ``shard`` of ``shards`` and write it; returns its record and users."""
    model = trained.model
    schema = output_schema(idmaps, model.config.hidden_size)
    files = sorted(
        {data.units[p.unit].file for p in data.eval_plan(rank=shard, world=shards).pieces}
    )
    tables = []
    for chunk in data.eval_sequences(rank=shard, world=shards, batch_size=settings.batch_size):
        result = infer_batch(
            model,
            chunk.sequences,
            k=settings.k,
            keep_history=settings.keep_history,
            split=settings.split,
            tile_items=settings.tile_items,
        )
        users = idmaps.users(chunk.user_ids, files)
        tables.append(rows_table(result, users, idmaps, schema))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=8192, store_schema=True)
    return out.put_bytes(shard_name(shard, shards), sink.getvalue()), table.num_rows


def run_inference(
    trained: TrainedModel, data: StreamingDataset, settings: InferenceSettings, out: OutputFolder,
) -> InferenceStats:
    """Every user of ``data`` through ``trained``, this process's shards; collective. The
    caller has claimed ``out`` (every rank agrees it is to be written)."""
    check_catalogue(trained, data.info, data=data.url)
    idmaps = IdMaps.open(data.url, data.info)
    if not 1 <= settings.k <= data.info.num_items:
        raise DatasetError(f"k={settings.k} must be in 1..{data.info.num_items} (the catalogue)")
    rank, world = dist_utils.rank(), dist_utils.world_size()
    shards = shard_count(data.info.num_users, settings.shard_users)
    if dist_utils.is_main():
        out.begin()
    dist_utils.barrier()
    started = time.perf_counter()
    mine: list[dict[str, Any]] = []
    users = 0
    for shard in my_shards(shards, rank=rank, world=world):
        record, rows = write_shard(
            trained, data, idmaps, settings, shard=shard, shards=shards, out=out
        )
        mine.append({**record.to_dict(), "rows": rows})
        users += rows
        logger.info("shard %d of %d: %d users", shard + 1, shards, rows)
    seconds = time.perf_counter() - started
    records = [r for src in range(world) for r in dist_utils.broadcast_object(mine, src=src)]
    total = sum(r["rows"] for r in records)
    slowest = max(dist_utils.broadcast_object(seconds, src=src) for src in range(world))
    if dist_utils.is_main():
        if total != data.info.num_users:
            raise DatasetError(
                f"{data.url}: scored {total} users, the manifest lists {data.info.num_users}"
            )
        out.commit(
            [FileRecord(r["path"], r["bytes"], r["sha256"]) for r in records],
            {
                "format_version": FORMAT_VERSION,
                "num_users": total,
                "shards": [{"path": r["path"], "rows": r["rows"]} for r in records],
                "model": {"path": str(trained.path), "sha256": trained.sha256},
                "dataset": {"url": data.url, **data.info.fingerprint()},
                "columns": {f.name: str(f.type)
                            for f in output_schema(idmaps, trained.model.config.hidden_size)},
            },
        )
    dist_utils.barrier()
    return InferenceStats(users=total, seconds=slowest)


def inference_request(
    trained: TrainedModel, info: DatasetInfo, settings: InferenceSettings
) -> dict[str, Any]:
    """What an output folder records as its request: the model, the dataset, the settings."""
    return {"model_sha256": trained.sha256, "dataset": info.fingerprint(), **settings.request()}


def read_recommendations(url: str, *, verify: bool = True) -> pa.Table:
    """Every row of a committed inference output (the files its manifest lists, in shard order,
    each checked against its size and, if ``verify``, sha256)."""
    manifest = read_manifest(url, kind=FORMAT)
    fs, root = fsspec.core.url_to_fs(url)
    tables = []
    for entry in manifest["shards"]:
        record = next(f for f in manifest["files"] if f["path"] == entry["path"])
        with fs.open(posixpath.join(root.rstrip("/"), entry["path"]), "rb") as handle:
            data = handle.read()
        if len(data) != record["bytes"] or (
            verify and hashlib.sha256(data).hexdigest() != record["sha256"]
        ):
            raise DatasetError(f"{url}/{entry['path']}: differs from the manifest")
        tables.append(pq.read_table(pa.BufferReader(data)))
    return pa.concat_tables(tables)
