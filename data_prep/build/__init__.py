"""Raw interaction logs -> validated, user-sharded prepared dataset (``python -m data_prep.build``).

Input: (user, item, time[, event], ...) rows as Parquet, CSV, TSV or NDJSON (gzip or not), in a
local folder or under ``s3://`` (credentials and endpoint from the environment, e.g.
``AWS_ENDPOINT_URL``), string or integer ids. Output: the prepared dataset the trainer reads
(``elcrec_dist.prepared``: shards + ``manifest.json``, written last), plus ``stats.json``, the id
maps and a quarantine of rejected rows with a reason each.

Why stages: building per-user lists is a group-by over all rows, which does not fit in memory at
billions of rows. So the build buckets first and never holds more than one bucket:

    plan    list and probe the inputs, reconcile column types, fix the bucket count (plan.py)
    map     per input share: validate rows, hash users to buckets, write runs  (mapper.py)
    reduce  per bucket: order each user's history, deduplicate, compact        (reducer.py)
    kcore   passes over the compact buckets until no user or item is removed  (kcore.py)
    write   per shard: k-core survivors, item ids, truncation -> Parquet      (shards.py)
    commit  stats.json, then manifest.json, then remove the work folder       (commit.py)

Global facts are small (an id and a count per item; a flag per user) and computed by passes over
the buckets. Each unit writes a done marker last and is skipped on a rerun, so a killed build,
run again, finishes with the same bytes it would have written in one go. ``runner.py`` runs the
stages on one machine (processes, progress bars) or one stage as one Kubernetes worker.

Determinism: outputs depend on the data and the config only, never on file order, worker counts
or timing: users are ordered by natural order of their ids inside a bucket, histories by (time,
item id[, event]), item ids by natural order of the original ids (``keys.py``).
"""
