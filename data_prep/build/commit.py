"""Commit stage: ``stats.json``, then ``manifest.json`` last, then the work folder goes.

Until the manifest exists a reader refuses the folder (``elcrec_dist.prepared.read_info``), so
a build killed at any point leaves no half dataset, and running the same build again resumes
it. A second run after success finds the manifest with its own fingerprint and does nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from data_prep.build import layout
from data_prep.build.idmap import map_markers
from data_prep.build.kcore import reduced_markers
from data_prep.build.plan import Plan
from data_prep.build.stats import build_stats, check_rejects
from data_prep.build.store import Store, fault
from data_prep.writer import PrepError
from elcrec_dist.prepared import FORMAT_NAME, MANIFEST_NAME, SCHEMA_VERSION, commit_manifest

SOURCE = "raw-log"


def existing_dataset(out: Store, plan_fingerprint: str) -> bool:
    """True when ``out`` already holds this build's dataset; a different dataset is refused."""
    if not out.exists(MANIFEST_NAME):
        return False
    try:
        manifest = out.read_json(MANIFEST_NAME)
    except json.JSONDecodeError:
        manifest = {}
    extra = manifest.get("extra") or {}
    if extra.get("source") == SOURCE and extra.get("fingerprint") == plan_fingerprint:
        return True
    raise PrepError(
        f"{out.show()} already holds a prepared dataset ({MANIFEST_NAME}) from another build; "
        f"remove it or choose another --output"
    )


def run_commit(plan: Plan, work: Store, out: Store) -> dict[str, Any]:
    config = plan.config
    markers = map_markers(work)
    check_rejects(plan, markers)
    reduced = reduced_markers(plan, work)
    kcore = work.read_json(layout.KCORE_DONE)
    written = []
    for shard in range(config.shards):
        if not work.exists(layout.write_done(shard)):
            raise PrepError(
                f"{work.show()}: shard {shard} has not been written; run the write stage first"
            )
        written.append(work.read_json(layout.write_done(shard)))
    for entry in written:  # the shards are still the bytes the writers hashed
        if out.size(entry["path"]) != entry["bytes"]:
            raise PrepError(
                f"{out.show(entry['path'])}: size changed since it was written; rerun the build"
            )

    stats = build_stats(plan, markers, reduced, kcore, written)
    stats["config"] = config.to_dict()
    stats_bytes = (json.dumps(stats, indent=1, sort_keys=True) + "\n").encode()
    out.write_bytes(stats_bytes, layout.STATS)
    quarantine = sorted(m["quarantine"] for m in markers if m["quarantine"])
    _remove_strays(out, written, quarantine)

    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "num_users": sum(int(w["rows"]) for w in written),
        "num_items": int(kcore["items_after"]),
        "num_interactions": sum(int(w["interactions"]) for w in written),
        "max_item_id": max(int(w["max_item_id"]) for w in written),
        "columns": {"user_id": "int64", "items": "list<int32>"},
        "files": [{k: w[k] for k in ("path", "rows", "bytes", "sha256")} for w in written],
        "extra": {
            "source": SOURCE,
            "input": config.input,
            "fingerprint": plan.fingerprint,
            "user_ids": kcore["user_ids"],
            "max_len": config.max_len,
            "stats_file": layout.STATS,
            "stats_sha256": hashlib.sha256(stats_bytes).hexdigest(),
            "item_map_file": layout.ITEM_MAP,
            "item_map_sha256": hashlib.sha256(out.read_bytes(layout.ITEM_MAP)).hexdigest(),
            "user_map_files": [w["user_map"] for w in written],
            "quarantine_files": quarantine,
        },
    }
    fault("commit")
    commit_manifest(out.fs, out.root, manifest)
    work.rm()
    return manifest


def _remove_strays(out: Store, written: list[dict[str, Any]], quarantine: list[str]) -> None:
    """Files an earlier, different attempt left in the output that this dataset does not list."""
    keep = {w["path"] for w in written} | {w["user_map"] for w in written} | set(quarantine)
    for pattern in (
        "part-*.parquet",
        "user_map/*.parquet",
        "quarantine/*.parquet",
        "*.tmp-*",
        "*/*.tmp-*",
    ):
        for name in out.glob(pattern):
            if name not in keep:
                out.rm(name)
