"""Ids as 64-bit keys, the bucket of a user, and the natural order of original ids.

Within a build every id travels as an int64 *key*: an integer id is its own key (so is a user
id string that is a plain decimal integer); another string id's key is a 64-bit hash of its
text (Polars' hash with fixed seeds: deterministic for one Polars version, which the plan
records and every stage checks). Hash collisions are not assumed away.

Collisions are found with a second, independent hash (``check``): the tables of distinct ids
that stages pass on hold one (key, check, text) row per distinct (key, check) pair, so two texts
with one key keep two rows, and the stage that needs one row per key (the item table, a
bucket's users) fails naming both texts. Only a collision in both hashes would go unseen.

The *natural order* of original ids, used for the item id map and the order of users inside a
bucket: ids that are plain decimal integers first, by value, then every other string by its
UTF-8 bytes. For integer columns it is simply numeric order.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from data_prep.writer import PrepError

HASH_SEED = 0x5EED_E1C2
CHECK_SEED = 0xC4EC_0B57  # a second, independent hash: same key + other check = collision
_MIX = np.uint64(0x9E3779B97F4A7C15)
CANONICAL_INT = r"^(0|-?[1-9][0-9]*)$"


def string_keys(values: pl.Series, *, integers_by_value: bool = False) -> np.ndarray:
    """[n] string ids -> [n] int64 keys.

    With ``integers_by_value``, a plain decimal integer's key is its value, as for an integer
    column: user ``"42"`` in a CSV then lands in the same bucket, and shard, as user 42 in a
    Parquet file or a benchmark file.
    """
    keys = values.hash(HASH_SEED).to_numpy().view(np.int64)
    if integers_by_value:
        ints = values.str.to_integer(strict=False)
        if ints.null_count() < len(ints):  # some ids parse as integers; keep the plain ones
            plain = (
                (ints.is_not_null() & (ints.cast(pl.String) == values)).fill_null(False).to_numpy()
            )
            keys = np.where(plain, ints.fill_null(0).to_numpy(), keys)
    return keys


def bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """[n] int64 user keys -> [n] uint16 buckets: ``writer.shard_of(keys, buckets)``.

    For an integer user id, bucket = ``shard_of(user_id, buckets)``; with ``buckets`` a multiple
    of ``shards``, bucket % shards is the shard the benchmark import would choose. Computed in
    place on one buffer (the same splitmix finaliser, without the temporaries).
    """
    x = keys.astype(np.uint64)  # a copy we may overwrite
    tmp = np.empty_like(x)
    with np.errstate(over="ignore"):
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            np.right_shift(x, np.uint64(shift), out=tmp)
            np.bitwise_xor(x, tmp, out=x)
            np.multiply(x, np.uint64(factor), out=x)
        np.right_shift(x, np.uint64(31), out=tmp)
        np.bitwise_xor(x, tmp, out=x)
    np.remainder(x, np.uint64(buckets), out=x)
    return x.astype(np.uint16)


def canonical_ints(originals: pl.Series) -> pl.Series:
    """Int64 value of each original that is a plain decimal integer fitting int64, else null."""
    values = originals.str.to_integer(strict=False)
    plain = originals.str.contains(CANONICAL_INT)
    return pl.select(pl.when(plain).then(values).otherwise(None)).to_series()


def natural_order(originals: pl.Series) -> np.ndarray:
    """Permutation [n] that sorts distinct string ids into natural order."""
    frame = pl.DataFrame({"orig": originals, "value": canonical_ints(originals)})
    order = frame.with_row_index("pos").sort(
        [pl.col("value").is_null(), "value", "orig"], maintain_order=False
    )
    return order["pos"].to_numpy().astype(np.int64)


TEXTS_SCHEMA = {"key": pl.Int64, "check": pl.Int64, "text": pl.String}


def texts_of(keys: np.ndarray, texts: pl.Series, what: str) -> pl.DataFrame:
    """Distinct ids of a batch: one (key, check, text) row per distinct (key, check) pair."""
    check = texts.hash(CHECK_SEED).to_numpy().view(np.int64)
    frame = pl.DataFrame({"key": keys, "check": check, "text": texts})
    return frame[_pairs(frame).arg_unique()]


def merge_texts(frames: list[pl.DataFrame], what: str) -> pl.DataFrame:
    """Distinct (key, check, text) rows of several tables (one per distinct pair)."""
    if not frames:
        return pl.DataFrame(schema=TEXTS_SCHEMA)
    frame = pl.concat(frames)
    return frame[_pairs(frame).arg_unique()]


def unique_keys(frame: pl.DataFrame, what: str) -> pl.DataFrame:
    """A merged (key, check, text) table, checked: one row per key, else a collision."""
    if frame["key"].n_unique() == frame.height:
        return frame
    clash = frame.filter(pl.col("key").is_duplicated()).sort("key", "text")
    a, b = clash["text"].head(2).to_list()
    raise PrepError(
        f"{what} ids {a!r} and {b!r} have the same 64-bit hash; this build cannot tell them "
        f"apart (astronomically rare: please report it)"
    )


def _pairs(frame: pl.DataFrame) -> pl.Series:
    with np.errstate(over="ignore"):
        pair = frame["key"].to_numpy().view(np.uint64) * _MIX + frame["check"].to_numpy().view(
            np.uint64
        )
    return pl.Series(pair)
