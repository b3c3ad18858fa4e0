"""Write a validated user table as a prepared dataset: shards first, manifest last."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from elcrec_dist.errors import PermanentError
from elcrec_dist.prepared import (
    ARROW_SCHEMA,
    MANIFEST_NAME,
    _fs_and_root,
    build_manifest,
    commit_manifest,
    write_table,
)


class PrepError(PermanentError, ValueError):
    """Bad input to a data-preparation job. Permanent: retrying will not help."""


def shard_of(user_ids: np.ndarray, shards: int) -> np.ndarray:
    """Stable hash of int64 user ids to shards (splitmix64 finaliser), [U] -> [U]."""
    x = user_ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(shards)).astype(np.int64)


def shard_name(index: int, shards: int) -> str:
    return f"part-{index:05d}-of-{shards:05d}.parquet"


def write_prepared_dataset(
    url: str,
    table: pa.Table,
    *,
    num_items: int,
    shards: int = 1,
    compression: str = "zstd",
    extra: dict[str, Any] | None = None,
    before_commit: Callable[[fsspec.AbstractFileSystem, str], None] | None = None,
) -> dict[str, Any]:
    """Write ``table`` (user_id, items) as ``shards`` Parquet files and commit the manifest.

    Refuses to overwrite an existing dataset (one with a manifest): nothing already written is
    lost. Stale shards of an earlier, unfinished write are replaced.

    ``before_commit(fs, root)``, if given, runs after the shards are written and before the
    manifest is committed: the place to write sidecar files (e.g. ``planted_intents.parquet``)
    so that a reader who sees the manifest also sees them.
    """
    if shards < 1:
        raise PrepError(f"--shards must be >= 1, got {shards}")
    table = table.cast(ARROW_SCHEMA)
    fs, root = _fs_and_root(url)
    if fs.exists(posixpath.join(root, MANIFEST_NAME)):
        raise PrepError(
            f"{url} already holds a prepared dataset ({MANIFEST_NAME}); "
            "remove it or choose another --output"
        )
    fs.makedirs(root, exist_ok=True)
    for stale in fs.glob(posixpath.join(root, "part-*.parquet")):
        fs.rm(stale)

    user_ids = table.column("user_id").to_numpy()
    assignment = shard_of(user_ids, shards)
    names = []
    for index in range(shards):
        rows = np.flatnonzero(assignment == index)
        name = shard_name(index, shards)
        write_table(
            fs, posixpath.join(root, name), table.take(pa.array(rows)), compression=compression
        )
        names.append(name)
    lengths = pc.list_value_length(table.column("items"))
    manifest = build_manifest(
        fs,
        root,
        names,
        num_users=table.num_rows,
        num_items=num_items,
        num_interactions=int(pc.sum(lengths).as_py() or 0),
        max_item_id=int(pc.max(pc.list_flatten(table.column("items"))).as_py() or 0),
        extra=extra,
    )
    if before_commit is not None:
        before_commit(fs, root)
    commit_manifest(fs, root, manifest)
    return manifest
