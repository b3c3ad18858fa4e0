"""Per-rank streaming (``elcrec_dist.stream``): plans, exactly-once epochs, resume, bounded
read-ahead, evaluation shares, the k-means sample, refusals, and the same bytes from ``s3://``.

Expectations come from the files read independently with pyarrow, and from a naive in-memory
reference of the epoch order (``reference_epoch``) that follows the written spec step by step.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Generator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_prepared

from elcrec_dist.prepared import MANIFEST_NAME, DatasetError, read_info
from elcrec_dist.stream import (
    Piece,
    RowGroup,
    StreamingDataset,
    TrainPlan,
    cut,
    epoch_order,
    steps_per_epoch,
    window_order,
)

NUM_USERS = 311  # prime: no world size or batch size divides it
NUM_ITEMS = 60
ROWS_PER_GROUP = 7
SHARDS = 3
WINDOW = 3  # row groups per shuffle window in these tests
BATCH = 16  # global batch


Users = tuple[np.ndarray, list[np.ndarray]]  # user ids [U] int64, item sequences [U] int32


def make_users(
    num_users: int = NUM_USERS, *, seed: int = 0, short_user: int | None = None
) -> Users:
    """Random distinct user ids below 10^9 (not 1..U) and 4 to 12 random items each."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**9, size=num_users, replace=False).astype(np.int64)
    seqs = [
        rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(4, 13))).astype(np.int32) for _ in ids
    ]
    if short_user is not None:
        seqs[short_user] = seqs[short_user][:3]
    return ids, seqs


def write_dataset(
    out: Path, users: Users, *, rows_per_group: int = ROWS_PER_GROUP, shards: int = SHARDS
) -> Path:
    """Through the real writer (the conftest factory), small row groups so that there are many."""
    ids, seqs = users
    return write_prepared(
        out, seqs, user_ids=ids, num_items=NUM_ITEMS, shards=shards, rows_per_group=rows_per_group
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("stream") / "ds", make_users())


def row_groups(root: Path) -> list[tuple[str, int, list[int], list[list[int]]]]:
    """(file, row group, user ids, sequences) in manifest order, read with pyarrow directly."""
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    out = []
    for entry in manifest["files"]:
        f = pq.ParquetFile(root / entry["path"])
        for g in range(f.num_row_groups):
            t = f.read_row_group(g)
            out.append(
                (entry["path"], g, t.column("user_id").to_pylist(), t.column("items").to_pylist())
            )
    return out


def by_user(root: Path) -> dict[int, list[int]]:
    return {u: s for _, _, ids, seqs in row_groups(root) for u, s in zip(ids, seqs, strict=True)}


def unit_of_user(root: Path) -> dict[int, int]:
    return {u: i for i, (_, _, ids, _) in enumerate(row_groups(root)) for u in ids}


