"""A prepared dataset's id maps: contiguous ids back to the original ids of the raw logs.

A raw-log build (``data_prep.build``) writes ``item_map.parquet`` (``item`` original id,
``item_id`` 1..N, by item_id) and one ``user_map/part-*.parquet`` per shard (``user`` original
id, ``user_id``), and names them in the manifest's ``extra`` with the item map's sha256. A
benchmark import or a synthetic set has no maps: their ids are the original ids already, and
the maps are the identity. Original ids are int64 or strings, as the logs had them.

Memory: the item map is one array of N originals (it grows with the catalogue, like the item
table); user maps are read one data file at a time, for the users being processed.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from elcrec_dist.prepared import DatasetError, DatasetInfo, _fs_and_root


class IdMaps:
    """Original ids of items and users of one prepared dataset (``IdMaps.open``)."""

    def __init__(
        self,
        url: str,
        info: DatasetInfo,
        *,
        item_originals: pa.Array | None,
        user_map_files: Sequence[str],
    ) -> None:
        self.url = url
        self.info = info
        self._items = item_originals  # [N] originals of item ids 1..N; None: identity
        self._user_files = list(user_map_files)
        self._fs, self._root = _fs_and_root(url)
        self._cache: dict[str, tuple[np.ndarray, pa.Array]] = {}

    @classmethod
    def open(cls, url: str, info: DatasetInfo) -> IdMaps:
        """Read the item map (checked against the manifest's sha256 and the catalogue) and list
        the user maps. ``DatasetError`` when a named map is missing, changed or malformed."""
        extra = dict(info.extra)
        fs, root = _fs_and_root(url)
        items: pa.Array | None = None
        name = extra.get("item_map_file")
        if name:
            path = posixpath.join(root, name)
            data = _read_bytes(fs, path, url, name)
            if (
                extra.get("item_map_sha256")
                and hashlib.sha256(data).hexdigest() != extra["item_map_sha256"]
            ):
                raise DatasetError(
                    f"{path}: sha256 differs from the manifest (file changed or corrupt)"
                )
            table = pq.read_table(pa.BufferReader(data))
            if not {"item", "item_id"} <= set(table.column_names):
                raise DatasetError(
                    f"{path}: columns {table.column_names}, expected item and item_id"
                )
            ids = table.column("item_id").to_numpy()
            if len(ids) != info.num_items or not np.array_equal(
                ids, np.arange(1, info.num_items + 1)
            ):
                raise DatasetError(
                    f"{path}: item ids are not 1..{info.num_items} in order "
                    "(the manifest's catalogue)"
                )
            items = table.column("item").combine_chunks()
        return cls(
            url, info, item_originals=items, user_map_files=extra.get("user_map_files") or []
        )

    @property
    def item_type(self) -> pa.DataType:
        return pa.int64() if self._items is None else self._items.type

    @property
    def user_type(self) -> pa.DataType:
        if not self._user_files:
            return pa.int64()
        schema = pq.read_schema(
            self._fs.open(posixpath.join(self._root, self._user_files[0]), "rb")
        )
        return schema.field("user").type

    def items(self, item_ids: np.ndarray) -> pa.Array:
        """Originals of item ids (any shape flattened, each in 1..N) -> [n] Arrow array."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 1 or ids.max() > self.info.num_items):
            raise ValueError(f"item ids outside 1..{self.info.num_items}")
        if self._items is None:
            return pa.array(ids, pa.int64())
        return self._items.take(pa.array(ids - 1))

    def all_items(self) -> pa.Array:
        """Originals of items 1..N in id order."""
        return self.items(np.arange(1, self.info.num_items + 1))

    def users(self, user_ids: np.ndarray, files: Sequence[int]) -> pa.Array:
        """Originals of ``user_ids`` [n], users of the data files ``files`` (manifest indices,
        the files their rows came from) -> [n]. A user id absent from those maps is an error."""
        ids = np.asarray(user_ids, dtype=np.int64)
        if not self._user_files:
            return pa.array(ids, pa.int64())
        parts = [self._user_map(f) for f in sorted(set(files))]
        keys = np.concatenate([p[0] for p in parts])
        originals = pa.concat_arrays([p[1] for p in parts])
        order = np.argsort(keys, kind="stable")
        pos = np.minimum(np.searchsorted(keys, ids, sorter=order), len(keys) - 1)
        found = order[pos]
        missing = keys[found] != ids
        if missing.any():
            raise DatasetError(f"{self.url}: user id {int(ids[missing][0])} is in no user map")
        return originals.take(pa.array(found))

    def _user_map(self, file: int) -> tuple[np.ndarray, pa.Array]:
        """(user ids, originals) of data file ``file``'s user map, the last two read kept."""
        if file >= len(self._user_files):
            raise DatasetError(f"{self.url}: the manifest names no user map for data file {file}")
        name = self._user_files[file]
        if name not in self._cache:
            path = posixpath.join(self._root, name)
            table = pq.read_table(pa.BufferReader(_read_bytes(self._fs, path, self.url, name)))
            if not {"user", "user_id"} <= set(table.column_names):
                raise DatasetError(
                    f"{path}: columns {table.column_names}, expected user and user_id"
                )
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = (
                table.column("user_id").to_numpy().astype(np.int64),
                pc.cast(table.column("user"), table.schema.field("user").type).combine_chunks(),
            )
        return self._cache[name]


def _read_bytes(fs: fsspec.AbstractFileSystem, path: str, url: str, name: str) -> bytes:
    if not fs.exists(path):
        raise DatasetError(f"{url}: manifest names {name}, which is missing")
    with fs.open(path, "rb") as handle:
        data: bytes = handle.read()
    return data
