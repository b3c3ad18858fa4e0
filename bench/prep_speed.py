"""Speed and memory of the raw-log build: synthetic raw Parquet in, prepared dataset out.

    python -m bench.prep_speed --interactions 100000000 [--jobs 2] [--files 16] \\
        [--workdir /tmp/prep_speed] [--keep] [--reuse-input]

Writes a synthetic raw log (``data_prep.synthetic_logs``: string ids, 2% duplicates, 0.2%
malformed rows, 3 bots holding 1% of the events), then times ``python -m data_prep.build`` on
it end to end (plan to manifest, the log generation excluded) while sampling the resident memory
of the build and all its worker processes every 0.1 s. Prints one JSON line:
interactions/s (input rows read per second of build), peak RSS (sum over processes at one
moment, and the largest single process), seconds per stage. It then checks the result against
what the generator planted: rows read, rejected rows by reason, duplicates dropped, and that
the dataset reads back (``elcrec_dist.prepared``) with the promised counts and ordering.
Big temporary files are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


class PeakRss:
    """Samples the RSS of a process tree: the peak of the sum, and the largest process."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_sum = 0
        self.peak_one = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            rss = []
            for proc in procs:
                try:
                    rss.append(proc.memory_info().rss)
                except psutil.Error:
                    continue
            if rss:
                self.peak_sum = max(self.peak_sum, sum(rss))
                self.peak_one = max(self.peak_one, max(rss))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def generate(logs: Path, args: argparse.Namespace) -> dict:
    summary = logs / "_summary.json"
    if args.reuse_input and summary.exists():
        return json.loads(summary.read_text())
    shutil.rmtree(logs, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.synthetic_logs",
            "--output",
            str(logs),
            "--interactions",
            str(args.interactions),
            "--files",
            str(args.files),
            "--seed",
            "0",
        ],
        check=True,
        cwd=REPO,
    )
    return json.loads(summary.read_text())


def check(out: Path, planted: dict) -> dict:
    """The dataset against the generator's planted counts; returns what was checked."""
    from elcrec_dist.prepared import iter_tables, read_info

    stats = json.loads((out / "stats.json").read_text())
    assert stats["input"]["rows_read"] == planted["rows"], (
        stats["input"]["rows_read"],
        planted["rows"],
    )
    malformed = {k: v for k, v in planted["malformed"].items() if v}
    assert stats["rejected"]["by_reason"] == malformed, (stats["rejected"]["by_reason"], malformed)
    assert stats["duplicates_dropped"] == planted["duplicates"], (
        stats["duplicates_dropped"],
        planted["duplicates"],
    )
    assert stats["kcore"]["before"]["interactions"] == planted["interactions"]
    info = read_info(str(out))
    users = interactions = 0
    max_item = 0
    for table in iter_tables(str(out), info, verify=True):  # sizes, row counts and sha256
        lengths = np.diff(table.column("items").combine_chunks().offsets.to_numpy())
        assert lengths.min() >= 4
        users += table.num_rows
        interactions += int(lengths.sum())
        max_item = max(
            max_item, int(table.column("items").combine_chunks().values.to_numpy().max())
        )
    assert users == info.num_users == stats["output"]["users"] == stats["kcore"]["after"]["users"]
    assert interactions == info.num_interactions == stats["output"]["interactions"]
    assert (
        interactions
        == stats["kcore"]["after"]["interactions"] - stats["truncation"]["interactions_dropped"]
    )
    assert max_item <= info.num_items
    item_map = pq.read_table(out / "item_map.parquet")
    assert item_map.num_rows == info.num_items
    assert item_map.column("item_id").to_pylist() == list(range(1, info.num_items + 1))
    return {
        "rows_read": stats["input"]["rows_read"],
        "users": users,
        "interactions": interactions,
        "items": info.num_items,
        "kcore_rounds": len(stats["kcore"]["rounds"]),
        "buckets": stats["plan"]["buckets"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--interactions", type=int, required=True, help="distinct events in the log"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build processes")
    parser.add_argument("--files", type=int, default=16, help="input Parquet files")
    parser.add_argument("--shards", type=int, default=2, help="output shards (written in parallel)")
    parser.add_argument("--workdir", default="/tmp/prep_speed", help="where the log and dataset go")
    parser.add_argument("--keep", action="store_true", help="keep the log and the dataset")
    parser.add_argument("--reuse-input", action="store_true", help="reuse a log written before")
    parser.add_argument("--no-check", action="store_true", help="skip reading the dataset back")
    args = parser.parse_args()
    root = Path(args.workdir)
    logs, out = root / f"log-{args.interactions}", root / f"dataset-{args.interactions}"
    planted = generate(logs, args)
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "data_prep.build",
        "--input",
        str(logs),
        "--output",
        str(out),
        "--jobs",
        str(args.jobs),
        "--shards",
        str(args.shards),
        "--no-progress",
    ]
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    rss = PeakRss(proc.pid)
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the build and its workers
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    rss.stop()
    if proc.returncode != 0:
        print(stderr, file=sys.stderr)
        return proc.returncode
    stages = {}
    for line in stderr.splitlines():
        if line.startswith("seconds per stage:"):
            for part in line.split(":", 1)[1].split(","):
                name, value = part.split()
                stages[name] = float(value)
    result = {
        "interactions": args.interactions,
        "rows_read": planted["rows"],
        "seconds": round(seconds, 2),
        "interactions_per_s": round(planted["rows"] / seconds),
        "peak_rss_mb": round(rss.peak_sum / 2**20),
        "peak_rss_one_process_mb": round(rss.peak_one / 2**20),
        "cpu_s": round(cpu, 1),
        "jobs": args.jobs,
        "shards": args.shards,
        "stages_s": stages,
        "input_mb": round(sum(p.stat().st_size for p in logs.glob("part-*")) / 2**20),
        "load_avg_before": round(load_before, 2),  # other work on the machine meanwhile
        "load_avg_after": round(os.getloadavg()[0], 2),
    }
    if not args.no_check:
        result["checked"] = check(out, planted)
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