def reference_epoch(
    root: Path, *, seed: int, epoch: int, world: int, batch: int, window: int
) -> list[list[list[int]]]:
    """User ids of every rank's local batches, from the spec, with every user in memory.

    Permute the row groups (seeded by seed, epoch), lay them end to end, cut into ``world``
    parts at r·U//world, split each part into runs of one row group ("pieces"), shuffle each
    run of ``window`` pieces (seeded by seed, epoch, rank, window), spread over ceil(U / B)
    steps at s·n//S.
    """
    groups = [ids for _, _, ids, _ in row_groups(root)]
    order = epoch_order(len(groups), seed=seed, epoch=epoch)
    stream = [(int(g), u) for g in order for u in groups[g]]
    total, steps = len(stream), math.ceil(len(stream) / batch)
    ranks = []
    for r in range(world):
        mine = stream[r * total // world : (r + 1) * total // world]
        runs: list[list[int]] = []
        for i, (g, u) in enumerate(mine):
            if i == 0 or mine[i - 1][0] != g:
                runs.append([])
            runs[-1].append(u)
        shuffled: list[int] = []
        for j in range(0, len(runs), window):
            rows = [u for run in runs[j : j + window] for u in run]
            perm = window_order(len(rows), seed=seed, epoch=epoch, rank=r, window=j // window)
            shuffled.extend(rows[p] for p in perm)
        n = len(shuffled)
        ranks.append([shuffled[s * n // steps : (s + 1) * n // steps] for s in range(steps)])
    return ranks


def epoch_ids(
    ds: StreamingDataset, *, seed: int, epoch: int, world: int, batch: int = BATCH
) -> list[list[list[int]]]:
    out = []
    for r in range(world):
        batches = list(
            ds.train_batches(epoch=epoch, rank=r, world=world, batch_size=batch, seed=seed)
        )
        assert [s for s, _ in batches] == list(range(len(batches)))
        out.append([rows.user_ids.tolist() for _, rows in batches])
    return out


def instrument(
    ds: StreamingDataset, monkeypatch: pytest.MonkeyPatch, *, delay: float = 0.0
) -> list[tuple[int, int]]:
    """Log every row group ``ds`` reads as (file, row group), optionally slowing each read."""
    log: list[tuple[int, int]] = []
    real = ds._read_row_group

    def logged(unit: RowGroup) -> pa.Table:
        if delay:
            time.sleep(delay)
        log.append((unit.file, unit.index))
        return real(unit)

    monkeypatch.setattr(ds, "_read_row_group", logged)
    return log


# --- plan arithmetic by hand --------------------------------------------------------------------


def test_cut_by_hand() -> None:
    units = [RowGroup(0, 0, 5), RowGroup(0, 1, 3), RowGroup(1, 0, 4)]  # 12 rows
    # in order 0, 1, 2: rows 0..5 go to rank 0, 6..11 to rank 1; unit 1 is split 1 | 2
    assert cut(units, [0, 1, 2], rank=0, world=2) == (Piece(0, 0, 5), Piece(1, 0, 1))
    assert cut(units, [0, 1, 2], rank=1, world=2) == (Piece(1, 1, 3), Piece(2, 0, 4))
    # in order 2, 0, 1 over 5 ranks: cuts at 2, 4, 7, 9
    parts = [cut(units, [2, 0, 1], rank=r, world=5) for r in range(5)]
    assert parts == [
        (Piece(2, 0, 2),),
        (Piece(2, 2, 4),),
        (Piece(0, 0, 3),),
        (Piece(0, 3, 5),),
        (Piece(1, 0, 3),),
    ]


def test_step_bounds_by_hand() -> None:
    plan = TrainPlan(pieces=(Piece(0, 0, 10),), window_groups=1, steps=3)
    assert [plan.step_bounds(s) for s in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert steps_per_epoch(311, 16) == 20 and steps_per_epoch(320, 16) == 20
    assert steps_per_epoch(22363, 256) == 88


def test_units_are_the_footers_row_groups(dataset: Path) -> None:
    ds = StreamingDataset.open(str(dataset))
    expected = [(path, g, len(ids)) for path, g, ids, _ in row_groups(dataset)]
    assert [(ds.info.files[u.file].path, u.index, u.rows) for u in ds.units] == expected
    assert len(ds.units) >= 45  # 311 users, 3 files, groups of 7
    assert ds.stats.row_groups_read == 0  # listing reads footers only


def test_a_manifest_already_read_is_not_read_again(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The entry points read the manifest to check the model's catalogue, then open the data from
    # that same reading: a dataset replaced in between cannot give the two steps different files.
    expected = [(u.file, u.index, u.rows) for u in StreamingDataset.open(str(dataset)).units]
    info = read_info(str(dataset))
    import elcrec_dist.stream as stream

    def no_second_read(url: str) -> None:
        raise AssertionError(f"manifest of {url} read again")

    monkeypatch.setattr(stream, "read_info", no_second_read)
    ds = StreamingDataset.open(str(dataset), info=info)
    assert ds.info is info
    assert [(u.file, u.index, u.rows) for u in ds.units] == expected


# --- training epochs ----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_uses_every_user_once_with_equal_steps_and_balanced_batches(
    dataset: Path, world: int
) -> None:
    ds = StreamingDataset.open(str(dataset), window_groups=WINDOW)
    truth = by_user(dataset)
    steps = math.ceil(NUM_USERS / BATCH)  # 20
    seen: Counter[int] = Counter()
    sizes = np.zeros((world, steps), dtype=int)
    for r in range(world):
        batches = list(ds.train_batches(epoch=0, rank=r, world=world, batch_size=BATCH, seed=7))
        assert [s for s, _ in batches] == list(range(steps))  # the same step count on every rank
        for s, rows in batches:
            sizes[r, s] = len(rows)
            seen.update(rows.user_ids.tolist())
            for u, seq in zip(rows.user_ids.tolist(), rows.sequences, strict=True):
                assert seq.dtype == np.int64 and seq.tolist() == truth[u]
    assert set(seen) == set(truth) and set(seen.values()) == {1}  # exactly once, no drop
    assert sizes.max() - sizes.min() <= 1  # across steps and ranks
    assert sizes.sum() == NUM_USERS
    assert sizes.min() >= 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_equals_the_in_memory_reference(dataset: Path, world: int) -> None:
    ds = StreamingDataset.open(str(dataset), window_groups=WINDOW)
    for seed, epoch in [(7, 0), (7, 1), (3, 4)]:
        expected = reference_epoch(
            dataset, seed=seed, epoch=epoch, world=world, batch=BATCH, window=WINDOW
        )
        assert epoch_ids(ds, seed=seed, epoch=epoch, world=world) == expected


def test_order_is_fixed_by_seed_and_epoch_and_changes_with_either(dataset: Path) -> None:
    a = StreamingDataset.open(str(dataset), window_groups=WINDOW)
    b = StreamingDataset.open(str(dataset), window_groups=WINDOW)
    first = epoch_ids(a, seed=7, epoch=0, world=2)
    assert epoch_ids(b, seed=7, epoch=0, world=2) == first  # another reader, same order
    assert epoch_ids(a, seed=7, epoch=0, world=2) == first  # the same reader again
    for other in (epoch_ids(a, seed=7, epoch=1, world=2), epoch_ids(a, seed=8, epoch=0, world=2)):
        assert other != first
        # not only a different batching of the same rank streams: rank 0 holds other users
        assert {u for batch in other[0] for u in batch} != {u for batch in first[0] for u in batch}


@pytest.mark.parametrize("world", [1, 3])
def test_resume_from_step_equals_the_tail_of_the_epoch(
    dataset: Path, world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = StreamingDataset.open(str(dataset), window_groups=WINDOW)
    unit_of = unit_of_user(dataset)
    ordinal = {(ds.units[i].file, ds.units[i].index): i for i in range(len(ds.units))}
    for r in range(world):
        full = list(ds.train_batches(epoch=2, rank=r, world=world, batch_size=BATCH, seed=5))
        for start in [0, 1, 7, 13, 19, 20]:
            probe = StreamingDataset.open(str(dataset), window_groups=WINDOW)
            log = instrument(probe, monkeypatch)
            tail = list(
                probe.train_batches(
                    epoch=2, rank=r, world=world, batch_size=BATCH, seed=5, start_step=start
                )
            )
            assert [s for s, _ in tail] == list(range(start, len(full)))
            for (_, want), (_, got) in zip(full[start:], tail, strict=True):
                assert got.user_ids.tolist() == want.user_ids.tolist()
                assert [x.tolist() for x in got.sequences] == [x.tolist() for x in want.sequences]
            # reading starts at the window holding step `start`'s first row: at most one window
            # of row groups more than the remaining batches touch
            needed = {unit_of[u] for _, rows in tail for u in rows.user_ids.tolist()}
            read = {ordinal[key] for key in log}
            assert needed <= read
            assert len(read - needed) <= WINDOW
            assert len(log) == len(read)  # no row group read twice


def test_resume_outside_the_epoch_is_refused(dataset: Path) -> None:
    ds = StreamingDataset.open(str(dataset))
    with pytest.raises(ValueError, match="outside the epoch's 20 steps"):
        next(ds.train_batches(epoch=0, rank=0, world=1, batch_size=BATCH, seed=1, start_step=21))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_rank_reads_only_its_own_row_groups(
    dataset: Path, world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit_of = unit_of_user(dataset)
    groups = row_groups(dataset)
    reads_per_rank = []
    for r in range(world):
        ds = StreamingDataset.open(str(dataset), window_groups=WINDOW)
        log = instrument(ds, monkeypatch)
        users = [
            u
            for _, rows in ds.train_batches(epoch=1, rank=r, world=world, batch_size=BATCH, seed=2)
            for u in rows.user_ids.tolist()
        ]
        mine = {unit_of[u] for u in users}
        assert sorted(log) == sorted((ds.units[i].file, ds.units[i].index) for i in mine)
        reads_per_rank.append(len(log))
    # only the row groups on a cut are read twice
    assert sum(reads_per_rank) <= len(groups) + world - 1


def test_read_ahead_is_bounded_and_overlaps_compute(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = StreamingDataset.open(str(dataset), window_groups=WINDOW, prefetch=1)
    unit_of = unit_of_user(dataset)
    ordinal = {(ds.units[i].file, ds.units[i].index): i for i in range(len(ds.units))}
    log = instrument(ds, monkeypatch, delay=0.002)
    touched: set[int] = set()
    batches = ds.train_batches(epoch=0, rank=0, world=1, batch_size=BATCH, seed=1)
    for step, rows in batches:
        touched |= {unit_of[u] for u in rows.user_ids.tolist()}
        time.sleep(0.01)  # "compute": the reader may run ahead meanwhile, but only so far
        read = {ordinal[key] for key in log}
        assert touched <= read
        # the window in use (partly untouched) plus one window read ahead
        assert len(read - touched) <= 2 * WINDOW, step
        if step == 0:  # the next window is read while step 0 "computes"
            deadline = time.monotonic() + 10.0
            while len(log) <= WINDOW and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(log) > WINDOW
    assert ds.stats.peak_windows_held == 2  # the window in use + 1 ahead
    assert ds.stats.row_groups_read == len(ds.units)


def test_abandoning_an_epoch_stops_the_reader_thread(dataset: Path) -> None:
    ds = StreamingDataset.open(str(dataset), window_groups=1)
    batches = ds.train_batches(epoch=0, rank=0, world=1, batch_size=BATCH, seed=1)
    assert isinstance(batches, Generator)  # a trainer abandons an epoch by closing it
    next(batches)
    assert any(t.name == "stream-prefetch" for t in threading.enumerate())
    batches.close()
    assert not any(t.name == "stream-prefetch" for t in threading.enumerate())


def test_a_read_error_reaches_the_trainer_unchanged(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = StreamingDataset.open(str(dataset), window_groups=1)
    real = ds._read_row_group
    calls: list[RowGroup] = []

    def flaky(unit: RowGroup) -> pa.Table:
        calls.append(unit)
        if len(calls) == 3:  # raised in the read-ahead thread
            raise ConnectionResetError("storage hiccup")  # an OSError: a retryable exit code
        return real(unit)

    monkeypatch.setattr(ds, "_read_row_group", flaky)
    with pytest.raises(ConnectionResetError, match="storage hiccup"):
        list(ds.train_batches(epoch=0, rank=0, world=1, batch_size=BATCH, seed=1))
    assert not any(t.name == "stream-prefetch" for t in threading.enumerate())


def test_a_dataset_too_small_for_the_world_is_refused(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "small", make_users(5), rows_per_group=2, shards=1)
    ds = StreamingDataset.open(str(out))
    # 5 users, global batch 3 -> 2 steps; 3 ranks would leave one rank a step without users
    with pytest.raises(DatasetError, match="cannot fill 2 steps"):
        next(ds.train_batches(epoch=0, rank=0, world=3, batch_size=3, seed=1))
    assert len(epoch_ids(ds, seed=1, epoch=0, world=2, batch=3)[1]) == 2


# --- evaluation and the k-means sample ----------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shares_are_disjoint_complete_and_in_manifest_order(dataset: Path, world: int) -> None:
    ds = StreamingDataset.open(str(dataset), window_groups=WINDOW)
    truth = [
        (u, s) for _, _, ids, seqs in row_groups(dataset) for u, s in zip(ids, seqs, strict=True)
    ]
    got = []
    for r in range(world):
        chunks = list(ds.eval_sequences(rank=r, world=world, batch_size=10))
        assert all(len(c) == 10 for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= 10
        share = [
            (u, s.tolist())
            for c in chunks
            for u, s in zip(c.user_ids.tolist(), c.sequences, strict=True)
        ]
        assert abs(len(share) - NUM_USERS / world) < 1  # balanced
        got.extend(share)
    assert got == truth  # ranks' shares, in rank order, are the users in manifest order


def test_sample_union_depends_only_on_seed_and_is_bounded(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = by_user(dataset)
    unit_of = unit_of_user(dataset)
    unions = []
    for world in (1, 2, 3):
        parts = []
        for r in range(world):
            ds = StreamingDataset.open(str(dataset))
            log = instrument(ds, monkeypatch)
            part = ds.sample_sequences(rank=r, world=world, count=40, seed=3)
            sample_reads = set(log)
            share = {u for c in ds.eval_sequences(rank=r, world=world) for u in c.user_ids.tolist()}
            assert set(part.user_ids.tolist()) <= share  # a rank samples inside its own share
            # ... and reads only row groups that hold its sampled users
            assert {ds.units[i] for i in {unit_of[u] for u in part.user_ids.tolist()}} == {
                u for u in ds.units if (u.file, u.index) in sample_reads
            }
            for u, s in zip(part.user_ids.tolist(), part.sequences, strict=True):
                assert s.tolist() == truth[u]
            parts.append(part.user_ids.tolist())
        unions.append([u for p in parts for u in p])
    assert unions[0] == unions[1] == unions[2]
    assert len(unions[0]) == len(set(unions[0])) == 40
    other = StreamingDataset.open(str(dataset)).sample_sequences(rank=0, world=1, count=40, seed=4)
    assert set(other.user_ids.tolist()) != set(unions[0])
    everyone = StreamingDataset.open(str(dataset)).sample_sequences(
        rank=0, world=1, count=10**6, seed=3
    )
    assert sorted(everyone.user_ids.tolist()) == sorted(truth)


def test_sample_reads_are_bounded_by_the_sample_not_the_dataset(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "big", make_users(2000, seed=1), rows_per_group=10, shards=2)
    ds = StreamingDataset.open(str(out))
    part = ds.sample_sequences(rank=0, world=1, count=5, seed=0)
    assert len(part) == 5
    # units are drawn until they hold 16 x 5 = 80 users: at most 9 groups of 10 of the 200
    assert ds.stats.row_groups_read <= 9


# --- refusals -----------------------------------------------------------------------------------


def test_a_user_with_fewer_than_4_items_is_refused_naming_the_file(tmp_path: Path) -> None:
    users = make_users(50, short_user=17)
    bad_user = int(users[0][17])
    out = write_dataset(tmp_path / "short", users, shards=1)
    ds = StreamingDataset.open(str(out))
    with pytest.raises(
        DatasetError,
        match=rf"part-00000-of-00001\.parquet: row group \d+: user {bad_user} has 3 items",
    ):
        list(ds.train_batches(epoch=0, rank=0, world=1, batch_size=8, seed=1))
    with pytest.raises(DatasetError, match="has 3 items"):
        list(ds.eval_sequences(rank=0, world=1))


def edit_manifest(root: Path, edit) -> None:
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_a_manifest_row_count_that_disagrees_with_the_file_is_refused(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "ds", make_users(60))

    def move_a_row(m: dict) -> None:  # totals still add up, so read_info accepts it
        m["files"][0]["rows"] += 1
        m["files"][1]["rows"] -= 1

    edit_manifest(out, move_a_row)
    read_info(str(out))
    with pytest.raises(
        DatasetError, match=r"part-00000-of-00003\.parquet: \d+ rows in the file, manifest says"
    ):
        StreamingDataset.open(str(out))


def test_a_file_of_another_size_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "ds", make_users(60))
    shard = out / "part-00001-of-00003.parquet"
    size = shard.stat().st_size
    with shard.open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(
        DatasetError, match=rf"part-00001-of-00003\.parquet: {size + 1} bytes, manifest says {size}"
    ):
        StreamingDataset.open(str(out))
    shard.unlink()
    with pytest.raises(
        DatasetError, match=r"part-00001-of-00003\.parquet: listed in the manifest, but missing"
    ):
        StreamingDataset.open(str(out))


# --- the same from s3:// -------------------------------------------------------------------------


def test_s3_copy_gives_the_same_plans_and_batches(dataset: Path, s3_env: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(dataset), f"{s3_env}/ds", recursive=True)
    url = f"s3://{s3_env}/ds"
    local = StreamingDataset.open(str(dataset), window_groups=WINDOW)
    remote = StreamingDataset.open(url, window_groups=WINDOW)
    assert remote.units == local.units and remote.info.files == local.info.files
    for world in (1, 2):
        for r in range(world):
            want = list(local.train_batches(epoch=3, rank=r, world=world, batch_size=BATCH, seed=9))
            got = list(
                remote.train_batches(
                    epoch=3, rank=r, world=world, batch_size=BATCH, seed=9, start_step=0
                )
            )
            assert [
                (s, b.user_ids.tolist(), [x.tolist() for x in b.sequences]) for s, b in got
            ] == [(s, b.user_ids.tolist(), [x.tolist() for x in b.sequences]) for s, b in want]
    assert [c.user_ids.tolist() for c in remote.eval_sequences(rank=1, world=2, batch_size=32)] == [
        c.user_ids.tolist() for c in local.eval_sequences(rank=1, world=2, batch_size=32)
    ]
    assert (
        remote.sample_sequences(rank=0, world=2, count=30, seed=1).user_ids.tolist()
        == local.sample_sequences(rank=0, world=2, count=30, seed=1).user_ids.tolist()
    )
    # a manifest that disagrees with an object is refused there too
    fs.rm(f"{s3_env}/ds/part-00002-of-00003.parquet")
    with pytest.raises(
        DatasetError, match=r"part-00002-of-00003\.parquet: listed in the manifest, but missing"
    ):
        StreamingDataset.open(url)
