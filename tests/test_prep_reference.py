"""A naive pure-Python raw-log build, checked by hand here, and helpers the other prep tests use.

``naive_build`` is the readable reference for ``python -m data_prep.build``: dedupe with a set,
sort each user's events with ``sorted``, peel the k-core with plain loops, number the items in
natural order, cut each history to ``max_len``. The fast build must give the same datasets.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.build.cli import main as build_main
from elcrec_dist.prepared import load_sequences

Event = tuple[str, str, int, str]  # (user, item, time, event) of a valid row


def natural_key(text: str) -> tuple[int, int, bytes]:
    """Plain decimal integers first by value, then other ids by their UTF-8 bytes."""
    if re.fullmatch(r"0|-?[1-9][0-9]*", text) and -(2**63) <= int(text) < 2**63:
        return (0, int(text), b"")
    return (1, 0, text.encode())


def naive_build(
    events: list[Event],
    *,
    min_user: int = 4,
    min_item: int = 1,
    max_len: int | None = None,
    dedupe: bool = True,
    keep_events: tuple[str, ...] = (),
) -> dict[str, Any]:
    """{'sequences': {user: [item, ...]}, 'item_ids': {item: id}, 'rounds': [(users, items)]}."""
    rows = [e for e in events if not keep_events or e[3] in keep_events]
    duplicates = 0
    if dedupe:
        duplicates = len(rows) - len(set(rows))
        rows = list(set(rows))
    histories: dict[str, list[Event]] = {}
    for row in rows:
        histories.setdefault(row[0], []).append(row)
    for user in histories:
        histories[user].sort(key=lambda e: (e[2], natural_key(e[1]), e[3]))
    users = set(histories)
    items = {e[1] for e in rows}
    rounds = []
    while True:
        degree = {u: sum(1 for e in histories[u] if e[1] in items) for u in users}
        removed_users = {u for u in users if degree[u] < min_user}
        users -= removed_users
        count = Counter(e[1] for u in users for e in histories[u] if e[1] in items)
        removed_items = {i for i in items if count[i] < min_item}
        items -= removed_items
        rounds.append((len(removed_users), len(removed_items)))
        if not removed_users and not removed_items:
            break
    item_ids = {item: k + 1 for k, item in enumerate(sorted(items, key=natural_key))}
    sequences = {}
    for user in users:
        kept = [e[1] for e in histories[user] if e[1] in items]
        sequences[user] = kept if max_len is None else kept[-max_len:]
    return {
        "sequences": sequences,
        "item_ids": item_ids,
        "rounds": rounds,
        "duplicates": duplicates,
    }


# --- helpers for the prep tests --------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[Any]], *, sep: str = ",") -> Path:
    lines = [sep.join(header)] + [
        sep.join("" if v is None else str(v) for v in row) for row in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(
    path: Path, columns: dict[str, list[Any]], schema: pa.Schema | None = None
) -> Path:
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def events_csv(path: Path, events: list[Event]) -> Path:
    return write_csv(path, ["user_id", "item_id", "timestamp", "event"], [list(e) for e in events])


def build(inp: Path | str, out: Path | str, *flags: str, jobs: int = 1) -> int:
    """Run the real entry point in this process (with fixed max_time: no clock dependence)."""
    args = ["--input", str(inp), "--output", str(out), "--jobs", str(jobs), "--no-progress"]
    if "--max-time" not in flags:
        args += ["--max-time", "2030-01-01"]
    return build_main([*args, *flags])


def decode(out: Path | str) -> dict[str, list[str]]:
    """The dataset at ``out`` as {original user id: [original item ids]} through the id maps."""
    _, user_ids, sequences = load_sequences(str(out))
    user_map = pl.read_parquet(f"{out}/user_map/*.parquet")
    item_map = pl.read_parquet(f"{out}/item_map.parquet")
    user_of = dict(
        zip(user_map["user_id"].to_list(), map(str, user_map["user"].to_list()), strict=True)
    )
    item_of = dict(
        zip(item_map["item_id"].to_list(), map(str, item_map["item"].to_list()), strict=True)
    )
    return {
        user_of[int(u)]: [item_of[int(i)] for i in seq]
        for u, seq in zip(user_ids, sequences, strict=True)
    }


def stats(out: Path | str) -> dict[str, Any]:
    return json.loads(Path(out, "stats.json").read_text())


def dataset_files(out: Path) -> dict[str, bytes]:
    """Every file of a dataset folder except those that name the run (manifest, stats)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "stats.json")
    }


# --- the reference, by hand ------------------------------------------------------------------


def test_reference_by_hand() -> None:
    events = [
        ("a", "x", 3, "v"), ("a", "y", 1, "v"), ("a", "y", 1, "v"), ("a", "z", 2, "v"),
        ("a", "w", 4, "v"),
        ("b", "x", 1, "v"), ("b", "y", 2, "v"), ("b", "z", 3, "v"), ("b", "w", 4, "v"),
        ("c", "x", 1, "v"), ("c", "q", 2, "v"), ("c", "q", 3, "v"), ("c", "y", 4, "v"),
    ]  # fmt: skip
    # dedupe drops the repeated (a, y, 1); a: y z x w; b: x y z w; c: x q q y.
    # min_item=2: q appears only for c (2 times: kept), so nothing is removed at all.
    ref = naive_build(events, min_user=4, min_item=2)
    assert ref["duplicates"] == 1
    assert ref["sequences"] == {
        "a": ["y", "z", "x", "w"],
        "b": ["x", "y", "z", "w"],
        "c": ["x", "q", "q", "y"],
    }
    assert ref["rounds"] == [(0, 0)]
    # min_item=3: z, w (users a, b) and q (2 rows of c) go in round 1; a, b, c are left with
    # 2 items each (< 4) and go in round 2, taking x and y with them; round 3 confirms.
    ref = naive_build(events, min_user=4, min_item=3)
    assert ref["rounds"] == [(0, 3), (3, 2), (0, 0)]
    assert ref["sequences"] == {}


def test_natural_key_orders_integers_first_then_bytes() -> None:
    ids = ["b", "10", "a", "9", "-3", "007", "B", "0"]
    assert sorted(ids, key=natural_key) == ["-3", "0", "9", "10", "007", "B", "a", "b"]
