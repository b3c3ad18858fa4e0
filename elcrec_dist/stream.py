"""Per-rank streaming of a prepared dataset (local folder or ``s3://``), in Parquet row groups.

The work unit is one Parquet row group, listed from the files' footers (metadata only) and
checked against the manifest. Every plan below is a pure function of the row-group layout and
its arguments, so every rank computes every other rank's plan without talking to it.

Training epoch (``train_plan``), for ``world`` ranks and a global batch of ``B`` users:

1. permute the row groups with a generator seeded by (seed, epoch);
2. lay them end to end as one stream of U users and cut it into ``world`` contiguous parts of
   U/world users (±1); a row group on a cut is read by the two ranks that share it;
3. every rank runs ``steps_per_epoch = ceil(U / B)`` steps; rank r's n_r users are spread over
   them so that step s holds rows ``[s·n_r // S, (s+1)·n_r // S)`` of its stream: local batch
   sizes differ by at most one (across ranks too), no rank waits in a collective at the end of
   an epoch, and every user is used exactly once per epoch (no drop, no repeat);
4. a rank's stream is shuffled in windows of ``window_groups`` consecutive pieces (row groups
   or the parts of them it owns), each by a generator seeded by (seed, epoch, rank, window).

Memory is bounded by windows, not by the dataset: the rank holds the window in use plus
``prefetch`` windows that a background thread reads ahead (so IO overlaps compute), plus the
users of the batch being assembled. Resuming at step s is arithmetic: the first row of step s
sits in a known window, and reading starts there.

Evaluation (``eval_plan``) cuts the row groups in manifest order, unshuffled, into ``world``
contiguous parts of equal users: disjoint shares covering every user once.

Storage options (endpoint, credentials) come only from the environment, through fsspec and the
usual variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), never from a config file.
"""

from __future__ import annotations

import math
import posixpath
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from elcrec_dist.prepared import (
    DatasetError,
    DatasetInfo,
    FileEntry,
    _fs_and_root,
    read_info,
    sha256_of,
)

MIN_ITEMS = 4  # a user needs train, valid and test targets (see ``elcrec_dist.data``)
WINDOW_GROUPS = 8  # pieces per shuffle window (8 x 4096 users with the writer's row groups)
PREFETCH_WINDOWS = 1  # windows read ahead of the one in use
SAMPLE_SPREAD = 16  # k-means sample: read row groups holding ~16x the sample, take a uniform subset
FOOTER_THREADS = 8  # footers are tiny; read several at once (object stores have latency)
CHECKSUM_THREADS = 4  # files hashed at once by one rank (hashing releases the GIL)

# Distinct first words of the generator seeds, so that no two uses share a stream.
_SEED_EPOCH_ORDER = 0x5EED_0001
_SEED_WINDOW = 0x5EED_0002
_SEED_SAMPLE = 0x5EED_0003


# --- plans: pure functions of the row-group layout ---------------------------------------------


@dataclass(frozen=True)
class RowGroup:
    """One work unit: row group ``index`` of the manifest's file ``file``."""

    file: int  # index into DatasetInfo.files
    index: int  # row-group index inside that file
    rows: int


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of work unit ``unit`` (an index into the unit list)."""

    unit: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RankPlan:
    """One rank's stream of users for one pass: pieces in order, grouped into windows."""

    pieces: tuple[Piece, ...]
    window_groups: int

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)

    def windows(self) -> list[tuple[Piece, ...]]:
        w = self.window_groups
        return [self.pieces[i : i + w] for i in range(0, len(self.pieces), w)]

    def window_starts(self) -> np.ndarray:
        """Stream position of each window's first row, then the total: [num_windows + 1]."""
        sizes = [sum(p.rows for p in window) for window in self.windows()]
        return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


@dataclass(frozen=True)
class TrainPlan(RankPlan):
    """A rank's training epoch: its stream, spread over ``steps`` local batches."""

    steps: int = 1

    def step_bounds(self, step: int) -> tuple[int, int]:
        """Stream positions ``[lo, hi)`` of local batch ``step`` (sizes differ by at most 1)."""
        n = self.rows
        return step * n // self.steps, (step + 1) * n // self.steps


def steps_per_epoch(num_users: int, batch_size: int) -> int:
    """Optimizer steps per epoch, the same on every rank: ``ceil(U / B_global)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return math.ceil(num_users / batch_size)


def epoch_order(num_units: int, *, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the work units for ``epoch``: [num_units] indices."""
    return np.random.default_rng([_SEED_EPOCH_ORDER, seed, epoch]).permutation(num_units)


