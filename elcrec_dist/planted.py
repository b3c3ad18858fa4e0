"""The planted-intent sidecar of a synthetic dataset: which intent each user was generated from.

Written by ``data_prep.synthetic`` (before the manifest commits the folder, which names the
file with its sha256); read here, by training diagnostics (``elcrec_dist.diagnostics``) and
tests, so the library does not depend on the data-preparation package.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from elcrec_dist.prepared import DatasetError, _fs_and_root, read_info

PLANTED_SCHEMA = pa.schema([("user_id", pa.int64()), ("intent", pa.int32())])


class PlantedIntents(NamedTuple):
    """Planted intent per user of a synthetic dataset, sorted by user id.

    A plain pair, so ``dict(zip(*planted))`` gives a {user_id: intent} mapping too.
    """

    user_ids: np.ndarray  # [U] int64, ascending
    intents: np.ndarray  # [U] int32, in 0..K-1

    def for_users(self, user_ids: np.ndarray) -> np.ndarray:
        """Intents [B] int32 of the given user ids (any order); an unknown id is a KeyError."""
        ids = np.asarray(user_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.user_ids, ids), len(self.user_ids) - 1)
        missing = self.user_ids[pos] != ids
        if missing.any():
            raise KeyError(f"no planted intent for user id {int(ids[missing][0])}")
        return self.intents[pos]


def read_planted(url: str) -> PlantedIntents | None:
    """The planted intents of the dataset at ``url``, checked against its manifest.

    None when the manifest names no planted-intent file (e.g. a benchmark import): having no
    planted intents is a normal state, not an error. A named file that is missing, changed or
    malformed is a ``DatasetError``, as is a folder without a manifest.
    """
    info = read_info(url)  # the manifest commits the folder: no manifest, no sidecar to trust
    extra = dict(info.extra)
    name = extra.get("planted_intents_file")
    if not name:
        return None
    fs, root = _fs_and_root(url)
    path = posixpath.join(root, name)
    if not fs.exists(path):
        raise DatasetError(f"{url}: manifest names {name}, which is missing")
    with fs.open(path, "rb") as handle:
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != extra.get("planted_intents_sha256"):
        raise DatasetError(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    table = pq.read_table(pa.BufferReader(data))
    if table.schema != PLANTED_SCHEMA:
        raise DatasetError(f"{path}: schema {table.schema} is not {PLANTED_SCHEMA}")
    user_ids = table.column("user_id").to_numpy()
    intents = table.column("intent").to_numpy()
    order = np.argsort(user_ids, kind="stable")
    return PlantedIntents(user_ids=user_ids[order], intents=intents[order])
