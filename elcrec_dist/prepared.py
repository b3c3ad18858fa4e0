"""The prepared-dataset format: user-sharded Parquet files plus ``manifest.json``.

One row per user: ``user_id`` (int64) and ``items`` (list<int32>, the full time-ordered item
sequence; item ids are contiguous 1..N, 0 is padding). Splits are derived at read time
(``elcrec_dist.data``). The manifest is written last and lists every file with its row count,
size and sha256; a folder without a manifest is not a dataset.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from elcrec_dist.errors import PermanentError
from elcrec_dist.rundir import filesystem

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "elcrec-prepared"
ARROW_SCHEMA = pa.schema([("user_id", pa.int64()), ("items", pa.list_(pa.int32()))])
# Users per Parquet row group. Row groups are the work units of the streaming reader
# (``elcrec_dist.stream``): small enough that a rank's shuffle window and read-ahead stay a few
# MB and that the epoch permutation mixes users across ranks, large enough that one read is one
# sizeable object-store request.
ROW_GROUP_SIZE = 4096


class DatasetError(PermanentError, ValueError):
    """A prepared dataset is missing, incomplete or inconsistent. Permanent."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the dataset folder
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetInfo:
    """Immutable facts about a prepared dataset, read from its manifest."""

    num_users: int
    num_items: int  # item ids are 1..num_items; the item table has num_items + 1 rows
    num_interactions: int
    max_item_id: int
    files: tuple[FileEntry, ...]
    schema_version: int = SCHEMA_VERSION
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def padding_id(self) -> int:
        return 0

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this dataset wherever it is stored: its counts and the digest of its
        files (names, in order, and their sha256 from the manifest; nothing is read). A rebuilt or
        re-sharded dataset gets another one; a copy moved to another place keeps it."""
        listing = "\n".join(f"{entry.path} {entry.sha256}" for entry in self.files)
        return {
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_interactions": self.num_interactions,
            "files_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        }


def _fs_and_root(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The dataset's filesystem, with the project's storage policy (retries and timeouts on
    every read; ``elcrec_dist.rundir``), and its root path."""
    fs, root = filesystem(url)
    return fs, root.rstrip("/")


def sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_table(
    fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, *, compression: str = "zstd"
) -> None:
    """Write one Parquet file deterministically (same table -> same bytes)."""
    table = table.cast(ARROW_SCHEMA)
    with fs.open(path, "wb") as handle:
        pq.write_table(
            table,
            handle,
            compression=compression,
            row_group_size=ROW_GROUP_SIZE,
            write_statistics=True,
            store_schema=True,
        )


def build_manifest(
    fs: fsspec.AbstractFileSystem,
    root: str,
    relative_paths: Sequence[str],
    *,
    num_users: int,
    num_items: int,
    num_interactions: int,
    max_item_id: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    files = []
    for rel in relative_paths:
        full = posixpath.join(root, rel)
        meta = pq.ParquetFile(fs.open(full, "rb")).metadata
        files.append(
            {
                "path": rel,
                "rows": int(meta.num_rows),
                "bytes": int(fs.size(full)),
                "sha256": sha256_of(fs, full),
            }
        )
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "num_users": int(num_users),
        "num_items": int(num_items),
        "num_interactions": int(num_interactions),
        "max_item_id": int(max_item_id),
        "columns": {"user_id": "int64", "items": "list<int32>"},
        "files": files,
    }
    if extra:
        manifest["extra"] = extra
    return manifest


def commit_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any]) -> None:
    """Write the manifest last: until it exists, readers refuse the folder."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    final = posixpath.join(root, MANIFEST_NAME)
    tmp = final + ".tmp"
    with fs.open(tmp, "w") as handle:
        handle.write(text)
    fs.mv(tmp, final)


def read_info(url: str) -> DatasetInfo:
    """Read and check ``manifest.json`` of the prepared dataset at ``url``."""
    fs, root = _fs_and_root(url)
    path = posixpath.join(root, MANIFEST_NAME)
    if not fs.exists(path):
        raise DatasetError(
            f"{url}: no {MANIFEST_NAME}; not a prepared dataset (or one whose writing did not "
            "finish). Prepare it with `python -m data_prep.benchmark` or "
            "`python -m data_prep.synthetic`."
        )
    try:
        with fs.open(path, "r") as handle:
            manifest = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: manifest is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(
            f"{path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: schema_version {manifest.get('schema_version')!r} is not supported "
            f"(this version reads {SCHEMA_VERSION})"
        )
    try:
        files = tuple(FileEntry(**entry) for entry in manifest["files"])
        info = DatasetInfo(
            num_users=int(manifest["num_users"]),
            num_items=int(manifest["num_items"]),
            num_interactions=int(manifest["num_interactions"]),
            max_item_id=int(manifest["max_item_id"]),
            files=files,
            extra=tuple(sorted((manifest.get("extra") or {}).items())),
        )
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: manifest lacks or mangles a field: {exc}") from exc
    if sum(f.rows for f in files) != info.num_users:
        raise DatasetError(f"{path}: file row counts do not add up to num_users={info.num_users}")
    return info


def iter_tables(url: str, info: DatasetInfo, *, verify: bool = True) -> Iterator[pa.Table]:
    """Yield each listed file as an Arrow table, checking size, rows (and sha256 if ``verify``)."""
    fs, root = _fs_and_root(url)
    for entry in info.files:
        full = posixpath.join(root, entry.path)
        if not fs.exists(full):
            raise DatasetError(f"{url}: manifest lists {entry.path}, which is missing")
        size = fs.size(full)
        if size != entry.bytes:
            raise DatasetError(f"{full}: {size} bytes, manifest says {entry.bytes}")
        if verify and sha256_of(fs, full) != entry.sha256:
            raise DatasetError(
                f"{full}: sha256 differs from the manifest (file changed or corrupt)"
            )
        with fs.open(full, "rb") as handle:
            table = pq.read_table(handle)
        if table.num_rows != entry.rows:
            raise DatasetError(f"{full}: {table.num_rows} rows, manifest says {entry.rows}")
        yield table


def load_sequences(
    url: str, *, verify: bool = True
) -> tuple[DatasetInfo, np.ndarray, list[np.ndarray]]:
    """All users of a prepared dataset in memory: (info, user ids [U], item sequences).

    Sequences are int64 arrays in time order. Users appear in file order, then row order.
    """
    info = read_info(url)
    user_ids: list[np.ndarray] = []
    sequences: list[np.ndarray] = []
    for table in iter_tables(url, info, verify=verify):
        user_ids.append(table.column("user_id").to_numpy())
        items = table.column("items").combine_chunks()
        offsets = items.offsets.to_numpy()
        values = items.values.to_numpy().astype(np.int64)
        sequences.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1))
    ids = np.concatenate(user_ids) if user_ids else np.zeros(0, dtype=np.int64)
    return info, ids, sequences