def window_order(rows: int, *, seed: int, epoch: int, rank: int, window: int) -> np.ndarray:
    """The shuffle of one window's rows: [rows] indices into the window."""
    return np.random.default_rng([_SEED_WINDOW, seed, epoch, rank, window]).permutation(rows)


def cut(
    units: Sequence[RowGroup], order: Sequence[int] | np.ndarray, *, rank: int, world: int
) -> tuple[Piece, ...]:
    """Rank ``rank``'s part of the units laid end to end in ``order``.

    The stream of U rows is cut at ``r·U // world``: parts differ by at most one row, and a
    unit on a cut is split between the two ranks that share it.
    """
    _check_rank(rank, world)
    total = sum(units[u].rows for u in order)
    lo, hi = rank * total // world, (rank + 1) * total // world
    pieces, offset = [], 0
    for u in order:
        rows = units[u].rows
        start, stop = max(lo - offset, 0), min(hi - offset, rows)
        if start < stop:
            pieces.append(Piece(unit=int(u), start=start, stop=stop))
        offset += rows
        if offset >= hi:
            break
    return tuple(pieces)


def train_plan(
    units: Sequence[RowGroup],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    batch_size: int,
    window_groups: int = WINDOW_GROUPS,
) -> TrainPlan:
    """Rank ``rank``'s training epoch (see the module docstring)."""
    total = sum(u.rows for u in units)
    steps = steps_per_epoch(total, batch_size)
    if total // world < steps:
        raise DatasetError(
            f"{total} users cannot fill {steps} steps (batch_size={batch_size}) on {world} ranks "
            f"with at least one user per rank and step; use a smaller world or a larger batch"
        )
    pieces = cut(units, epoch_order(len(units), seed=seed, epoch=epoch), rank=rank, world=world)
    return TrainPlan(pieces=pieces, window_groups=window_groups, steps=steps)


def eval_plan(
    units: Sequence[RowGroup], *, rank: int, world: int, window_groups: int = WINDOW_GROUPS
) -> RankPlan:
    """Rank ``rank``'s evaluation share: units in manifest order, cut into equal parts."""
    return RankPlan(
        pieces=cut(units, range(len(units)), rank=rank, world=world), window_groups=window_groups
    )


def sample_positions(units: Sequence[RowGroup], *, count: int, seed: int) -> dict[int, np.ndarray]:
    """The k-means sample: sorted row indices per unit, a function of (layout, count, seed) only.

    Whole units are drawn in a seeded random order until they hold ``SAMPLE_SPREAD x count``
    users (or all of them); ``count`` users are then drawn uniformly from those. What is read is
    bounded by the sample size, not by the number of users; when the dataset is smaller than
    the spread, the sample is uniform over all users.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng([_SEED_SAMPLE, seed])
    chosen, held = [], 0
    for u in rng.permutation(len(units)):
        if held >= SAMPLE_SPREAD * count:
            break
        if units[u].rows:
            chosen.append(int(u))
            held += units[u].rows
    picks = np.sort(rng.choice(held, size=min(count, held), replace=False))
    starts = np.cumsum([0] + [units[u].rows for u in chosen])
    out: dict[int, np.ndarray] = {}
    for i, u in enumerate(chosen):
        mine = picks[(picks >= starts[i]) & (picks < starts[i + 1])] - starts[i]
        if len(mine):
            out[u] = mine.astype(np.int64)
    return out


def _check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")


# --- rows in memory ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserRows:
    """Users read from the stream: ids [n] and full item sequences (int64, time order)."""

    user_ids: np.ndarray
    sequences: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.sequences)


@dataclass
class _Block:
    """Decoded users, contiguous: ids [n], offsets [n + 1] into values (int64 items)."""

    user_ids: np.ndarray
    offsets: np.ndarray
    values: np.ndarray
    order: np.ndarray | None = None  # the window's shuffle (rows in stream order), or None

    @property
    def rows(self) -> int:
        return len(self.user_ids)

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Copies of the given rows (so the block can be freed while the batch lives)."""
        off, vals = self.offsets, self.values
        return self.user_ids[rows], [vals[off[i] : off[i + 1]].copy() for i in rows]

    @staticmethod
    def concat(blocks: Sequence[_Block]) -> _Block:
        lengths = np.concatenate([np.diff(b.offsets) for b in blocks])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return _Block(
            user_ids=np.concatenate([b.user_ids for b in blocks]),
            offsets=offsets,
            values=np.concatenate([b.values for b in blocks]),
        )


