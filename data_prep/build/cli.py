"""Command line of ``python -m data_prep.build`` (see the package docstring for the design).

    python -m data_prep.build --input 'logs/*.parquet' --output data/shop
        [--config configs/prep/NAME.yaml]
        [--user-col user_id] [--item-col item_id] [--time-col timestamp] [--time-format epoch_s]
        [--event-col event --events click,purchase] [--min-user-interactions 5]
        [--min-item-interactions 5] [--max-len 200] [--max-reject-share 0.01] [--shards 4]
        [--set key=value ...] [--jobs 2] [--dry-run]
        [--stage plan|map|reduce|kcore|write|commit --worker-index i --num-workers n]

Precedence: defaults, then ``--config``, then the flags, then ``--set``. Errors go to stderr as
``error: ...``; exit codes: 0 success, 2 permanent (bad config or data, rejected share above the
threshold, an output that holds another dataset), 75 retryable (storage trouble, a killed
worker: run the same command again to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from data_prep.build.config import BuildConfig, load_build_config
from data_prep.build.plan import describe, make_plan
from data_prep.build.runner import STAGES, run_all, run_stage, summary, tune_allocator
from elcrec_dist.errors import EXIT_OK, EXIT_RETRYABLE, exit_code_for

# flag -> (config key, type); None type: a store_true switch
FLAGS: dict[str, tuple[str, Any, str]] = {
    "--input": ("input", str, "input glob, folder or file (local or s3://)"),
    "--output": ("output", str, "output dataset folder (local or s3://)"),
    "--format": ("format", str, "auto | parquet | csv | tsv | ndjson"),
    "--user-col": ("user_col", str, "user id column"),
    "--item-col": ("item_col", str, "item id column"),
    "--time-col": ("time_col", str, "timestamp column"),
    "--time-format": ("time_format", str, "epoch_s | epoch_ms | epoch_us | epoch_ns | iso8601"),
    "--max-time": (
        "max_time",
        str,
        "ISO-8601: later timestamps are rejected (default: file mtime + 1 day)",
    ),
    "--event-col": ("event_col", str, "event type column (with --events)"),
    "--events": (
        "events",
        lambda s: [v for v in s.split(",") if v],
        "comma-separated events to keep",
    ),
    "--min-user-interactions": ("min_user_interactions", int, "k-core: interactions per user"),
    "--min-item-interactions": ("min_item_interactions", int, "k-core: interactions per item"),
    "--max-len": ("max_len", int, "keep the most recent N items per user"),
    "--max-reject-share": ("max_reject_share", float, "fail above this share of rejected rows"),
    "--shards": ("shards", int, "output Parquet files"),
    "--buckets": ("buckets", int, "map/reduce partitions (default: one per ~4M rows)"),
    "--compression": ("compression", str, "zstd | snappy | gzip | lz4 | none"),
    "--user-ids": ("user_ids", str, "auto | keep | index"),
    "--on-schema-mismatch": ("on_schema_mismatch", str, "refuse | reconcile"),
    "--work-dir": ("work_dir", str, "scratch folder shared by all stages (default OUTPUT/_work)"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of build options (configs/prep/NAME.yaml)")
    for flag, (key, kind, text) in FLAGS.items():
        parser.add_argument(flag, dest=key, type=kind, default=None, help=text)
    parser.add_argument(
        "--no-dedupe", dest="dedupe", action="store_false", default=None, help="keep exact repeats"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any option (YAML value)"
    )
    parser.add_argument(
        "--stage", choices=STAGES, default="all", help="run one stage (Kubernetes jobs)"
    )
    parser.add_argument(
        "--worker-index",
        type=int,
        default=int(os.environ.get("JOB_COMPLETION_INDEX", "0")),
        help="this worker's index (default: $JOB_COMPLETION_INDEX or 0)",
    )
    parser.add_argument("--num-workers", type=int, default=1, help="workers of this stage")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="processes on this machine"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    flags = {
        key: getattr(args, key) for key, _, _ in FLAGS.values() if getattr(args, key) is not None
    }
    if args.dedupe is not None:
        flags["dedupe"] = args.dedupe
    return load_build_config(args.config, flags, args.set)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_allocator()
    try:
        config = config_from_args(args)
        if args.dry_run:
            print(describe(make_plan(config)))
            return EXIT_OK
        if args.stage != "all":
            print(run_stage(config, args.stage, args.worker_index, args.num_workers))
            return EXIT_OK
        show = not args.no_progress and sys.stderr.isatty()
        timings: dict[str, float] = {}
        manifest = run_all(config, jobs=max(1, args.jobs), show_progress=show, timings=timings)
        if manifest is None:
            print(f"{config.output} is complete (manifest.json); nothing to do")
        else:
            print(summary(config.output, manifest))
            spent = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in timings.items())
            print(f"seconds per stage: {spent}", file=sys.stderr)
        return EXIT_OK
    except BrokenProcessPool:
        print(
            "error: a worker process died (killed, or out of memory); run the same command again "
            "to resume from the finished parts",
            file=sys.stderr,
        )
        return EXIT_RETRYABLE
    except Exception as exc:
        code = exit_code_for(exc)
        message = str(exc) if code != 1 else f"{type(exc).__name__}: {exc}"
        if code == EXIT_RETRYABLE:
            message += " (retryable: run the same command again to resume)"
        print(f"error: {message}", file=sys.stderr)
        if code == 1:
            raise
        return code
