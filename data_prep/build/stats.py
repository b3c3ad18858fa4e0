"""Counts of a build: the rejected-share check, length percentiles, and ``stats.json``.

Every number comes from the done markers of the stages (summed), so ``stats.json`` is the same
whichever workers ran, and contains no timings: a rerun writes the same bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from data_prep.build.plan import Plan
from data_prep.writer import PrepError

PERCENTILES = (50, 90, 95, 99)


def map_totals(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Input rows, rejects by reason, filtered rows and rows passed on, summed over workers."""
    reasons: dict[str, int] = {}
    per_file: dict[str, int] = {}
    for marker in markers:
        for reason, count in marker["rejected"].items():
            reasons[reason] = reasons.get(reason, 0) + int(count)
        per_file.update(marker["rows_read"])
    return {
        "rows_read": sum(per_file.values()),
        "rejected": dict(sorted(reasons.items())),
        "rejected_total": sum(reasons.values()),
        "filtered": sum(int(m["filtered"]) for m in markers),
        "rows_out": sum(int(m["rows_out"]) for m in markers),
        "rows_read_per_file": dict(sorted(per_file.items())),
    }


def check_rejects(plan: Plan, markers: list[dict[str, Any]]) -> None:
    """Fail (``PrepError``) when more than ``max_reject_share`` of the input rows were rejected."""
    totals = map_totals(markers)
    total, rejected = totals["rows_read"], totals["rejected_total"]
    if total == 0:
        raise PrepError(f"--input {plan.config.input}: the input files hold no rows")
    if rejected > plan.config.max_reject_share * total:
        raise PrepError(reject_message(rejected, total, totals["rejected"], plan, partial=False))


def reject_message(
    rejected: int, total: int, reasons: dict[str, int], plan: Plan, *, partial: bool
) -> str:
    share = rejected / total if total else 1.0
    by_reason = ", ".join(
        f"{r} {n:,}" for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    so_far = "already " if partial else ""
    return (
        f"{so_far}rejected {rejected:,} of {total:,} input rows ({share:.2%}), more than "
        f"max_reject_share {plan.config.max_reject_share:.2%}: {by_reason}. The rejected rows "
        f"and their reasons are in {plan.config.output.rstrip('/')}/quarantine/; no dataset "
        f"was written"
    )


def histogram(lengths: np.ndarray) -> list[list[int]]:
    """Sparse histogram [[length, users], ...] (small: one entry per distinct length)."""
    values, counts = np.unique(lengths, return_counts=True)
    return [[int(v), int(c)] for v, c in zip(values, counts, strict=True)]


def merge_histograms(parts: list[list[list[int]]]) -> list[list[int]]:
    merged: dict[int, int] = {}
    for part in parts:
        for value, count in part:
            merged[value] = merged.get(value, 0) + count
    return [[v, merged[v]] for v in sorted(merged)]


def summarize(hist: list[list[int]]) -> dict[str, Any]:
    """min, mean, max and nearest-rank percentiles (the smallest length with at least p% of
    users at or below it) of a sparse histogram."""
    n = sum(c for _, c in hist)
    if n == 0:
        return {"users": 0}
    values = np.asarray([v for v, _ in hist], dtype=np.int64)
    cumulative = np.cumsum([c for _, c in hist])
    out: dict[str, Any] = {
        "users": int(n),
        "min": int(values[0]),
        "mean": round(float(sum(v * c for v, c in hist)) / n, 3),
        "max": int(values[-1]),
    }
    for p in PERCENTILES:
        rank = math.ceil(p / 100 * n)
        out[f"p{p}"] = int(values[int(np.searchsorted(cumulative, rank))])
    return out


def build_stats(
    plan: Plan,
    markers: list[dict[str, Any]],
    reduced: list[dict[str, Any]],
    kcore: dict[str, Any],
    written: list[dict[str, Any]],
) -> dict[str, Any]:
    c = plan.config
    totals = map_totals(markers)
    before = merge_histograms([w["lengths_before"] for w in written])
    after = merge_histograms([w["lengths_after"] for w in written])
    return {
        "input": {
            "pattern": c.input,
            "files": len(plan.inputs),
            "bytes": plan.total_bytes,
            "rows_read": totals["rows_read"],
            "rows_read_per_file": totals["rows_read_per_file"],
        },
        "rejected": {
            "total": totals["rejected_total"],
            "share": round(totals["rejected_total"] / max(totals["rows_read"], 1), 6),
            "max_share": c.max_reject_share,
            "by_reason": totals["rejected"],
            "future_cutoff": c.max_time or "modification time of each input file + 1 day",
        },
        "filtered_events": {"rows": totals["filtered"], "kept_events": list(plan.events)},
        "duplicates_dropped": sum(int(r["duplicates"]) for r in reduced),
        "kcore": {
            "min_user_interactions": c.min_user_interactions,
            "min_item_interactions": c.min_item_interactions,
            "before": {
                "users": kcore["users_before"],
                "items": kcore["items_before"],
                "interactions": kcore["interactions_before"],
            },
            "rounds": kcore["rounds"],
            "after": {
                "users": kcore["users_after"],
                "items": kcore["items_after"],
                "interactions": kcore["interactions_after"],
            },
        },
        "truncation": {
            "max_len": c.max_len,
            "kept": "all items"
            if c.max_len is None
            else f"the most recent {c.max_len} items of each user",
            "users_truncated": sum(int(w["users_truncated"]) for w in written),
            "interactions_dropped": sum(int(w["interactions_dropped"]) for w in written),
        },
        "sequence_length": {
            "before_truncation": summarize(before),
            "after_truncation": summarize(after),
        },
        "output": {
            "users": sum(int(w["rows"]) for w in written),
            "items": kcore["items_after"],
            "interactions": sum(int(w["interactions"]) for w in written),
            "shards": c.shards,
            "user_ids": kcore["user_ids"],
            "item_ids": "1..N in natural order of the original ids (item_map.parquet)",
        },
        "plan": {"buckets": plan.buckets, "reconciled": list(plan.notes), "kinds": plan.kinds},
    }
