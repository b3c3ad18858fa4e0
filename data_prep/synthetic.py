"""A synthetic prepared dataset with planted intents, for the quick start and for tests.

    python -m data_prep.synthetic --output data/synthetic [--users 4000] [--items 600]
        [--intents 8] [--min-len 8] [--max-len 40] [--noise 0.1] [--seed 0] [--shards 2]

    python -m data_prep.synthetic --raw-log --output logs/demo --interactions 1000000 ...
        raw interaction logs instead, for ``python -m data_prep.build``
        (``data_prep.synthetic_logs``)

Generation (all draws from one ``numpy.random.Generator(PCG64(seed))``, so a seed fixes the
bytes written):

- Items 1..N are cut into K contiguous slices, one per intent, sizes differing by at most one
  (``slice_bounds``). Every user has one planted intent, drawn uniformly.
- A user's sequence is a walk inside their slice: a uniform start, then each step moves 1, 2 or
  3 places forward (``WALK_STEPS``), wrapping inside the slice. The walk's transition matrix is
  circulant, so its stationary distribution is uniform: no item of a slice is more popular than
  another, and a most-popular ranking does badly while "the walk successors of the last item"
  does well. A sequential model has a clear signal to beat popularity with, and users of one
  intent share their items, so their pooled embeddings can cluster by intent.
- With probability ``noise`` each position shows an item drawn uniformly from the whole
  catalogue instead of the walk's item; the walk itself carries on underneath (the noise item
  replaces one emission, it does not move the walk).
- User ids are 1..U; sequence lengths are uniform in [min_len, max_len].

Besides the prepared dataset, the folder holds ``planted_intents.parquet`` (user_id int64,
intent int32), written before the manifest commits the folder; the manifest's ``extra`` names it
with its sha256 (``read_planted`` checks it).

Errors (bad arguments, an existing dataset at ``--output``) go to stderr as ``error: ...`` with
exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import posixpath
import sys
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.benchmark import MIN_ITEMS
from data_prep.writer import PrepError, write_prepared_dataset
from elcrec_dist.planted import PLANTED_SCHEMA

PLANTED_NAME = "planted_intents.parquet"
GENERATOR_NAME = "intent-walk-v1"  # bump when the draws change: same name + seed -> same data
WALK_STEPS = (1, 2, 3)  # from slice position p the walk goes to p+1, p+2 or p+3 (mod slice size)
MIN_SLICE = max(WALK_STEPS) + 1  # successors distinct from each other and from the item itself


@dataclass(frozen=True)
class SyntheticSpec:
    """The generator's arguments, validated."""

    users: int = 4000
    items: int = 600
    intents: int = 8
    min_len: int = 8
    max_len: int = 40
    noise: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if self.users < 1:
            raise PrepError(f"--users must be >= 1, got {self.users}")
        if self.intents < 1:
            raise PrepError(f"--intents must be >= 1, got {self.intents}")
        if self.items < MIN_SLICE * self.intents:
            raise PrepError(
                f"--items {self.items} is too few for --intents {self.intents}: each intent's "
                f"slice needs at least {MIN_SLICE} items (--items >= {MIN_SLICE * self.intents})"
            )
        if self.items > np.iinfo(np.int32).max:
            raise PrepError(f"--items {self.items} does not fit int32 item ids")
        if self.min_len < MIN_ITEMS:
            raise PrepError(
                f"--min-len must be >= {MIN_ITEMS} (train, valid and test targets), "
                f"got {self.min_len}"
            )
        if self.max_len < self.min_len:
            raise PrepError(f"--max-len {self.max_len} is below --min-len {self.min_len}")
        if not (math.isfinite(self.noise) and 0.0 <= self.noise <= 1.0):
            raise PrepError(f"--noise must be in [0, 1], got {self.noise}")
        if self.seed < 0:
            raise PrepError(f"--seed must be >= 0, got {self.seed}")
        if self.users * self.max_len > np.iinfo(np.int32).max:
            # list<int32> offsets of one Arrow table; the real data path shards before this.
            raise PrepError(
                f"--users {self.users} x --max-len {self.max_len} may exceed 2^31 - 1 interactions"
            )


def slice_bounds(items: int, intents: int) -> np.ndarray:
    """Slice edges [K + 1]: intent k owns items ``bounds[k] + 1 .. bounds[k + 1]`` (1-based ids)."""
    return (np.arange(intents + 1, dtype=np.int64) * items) // intents