@dataclass
class StreamStats:
    """IO counters of one ``StreamingDataset`` (all passes so far)."""

    row_groups_read: int = 0
    rows_decoded: int = 0
    peak_windows_held: int = 0  # the most windows alive at once in any pass
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_read(self, rows: int) -> None:
        with self._lock:
            self.row_groups_read += 1
            self.rows_decoded += rows

    def count_held(self, held: int) -> None:
        with self._lock:
            self.peak_windows_held = max(self.peak_windows_held, held)


class _Prefetcher:
    """Runs ``load(i)`` for each of ``indices`` in a background thread, in order.

    At most ``1 + ahead`` loaded results are alive at once: the one the consumer uses and
    ``ahead`` read in advance. The consumer calls ``release()`` when it is done with one. An
    exception in ``load`` is raised in the consumer by the ``get()`` that would have returned it.
    """

    def __init__(
        self, load: Callable[[int], Any], indices: Sequence[int], *, ahead: int, stats: StreamStats
    ) -> None:
        self._load, self._indices, self._stats = load, list(indices), stats
        self._slots = threading.Semaphore(1 + ahead)
        self._results: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._held = 0
        self._held_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="stream-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i in self._indices:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                with self._held_lock:
                    self._held += 1
                    self._stats.count_held(self._held)
                self._results.put((True, self._load(i)))
        except BaseException as exc:  # handed to the consumer, re-raised there
            self._results.put((False, exc))

    def get(self) -> Any:
        ok, value = self._results.get()
        if not ok:
            raise value
        return value

    def release(self) -> None:
        with self._held_lock:
            self._held -= 1
        self._slots.release()

    def close(self) -> None:
        self._stop.set()
        self._slots.release()  # wake the thread if it waits for a slot
        self._thread.join()

    def __enter__(self) -> _Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the dataset ------------------------------------------------------------------------------


