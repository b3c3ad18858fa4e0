"""Id maps: the item table (every item in natural order), item ranks, and the written maps.

After the map stage, the distinct items of all workers form the *item table*: one row per
item in natural order of the original ids (``keys.natural_order``), so an item's position is
its *rank*. Reducers replace item keys by ranks; ties in time are broken by rank, which is the
order of the final ids (k-core only removes items, ``item_id = 1 + rank among survivors``).
The table holds one row per item, not per interaction (memory grows with the catalogue only).

Written maps: ``item_map.parquet`` (item original id -> item_id 1..N, by item_id) and
``user_map/part-*.parquet`` (user original id -> user_id, one file per shard, by user_id).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.build import layout
from data_prep.build.keys import merge_texts, natural_order, unique_keys
from data_prep.build.plan import Plan
from data_prep.build.store import Store
from data_prep.writer import PrepError


def map_markers(work: Store) -> list[dict[str, Any]]:
    """Done markers of one complete map run (the one with the fewest workers if several)."""
    groups: dict[int, dict[int, dict[str, Any]]] = {}
    for name in work.glob("map/*.done.json"):
        marker = work.read_json(name)
        groups.setdefault(int(marker["workers"]), {})[int(marker["worker"])] = marker
    complete = sorted(n for n, found in groups.items() if len(found) == n)
    if not complete:
        seen = (
            ", ".join(f"{len(found)} of {n} workers" for n, found in sorted(groups.items()))
            or "none"
        )
        raise PrepError(
            f"{work.show()}: the map stage has not finished (done: {seen}); run it first"
        )
    chosen = groups[complete[0]]
    return [chosen[w] for w in range(complete[0])]


def ensure_item_table(plan: Plan, work: Store, columns: list[str] | None = None) -> pa.Table:
    """The item table (key[, text]) in natural order, built once from the map outputs.

    Concurrent callers (several reducers) build identical bytes, so the last write wins safely.
    """
    if work.exists(layout.ITEMS_DONE):
        table = work.read_ipc(layout.ITEMS)
        return table.select(columns) if columns else table
    parts = []
    for marker in map_markers(work):
        folder = layout.map_dir(marker["worker"], marker["workers"])
        part = pl.from_arrow(work.read_ipc(folder, "items.arrow"))
        assert isinstance(part, pl.DataFrame)
        parts.append(part)
    if plan.kinds["item"] == "string":
        frame = unique_keys(merge_texts(parts, "item"), "item").select("key", "text")
        frame = frame[natural_order(frame["text"])]
    else:
        frame = (
            pl.concat(parts).unique().sort("key")
            if parts
            else pl.DataFrame(schema={"key": pl.Int64})
        )
    table = frame.to_arrow()
    work.write_ipc(table.combine_chunks().to_batches(), table.schema, layout.ITEMS)
    work.write_json({"items": table.num_rows}, layout.ITEMS_DONE)
    return table.select(columns) if columns else table


class KeyIndex:
    """int64 key -> its position in a key array: a hash table with linear probing, in numpy.

    Built once per worker (vectorized: each round every unplaced key claims its current slot,
    one claimant per free slot wins, the others move one slot on); looked up a bucket at a time
    (each round resolves every query whose slot holds its key or is empty). The table is at
    most a quarter full, so most queries take one round.
    """

    _GOLDEN = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, keys: np.ndarray) -> None:
        bits = max(4, (4 * max(len(keys), 1) - 1).bit_length())
        self.shift = np.uint64(64 - bits)
        self.mask = np.int64((1 << bits) - 1)
        self.keys = np.zeros(1 << bits, dtype=np.int64)
        self.positions = np.full(1 << bits, -1, dtype=np.int32)
        slot = self._slot(keys)
        pending = np.arange(len(keys))
        while len(pending):
            free = self.positions[slot[pending]] < 0
            claim = pending[free]
            _, first = np.unique(slot[claim], return_index=True)
            won = claim[first]
            self.keys[slot[won]] = keys[won]
            self.positions[slot[won]] = won
            placed = np.zeros(len(keys), dtype=bool)
            placed[won] = True
            pending = pending[~placed[pending]]
            slot[pending] = (slot[pending] + 1) & self.mask

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((keys.view(np.uint64) * self._GOLDEN) >> self.shift).astype(np.int64)

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """[n] int64 keys -> [n] int32 positions, -1 for a key not in the table."""
        out = np.full(len(keys), -1, dtype=np.int32)
        slot = self._slot(keys)
        index = np.arange(len(keys))
        query = keys
        while len(index):
            found = self.positions[slot]
            hit = (found >= 0) & (self.keys[slot] == query)
            out[index[hit]] = found[hit]
            again = np.flatnonzero(~hit & (found >= 0))
            index, query, slot = index[again], query[again], (slot[again] + 1) & self.mask
        return out


class ItemRanks:
    """Item key -> rank (its position in the item table)."""

    def __init__(self, table: pa.Table) -> None:
        self.size = table.num_rows
        self.index = KeyIndex(table.column("key").to_numpy())

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """[n] int64 keys -> [n] int32 ranks; every key must be in the table."""
        ranks = self.index(keys)
        if (ranks < 0).any():
            raise PrepError(
                "an item key is missing from the item table: the map outputs are inconsistent; "
                "rerun the build"
            )
        return ranks


def write_item_map(plan: Plan, out: Store, table: pa.Table, item_ids: np.ndarray) -> None:
    """``item_map.parquet``: original id -> item_id for the kept items, by item_id."""
    kept = np.flatnonzero(item_ids > 0)
    original = table.column("text" if plan.kinds["item"] == "string" else "key").take(
        pa.array(kept)
    )
    maps = pa.table({"item": original, "item_id": pa.array(item_ids[kept], pa.int32())})
    write_parquet(out, maps, layout.ITEM_MAP, compression=plan.config.compression)


def write_parquet(out: Store, table: pa.Table, name: str, *, compression: str) -> None:
    with out.open_write(name) as handle:
        pq.write_table(
            table, handle, compression=compression, row_group_size=1 << 20, store_schema=True
        )
