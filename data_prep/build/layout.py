"""Where each stage keeps its files (relative names), in the work folder and in the output.

Work folder (``work_dir``, default ``OUTPUT/_work``; shared by all workers, removed by commit)::

    plan.json
    map/w00000-of-00002/run-00000.arrow      rows u, i, t[, e] of one run, one batch per bucket
    map/w00000-of-00002/users-00000.arrow    string user ids of that run (key, text), per bucket
    map/w00000-of-00002/items.arrow          distinct item keys (and texts) seen by the worker
    map/w00000-of-00002.done.json            written last: runs, rows per bucket, counts
    items.arrow, items.done.json             all items in natural order (their rank = position)
    reduce/b00000.users.arrow, .items.arrow  a bucket: users in natural order, item ranks in
    reduce/b00000.done.json                  time order (deduplicated)
    kcore/alive-b00000.npy, item_ids.npy     what k-core kept; kcore.done.json
    write/s00000.done.json                   a written shard: rows, bytes, sha256, stats

Output folder::

    part-00000-of-00001.parquet              the dataset (user_id int64, items list<int32>)
    item_map.parquet                         original item id -> item id (1..N)
    user_map/part-00000-of-00001.parquet     original user id -> user_id, per shard
    quarantine/part-w00000-of-00002.parquet  rejected rows with a reason, per map worker
    stats.json
    manifest.json                            written last
"""

from __future__ import annotations

from data_prep.writer import shard_name


def map_dir(worker: int, workers: int) -> str:
    return f"map/w{worker:05d}-of-{workers:05d}"


def map_done(worker: int, workers: int) -> str:
    return f"{map_dir(worker, workers)}.done.json"


def quarantine_name(worker: int, workers: int) -> str:
    return f"quarantine/part-w{worker:05d}-of-{workers:05d}.parquet"


def reduce_name(bucket: int, what: str) -> str:
    return f"reduce/b{bucket:05d}.{what}"


def alive_name(bucket: int) -> str:
    return f"kcore/alive-b{bucket:05d}.npy"


def write_done(shard: int) -> str:
    return f"write/s{shard:05d}.done.json"


def user_map_name(shard: int, shards: int) -> str:
    return f"user_map/{shard_name(shard, shards)}"


ITEMS = "items.arrow"
ITEMS_DONE = "items.done.json"
KCORE_DONE = "kcore.done.json"
ITEM_IDS = "kcore/item_ids.npy"
ITEM_MAP = "item_map.parquet"
STATS = "stats.json"