class StreamingDataset:
    """A prepared dataset read in row groups, each rank reading only its share.

    ``open`` reads the manifest and every file's footer (metadata only) and checks them against
    each other; the passes (``train_batches``, ``eval_sequences``, ``sample_sequences``) then
    read only the row groups of this rank's plan.
    """

    def __init__(
        self,
        url: str,
        info: DatasetInfo,
        units: Sequence[RowGroup],
        metadata: Sequence[pq.FileMetaData],
        *,
        window_groups: int = WINDOW_GROUPS,
        prefetch: int = PREFETCH_WINDOWS,
    ) -> None:
        if window_groups < 1 or prefetch < 0:
            raise ValueError(
                f"window_groups must be >= 1 and prefetch >= 0, got {window_groups}, {prefetch}"
            )
        self.url = url
        self.info = info
        self.units: tuple[RowGroup, ...] = tuple(units)
        self.window_groups = window_groups
        self.prefetch = prefetch
        self.stats = StreamStats()
        self._metadata = list(metadata)
        self._fs, self._root = _fs_and_root(url)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        info: DatasetInfo | None = None,
        window_groups: int = WINDOW_GROUPS,
        prefetch: int = PREFETCH_WINDOWS,
    ) -> StreamingDataset:
        """Read the manifest at ``url`` (or take ``info``, the one a caller has already read
        from it, so both work from the same manifest) and list the row groups of every file it
        names.

        Raises ``DatasetError`` (naming the file) when a file is missing, its size or its row
        count differs from the manifest, or its columns are not (user_id int64, items
        list<int32>). Checksums are not verified here: that would read every file on every rank
        (``verify_checksums`` splits that read over the ranks).
        """
        if info is None:
            info = read_info(url)
        fs, root = _fs_and_root(url)
        jobs = [(posixpath.join(root, entry.path), entry) for entry in info.files]
        with ThreadPoolExecutor(max_workers=max(1, min(FOOTER_THREADS, len(jobs)))) as pool:
            metadata = list(pool.map(lambda job: _read_footer(fs, *job), jobs))
        units = [
            RowGroup(file=f, index=g, rows=meta.row_group(g).num_rows)
            for f, meta in enumerate(metadata)
            for g in range(meta.num_row_groups)
        ]
        return cls(url, info, units, metadata, window_groups=window_groups, prefetch=prefetch)

    @property
    def num_users(self) -> int:
        return self.info.num_users

    def verify_checksums(self, *, rank: int, world: int) -> list[str]:
        """Hash this rank's share of the files (file i for i % world == rank: over all ranks every
        file is read once) and compare each with the manifest's sha256; returns what differs.

        The manifest holds one sha256 per whole file, while training reads row groups in a
        shuffled order, so the check is one read of the files before training: a flipped byte
        that leaves sizes and footers intact would otherwise train on changed item ids.
        """
        _check_rank(rank, world)
        mine = [entry for i, entry in enumerate(self.info.files) if i % world == rank]

        def check(entry: FileEntry) -> str | None:
            path = posixpath.join(self._root, entry.path)
            digest = sha256_of(self._fs, path)
            if digest == entry.sha256:
                return None
            return (f"{path}: sha256 {digest[:16]}... differs from the manifest's "
                    f"{entry.sha256[:16]}... (the file changed or is corrupt)")

        with ThreadPoolExecutor(max_workers=max(1, min(CHECKSUM_THREADS, len(mine)))) as pool:
            return [problem for problem in pool.map(check, mine) if problem is not None]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps per epoch for a global batch of ``batch_size`` users (any world)."""
        return steps_per_epoch(self.num_users, batch_size)

    def train_plan(
        self, *, epoch: int, rank: int, world: int, batch_size: int, seed: int
    ) -> TrainPlan:
        return train_plan(
            self.units, seed=seed, epoch=epoch, rank=rank, world=world, batch_size=batch_size,
            window_groups=self.window_groups,
        )

    def eval_plan(self, *, rank: int, world: int) -> RankPlan:
        return eval_plan(self.units, rank=rank, world=world, window_groups=self.window_groups)

    # --- passes -------------------------------------------------------------------------------

    def train_batches(
        self, *, epoch: int, rank: int, world: int, batch_size: int, seed: int, start_step: int = 0
    ) -> Iterator[tuple[int, UserRows]]:
        """This rank's local batches of ``epoch``: ``(step, users)`` for step ``start_step`` on.

        ``batch_size`` is the global batch (summed over ranks). Every rank yields
        ``steps_per_epoch(batch_size)`` batches (fewer when resuming); starting at ``start_step``
        yields exactly the batches an uninterrupted epoch yields from that step on.
        """
        plan = self.train_plan(
            epoch=epoch, rank=rank, world=world, batch_size=batch_size, seed=seed
        )
        if not 0 <= start_step <= plan.steps:
            raise ValueError(f"start_step {start_step} is outside the epoch's {plan.steps} steps")
        spans = [plan.step_bounds(s) for s in range(start_step, plan.steps)]

        def shuffle(window: int, rows: int) -> np.ndarray:
            return window_order(rows, seed=seed, epoch=epoch, rank=rank, window=window)

        batches = self._stream(plan, spans, shuffle)
        try:  # closing this generator early stops the read-ahead thread at once
            yield from enumerate(batches, start=start_step)
        finally:
            batches.close()

    def eval_sequences(
        self, *, rank: int, world: int, batch_size: int = 1024
    ) -> Iterator[UserRows]:
        """This rank's evaluation share in chunks of ``batch_size`` users (the last may be smaller).

        The shares of ranks ``0..world-1`` are disjoint and together hold every user once.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        plan = self.eval_plan(rank=rank, world=world)
        n = plan.rows
        spans = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
        yield from self._stream(plan, spans, None)

    def sample_sequences(self, *, rank: int, world: int, count: int, seed: int) -> UserRows:
        """This rank's part of a bounded random sample of about ``count`` users (k-means start).

        The sample (``sample_positions``) depends only on (dataset, count, seed); each rank
        returns the sampled users inside its evaluation share, so the union over ranks is the
        whole sample, in manifest order, whatever the world size, and each rank reads only
        row groups of its own share that hold sampled users.
        """
        wanted = sample_positions(self.units, count=count, seed=seed)
        ids: list[np.ndarray] = []
        seqs: list[np.ndarray] = []
        for piece in self.eval_plan(rank=rank, world=world).pieces:
            rows = wanted.get(piece.unit)
            if rows is None:
                continue
            rows = rows[(rows >= piece.start) & (rows < piece.stop)]
            if len(rows):
                block = self._read_piece(Piece(piece.unit, 0, self.units[piece.unit].rows))
                got_ids, got_seqs = block.take(rows)
                ids.append(got_ids)
                seqs.extend(got_seqs)
        user_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        return UserRows(user_ids=user_ids, sequences=seqs)

    # --- reading ------------------------------------------------------------------------------

    def _stream(
        self,
        plan: RankPlan,
        spans: Sequence[tuple[int, int]],
        shuffle: Callable[[int, int], np.ndarray] | None,
    ) -> Generator[UserRows, None, None]:
        """The users at stream positions ``[lo, hi)`` of ``plan``, for each span in order.

        Spans are contiguous and increasing. Reading starts at the window that holds the first
        span's first row and runs ``self.prefetch`` windows ahead in a background thread.
        """
        if not spans:
            return
        windows, starts = plan.windows(), plan.window_starts()
        first = int(np.searchsorted(starts, spans[0][0], side="right")) - 1

        def load(w: int) -> _Block:
            block = _Block.concat([self._read_piece(p) for p in windows[w]])
            if shuffle is not None:
                block.order = shuffle(w, block.rows)
            return block

        with _Prefetcher(
            load, range(first, len(windows)), ahead=self.prefetch, stats=self.stats
        ) as ahead:
            w, block = first, ahead.get()
            for lo, hi in spans:
                ids: list[np.ndarray] = []
                seqs: list[np.ndarray] = []
                pos = lo
                while pos < hi:
                    if pos >= starts[w + 1]:  # this window is used up: hand it back, take the next
                        ahead.release()
                        w, block = w + 1, ahead.get()
                        continue
                    a, b = pos - starts[w], min(hi, starts[w + 1]) - starts[w]
                    rows = block.order[a:b] if block.order is not None else np.arange(a, b)
                    got_ids, got_seqs = block.take(rows)
                    ids.append(got_ids)
                    seqs.extend(got_seqs)
                    pos += b - a
                yield UserRows(user_ids=np.concatenate(ids), sequences=seqs)

    def _read_piece(self, piece: Piece) -> _Block:
        """Rows ``[start, stop)`` of one row group, decoded and checked."""
        unit = self.units[piece.unit]
        path = posixpath.join(self._root, self.info.files[unit.file].path)
        table = self._read_row_group(unit)
        self.stats.count_read(table.num_rows)
        if table.num_rows != unit.rows:
            raise DatasetError(
                f"{path}: row group {unit.index} has {table.num_rows} rows, "
                f"its footer says {unit.rows}"
            )
        table = table.slice(piece.start, piece.rows)
        items = table.column("items")
        lengths = pc.list_value_length(items)
        if lengths.null_count or pc.list_flatten(items).null_count:
            raise DatasetError(f"{path}: row group {unit.index} holds null item lists or items")
        lens = lengths.to_numpy().astype(np.int64)
        user_ids = table.column("user_id").to_numpy()
        short = np.flatnonzero(lens < MIN_ITEMS)
        if len(short):
            i = int(short[0])
            raise DatasetError(
                f"{path}: row group {unit.index}: "
                f"user {int(user_ids[i])} has {int(lens[i])} items; "
                f"at least {MIN_ITEMS} are needed (train, valid and test targets)"
            )
        values = pc.list_flatten(items).to_numpy().astype(np.int64)
        if len(values) and (values.min() < 1 or values.max() > self.info.num_items):
            raise DatasetError(
                f"{path}: row group {unit.index} holds item ids outside 1..{self.info.num_items}"
            )
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        return _Block(user_ids=user_ids.astype(np.int64), offsets=offsets, values=values)

    def _read_row_group(self, unit: RowGroup) -> pa.Table:
        """One whole row group, in one ranged read (the footer is already known)."""
        entry = self.info.files[unit.file]
        path = posixpath.join(self._root, entry.path)
        # cache_type "none": read exactly the row group's bytes (s3fs would otherwise read
        # ahead a 50 MB block); ``size`` spares a metadata request. Local files ignore both.
        with self._fs.open(path, "rb", cache_type="none", size=entry.bytes) as handle:
            parquet = pq.ParquetFile(handle, metadata=self._metadata[unit.file], pre_buffer=True)
            return parquet.read_row_group(unit.index, columns=["user_id", "items"])


def _read_footer(fs: fsspec.AbstractFileSystem, path: str, entry: FileEntry) -> pq.FileMetaData:
    """The Parquet footer of one listed file, checked against its manifest entry."""
    try:
        size = int(fs.info(path)["size"])
    except FileNotFoundError:
        raise DatasetError(f"{path}: listed in the manifest, but missing") from None
    if size != entry.bytes:
        raise DatasetError(f"{path}: {size} bytes, manifest says {entry.bytes}")
    with fs.open(path, "rb", cache_type="none", size=size) as handle:
        try:
            meta = pq.ParquetFile(handle).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"{path}: not a readable Parquet file: {exc}") from exc
    if meta.num_rows != entry.rows:
        raise DatasetError(f"{path}: {meta.num_rows} rows in the file, manifest says {entry.rows}")
    schema = meta.schema.to_arrow_schema()
    names = set(schema.names)
    if not {"user_id", "items"} <= names or not (
        pa.types.is_int64(schema.field("user_id").type)
        and pa.types.is_list(schema.field("items").type)
        and pa.types.is_int32(schema.field("items").type.value_type)
    ):
        raise DatasetError(
            f"{path}: columns are {schema}, expected user_id int64 and items list<int32>"
        )
    return meta