def _generate_flat(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids [U] int64, all items [L] int32, offsets [U + 1] int64, intents [U] int32).

    User u's sequence is ``items[offsets[u]:offsets[u + 1]]``. The draws and their order are fixed
    and do not depend on ``noise`` (so two noise levels share the same walks).
    """
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    u = spec.users
    bounds = slice_bounds(spec.items, spec.intents)
    sizes = np.diff(bounds)  # [K]

    intents = rng.integers(0, spec.intents, size=u)  # [U]
    lengths = rng.integers(spec.min_len, spec.max_len + 1, size=u)  # [U]
    starts = rng.integers(0, sizes[intents])  # [U], uniform position inside the user's slice
    offsets = np.zeros(u + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    steps = rng.choice(np.asarray(WALK_STEPS, dtype=np.int64), size=total)  # [L]
    is_noise = rng.random(total) < spec.noise  # [L]
    noise_items = rng.integers(1, spec.items + 1, size=total)  # [L]

    # Walk positions by one global cumsum: the first step of each user is its start position,
    # and each user's running sum is taken relative to the sum before its first token.
    firsts = offsets[:-1]
    steps[firsts] = starts
    running = np.cumsum(steps)  # [L]
    owner = np.repeat(np.arange(u), lengths)  # [L] user index of each token
    local = running - (running[firsts] - starts)[owner]  # [L] walk advance since the user's start
    walk = bounds[intents][owner] + 1 + local % sizes[intents][owner]  # [L] item ids
    items = np.where(is_noise, noise_items, walk).astype(np.int32)
    user_ids = np.arange(1, u + 1, dtype=np.int64)
    return user_ids, items, offsets, intents.astype(np.int32)


def generate(
    users: int = 4000,
    items: int = 600,
    intents: int = 8,
    *,
    min_len: int = 8,
    max_len: int = 40,
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Planted-intent sequences: (user ids [U] int64, sequences (int32, time order), intents [U]).

    Raises ``PrepError`` for bad arguments. See the module docstring for the generative process.
    """
    spec = SyntheticSpec(users, items, intents, min_len, max_len, noise, seed)
    user_ids, flat, offsets, planted = _generate_flat(spec)
    return user_ids, np.split(flat, offsets[1:-1]), planted


def _planted_bytes(user_ids: np.ndarray, intents: np.ndarray) -> bytes:
    table = pa.table(
        {"user_id": pa.array(user_ids, pa.int64()), "intent": pa.array(intents, pa.int32())},
        schema=PLANTED_SCHEMA,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=True, store_schema=True)
    return sink.getvalue().to_pybytes()


def write_synthetic(url: str, spec: SyntheticSpec, *, shards: int = 2) -> dict:
    """Generate and write the dataset and its planted-intent sidecar; returns the manifest."""
    spec.validate()
    if shards < 1:
        raise PrepError(f"--shards must be >= 1, got {shards}")
    user_ids, flat, offsets, intents = _generate_flat(spec)
    table = pa.table(
        {
            "user_id": pa.array(user_ids, pa.int64()),
            "items": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat)),
        }
    )
    sidecar = _planted_bytes(user_ids, intents)

    def write_sidecar(fs: fsspec.AbstractFileSystem, root: str) -> None:
        with fs.open(posixpath.join(root, PLANTED_NAME), "wb") as handle:
            handle.write(sidecar)

    extra = {
        "source": "synthetic",
        "generator": GENERATOR_NAME,
        "users": spec.users,
        "items": spec.items,
        "intents": spec.intents,
        "min_len": spec.min_len,
        "max_len": spec.max_len,
        "noise": spec.noise,
        "seed": spec.seed,
        "walk_steps": list(WALK_STEPS),
        "planted_intents_file": PLANTED_NAME,
        "planted_intents_sha256": hashlib.sha256(sidecar).hexdigest(),
    }
    return write_prepared_dataset(
        url, table, num_items=spec.items, shards=shards, extra=extra, before_commit=write_sidecar
    )


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    if "--raw-log" in given:  # raw logs: their own generator and options
        from data_prep.synthetic_logs import main as raw_log_main

        return raw_log_main([a for a in given if a != "--raw-log"])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = SyntheticSpec()
    parser.add_argument(
        "--raw-log",
        action="store_true",
        help="write raw interaction logs instead "
        "(options: python -m data_prep.synthetic_logs --help)",
    )
    parser.add_argument("--output", required=True, help="output folder (local or URL)")
    parser.add_argument("--users", type=int, default=defaults.users, help="number of users")
    parser.add_argument("--items", type=int, default=defaults.items, help="catalogue size N")
    parser.add_argument("--intents", type=int, default=defaults.intents, help="planted intents K")
    parser.add_argument("--min-len", type=int, default=defaults.min_len, help="shortest sequence")
    parser.add_argument("--max-len", type=int, default=defaults.max_len, help="longest sequence")
    parser.add_argument(
        "--noise", type=float, default=defaults.noise, help="share of off-walk random items"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generator seed")
    parser.add_argument("--shards", type=int, default=2, help="number of Parquet files")
    args = parser.parse_args(argv)
    spec = SyntheticSpec(
        users=args.users,
        items=args.items,
        intents=args.intents,
        min_len=args.min_len,
        max_len=args.max_len,
        noise=args.noise,
        seed=args.seed,
    )
    try:
        manifest = write_synthetic(args.output, spec, shards=args.shards)
    except PrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: {manifest['num_users']} users, {manifest['num_items']} items, "
        f"{manifest['num_interactions']} interactions, {spec.intents} planted intents "
        f"({PLANTED_NAME})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
