"""Iterative k-core: drop users and items with too few interactions until nothing changes.

A round is one pass over the reduced buckets (int32 item ranks in user order): with the items
alive after the previous round, each user's degree is its number of interactions with alive
items; users below ``min_user_interactions`` go; then every item's count over the remaining
users' interactions decides which items stay (``min_item_interactions``). A round that removes
nothing ends the loop: every kept user then has enough interactions with kept items and every
kept item enough interactions from kept users (a fixed point, reached in finitely many rounds
since only removals happen). Memory: the item counts (one int64 per item), one alive flag per
user, and one bucket's arrays.

Outputs: item ids (``item_ids[rank]`` = 1..N for kept items in natural order, 0 for removed), the
alive flags of each bucket's users, the user-id scheme (``keep``/``index``) with each bucket's
offset for ``index``, per-round counts, and ``item_map.parquet``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.compute as pc

from data_prep.build import layout
from data_prep.build.idmap import ensure_item_table, write_item_map
from data_prep.build.plan import Plan
from data_prep.build.store import Store, fault
from data_prep.writer import PrepError


def reduced_markers(plan: Plan, work: Store) -> list[dict[str, Any]]:
    missing = [
        b for b in range(plan.buckets) if not work.exists(layout.reduce_name(b, "done.json"))
    ]
    if missing:
        raise PrepError(
            f"{work.show()}: the reduce stage has not finished ({len(missing)} of {plan.buckets} "
            f"buckets left, e.g. bucket {missing[0]}); run it first"
        )
    return [work.read_json(layout.reduce_name(b, "done.json")) for b in range(plan.buckets)]


def drop_runs(work: Store) -> None:
    """Every bucket is reduced: the map runs (the bulk of the work folder) are not needed any
    more, even by a rerun (it skips the reduced buckets). Markers and item texts stay."""
    for name in work.glob("map/*/run-*.arrow") + work.glob("map/*/users-*.arrow"):
        work.rm(name)


def load_bucket(work: Store, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(history lengths [U] int64 in user order, item ranks [E] int32 in user and time order)."""
    users = work.read_ipc(layout.reduce_name(bucket, "users.arrow"))
    ranks = work.read_ipc(layout.reduce_name(bucket, "items.arrow"))
    return users.column("length").to_numpy(), ranks.column("rank").to_numpy()


def starts_of(lengths: np.ndarray) -> np.ndarray:
    return (
        np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if len(lengths)
        else np.zeros(0, np.int64)
    )


def save_npy(work: Store, array: np.ndarray, name: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    work.write_bytes(buffer.getvalue(), name)


def load_npy(work: Store, name: str) -> np.ndarray:
    return np.load(io.BytesIO(work.read_bytes(name)), allow_pickle=False)


def run_kcore(
    plan: Plan, work: Store, out: Store, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Compute (or read, when done) the k-core; returns the done marker."""
    if work.exists(layout.KCORE_DONE):
        return work.read_json(layout.KCORE_DONE)
    reduced = reduced_markers(plan, work)
    drop_runs(work)
    table = ensure_item_table(plan, work)
    num_items = table.num_rows
    ku, ki = plan.config.min_user_interactions, plan.config.min_item_interactions
    item_alive = np.ones(num_items, dtype=bool)
    user_alive = [np.ones(int(r["users"]), dtype=bool) for r in reduced]
    rounds: list[dict[str, int]] = []
    while True:
        counts = np.zeros(num_items, dtype=np.int64)
        users_removed = 0
        for bucket in range(plan.buckets):
            lengths, ranks = load_bucket(work, bucket)
            if not len(lengths):
                continue
            row_ok = item_alive[ranks]
            degree = np.add.reduceat(row_ok.astype(np.int64), starts_of(lengths))
            alive = user_alive[bucket] & (degree >= ku)
            users_removed += int(np.count_nonzero(user_alive[bucket] & ~alive))
            user_alive[bucket] = alive
            row_ok &= np.repeat(alive, lengths)
            counts += np.bincount(ranks[row_ok], minlength=num_items)
        kept_items = item_alive & (counts >= ki)
        items_removed = int(np.count_nonzero(item_alive & ~kept_items))
        item_alive = kept_items
        rounds.append(
            {
                "round": len(rounds) + 1,
                "users_removed": users_removed,
                "items_removed": items_removed,
                "users_left": int(sum(np.count_nonzero(a) for a in user_alive)),
                "items_left": int(np.count_nonzero(item_alive)),
            }
        )
        if progress is not None:
            progress(1)
        if users_removed == 0 and items_removed == 0:
            interactions_after = int(counts.sum())
            break

    users_after = int(sum(np.count_nonzero(a) for a in user_alive))
    if users_after == 0:
        raise PrepError(
            f"no users are left after k-core filtering (min_user_interactions={ku}, "
            f"min_item_interactions={ki}); see the rounds: {rounds}"
        )
    item_ids = np.zeros(num_items, dtype=np.int32)
    item_ids[item_alive] = np.arange(1, int(item_alive.sum()) + 1, dtype=np.int32)
    mode, offsets = _user_ids(plan, work, user_alive)
    for bucket, alive in enumerate(user_alive):
        save_npy(work, alive, layout.alive_name(bucket))
    save_npy(work, item_ids, layout.ITEM_IDS)
    write_item_map(plan, out, table, item_ids)
    fault("kcore")
    marker = {
        "users_before": int(sum(int(r["users"]) for r in reduced)),
        "items_before": num_items,
        "interactions_before": int(sum(int(r["interactions"]) for r in reduced)),
        "rounds": rounds,
        "users_after": users_after,
        "items_after": int(item_alive.sum()),
        "interactions_after": interactions_after,
        "user_ids": mode,
        "user_id_offsets": offsets,
    }
    work.write_json(marker, layout.KCORE_DONE)
    return marker


def _user_ids(plan: Plan, work: Store, user_alive: list[np.ndarray]) -> tuple[str, list[int]]:
    """The user-id scheme, and for ``index`` each bucket's first id minus one."""
    wanted = plan.config.user_ids
    offsets = np.concatenate(
        [[0], np.cumsum([np.count_nonzero(a) for a in user_alive])[:-1]]
    ).tolist()
    if wanted == "index":
        return "index", [int(o) for o in offsets]
    for bucket, alive in enumerate(user_alive):
        users = work.read_ipc(layout.reduce_name(bucket, "users.arrow"))
        value = users.column("value").filter(alive)
        if value.null_count:
            if wanted == "keep":
                text = users.column("text").filter(alive).filter(pc.is_null(value))[0].as_py()
                raise PrepError(
                    f"user_ids: keep, but user id {text!r} is not an integer; use user_ids: index"
                )
            return "index", [int(o) for o in offsets]
    return "keep", []
