"""Import a benchmark file (one user per line: ``user item item ...``) as a prepared dataset.

    python -m data_prep.benchmark --input ../shared/data/Beauty.txt --output data/beauty

The whole file is parsed and checked before anything is written: a malformed line (a token that
is not a positive integer, a user with fewer than 4 items, a duplicated user id) is an error naming
the file and line, and the output folder is left as it was.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
import pyarrow as pa

from data_prep.writer import PrepError, write_prepared_dataset

MIN_ITEMS = 4  # train needs >= 1 target after holding out valid and test (seq[:-3] -> seq[1:-2])


def parse_benchmark(path: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Parse and validate a benchmark file. Returns (user ids [U], item sequences)."""
    user_ids: list[int] = []
    sequences: list[np.ndarray] = []
    seen: dict[int, int] = {}
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise PrepError(f"{path}: cannot open: {exc.strerror}") from exc
    with handle:
        for lineno, line in enumerate(handle, start=1):
            tokens = line.split()
            if not tokens:
                raise PrepError(f"{path}:{lineno}: empty line")
            bad = next((tok for tok in tokens if not _is_int(tok)), None)
            if bad is not None:
                raise PrepError(f"{path}:{lineno}: {bad!r} is not an integer id")
            values = [int(tok) for tok in tokens]
            user, items = values[0], values[1:]
            if user in seen:
                raise PrepError(
                    f"{path}:{lineno}: user {user} appears again (first on line {seen[user]})"
                )
            seen[user] = lineno
            if len(items) < MIN_ITEMS:
                raise PrepError(
                    f"{path}:{lineno}: user {user} has {len(items)} items; at least {MIN_ITEMS} "
                    f"are needed (train, valid and test targets)"
                )
            if min(items) < 1:
                raise PrepError(f"{path}:{lineno}: item ids must be >= 1 (0 is padding)")
            if max(items) > np.iinfo(np.int32).max:
                raise PrepError(f"{path}:{lineno}: item id {max(items)} does not fit int32")
            user_ids.append(user)
            sequences.append(np.asarray(items, dtype=np.int32))
    if not sequences:
        raise PrepError(f"{path}: no users")
    return np.asarray(user_ids, dtype=np.int64), sequences


_DIGITS = re.compile(r"[0-9]+")


def _is_int(token: str) -> bool:
    """Plain ASCII decimal digits only (``int()`` would also take ``1_0`` or non-ASCII digits)."""
    return _DIGITS.fullmatch(token) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="benchmark file, one user per line")
    parser.add_argument("--output", required=True, help="output folder (local or URL)")
    parser.add_argument("--shards", type=int, default=1, help="number of Parquet files")
    args = parser.parse_args(argv)
    try:
        user_ids, sequences = parse_benchmark(args.input)
        max_item = int(max(int(s.max()) for s in sequences))
        table = pa.table(
            {
                "user_id": pa.array(user_ids, pa.int64()),
                "items": pa.array(sequences, pa.list_(pa.int32())),
            }
        )
        manifest = write_prepared_dataset(
            args.output,
            table,
            num_items=max_item,
            shards=args.shards,
            extra={"source": "benchmark", "input": args.input},
        )
    except PrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: {manifest['num_users']} users, {manifest['num_items']} items, "
        f"{manifest['num_interactions']} interactions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
