"""Daily retraining on a two-day synthetic scenario: warm start (``--init-from``) against a cold
start on day 2.

    python -m bench.two_day [--interactions 600000] [--users 15000] [--items 3000]
        [--day1-epochs 30] [--epochs 30] [--patience 5] [--workdir /tmp/two_day]
        [--figure PATH] [--keep]

The scenario (``write_two_days``): one planted-intent raw log (``data_prep.synthetic_logs``,
string ids, no bots or malformed rows) cut into two days' logs, each built with
``python -m data_prep.build`` (5-core, id maps written):

- day 1: the events before 75 % of the log's time span, without the *new* items (10 % of the
  catalogue, drawn by seed): they do not exist yet;
- day 2: every event, without the *retired* items (5 % of day 1's catalogue): they left. Day 2
  adds the users who started after the cut, the new items, and the later events of everyone.

Then three runs of the real entry point (``launcher/train.py``, a world of one, validation
every epoch, early stopping after ``--patience`` evaluations without a better valid NDCG@20):
day 1 from scratch; day 2 from scratch (cold); day 2 from day 1's best model (``--init-from``,
warm). Prints one JSON line (both day-2 curves of valid
NDCG@20, the cold start's best and the first epoch at which each run reached it) and, with
``--figure``, plots both curves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from data_prep.synthetic_logs import SPAN_S, START_S, LogSpec, write_logs

REPO = Path(__file__).resolve().parents[1]
NEW_SHARE = 0.10  # of the catalogue: items that appear on day 2 only
RETIRED_SHARE = 0.05  # of the catalogue: items of day 1 gone on day 2
DAY1_TIME_SHARE = 0.75  # day 1 ends at this share of the log's time span


@dataclass(frozen=True)
class TwoDays:
    day1: Path
    day2: Path
    new_items: int  # catalogue items held back from day 1
    retired_items: int  # catalogue items dropped on day 2


def _item_index(items: pa.ChunkedArray) -> np.ndarray:
    """``i42`` -> 42."""
    return pc.cast(pc.utf8_slice_codeunits(items, 1), pa.int64()).to_numpy()


def write_two_days(root: Path, *, interactions: int, users: int, items: int, seed: int = 0,
                   jobs: int = 1) -> TwoDays:
    """The two prepared builds under ``root`` (``day1``, ``day2``), from one raw log."""
    spec = LogSpec(interactions=interactions, users=users, items=items, intents=8, noise=0.1,
                   duplicate_share=0.0, malformed_share=0.0, bots=0, seed=seed)
    universe = root / "log"
    write_logs(str(universe), spec)
    rng = np.random.default_rng([seed, 0x2DA7])
    order = rng.permutation(items)
    new = order[: round(NEW_SHARE * items)]
    retired = order[len(new) : len(new) + round(RETIRED_SHARE * items)]
    table = ds.dataset(str(universe), format="parquet").to_table()
    item = _item_index(table.column("item_id"))
    cut = START_S + int(DAY1_TIME_SHARE * SPAN_S)
    day1_rows = (table.column("timestamp").to_numpy() < cut) & ~np.isin(item, new)
    day2_rows = ~np.isin(item, retired)
    out = {}
    for name, rows in (("day1", day1_rows), ("day2", day2_rows)):
        logs = root / f"log-{name}"
        logs.mkdir(parents=True)
        pq.write_table(table.filter(pa.array(rows)), logs / "part-00000.parquet")
        out[name] = root / name
        _build(logs, out[name], jobs=jobs)
    return TwoDays(out["day1"], out["day2"], len(new), len(retired))


def _build(logs: Path, output: Path, *, jobs: int) -> None:
    """``python -m data_prep.build`` on one day's log (5-core, id maps)."""
    from data_prep.build.cli import main

    code = main(["--input", str(logs / "*.parquet"), "--output", str(output),
                 "--user-col", "user_id", "--item-col", "item_id", "--time-col", "timestamp",
                 "--min-user-interactions", "5", "--min-item-interactions", "5",
                 "--jobs", str(jobs), "--no-progress"])
    if code != 0:
        raise RuntimeError(f"data_prep.build of {logs} exited {code}")


def train(config: Path, data: Path, run_dir: Path, *, epochs: int, patience: int,
          init_from: Path | None, extra: list[str]) -> dict[str, Any]:
    """One run of ``launcher/train.py`` (a world of one); returns its results.json."""
    cmd = [sys.executable, str(REPO / "launcher" / "train.py"), "--config", str(config),
           "--data", str(data), "--run-dir", str(run_dir), "--set", f"train.epochs={epochs}",
           "--set", f"train.patience={patience}"]
    if init_from is not None:
        cmd += ["--init-from", str(init_from)]
    for override in extra:
        cmd += ["--set", override]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def first_epoch_reaching(history: list[float], target: float) -> int | None:
    """1-based epoch at which ``history`` first reaches ``target`` (None: never)."""
    for epoch, value in enumerate(history, start=1):
        if value >= target:
            return epoch
    return None


def plot(cold: list[float], warm: list[float], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(range(1, len(cold) + 1), cold, marker="o", markersize=3, label="day 2, cold start")
    ax.plot(range(1, len(warm) + 1), warm, marker="o", markersize=3,
            label="day 2, warm start (--init-from day 1)")
    ax.axhline(max(cold), color="grey", linestyle=":", linewidth=1, label="cold start's best")
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid NDCG@20")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=int, default=600_000)
    parser.add_argument("--users", type=int, default=15_000)
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--day1-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=30, help="at most, each day-2 run")
    parser.add_argument("--patience", type=int, default=5,
                        help="early stopping: evaluations without a better valid NDCG@20")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", default="/tmp/two_day")
    parser.add_argument("--figure", help="write the two curves to this PNG")
    parser.add_argument("--keep", action="store_true", help="keep the logs, builds and runs")
    args = parser.parse_args()
    root = Path(args.workdir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    started = time.perf_counter()
    days = write_two_days(root, interactions=args.interactions, users=args.users,
                          items=args.items, jobs=os.cpu_count() or 1)
    prep_s = time.perf_counter() - started
    config, extra = Path(args.config), list(args.overrides)
    kw = {"patience": args.patience, "extra": extra}
    day1 = train(config, days.day1, root / "run-day1", epochs=args.day1_epochs, init_from=None,
                 **kw)
    cold = train(config, days.day2, root / "run-day2-cold", epochs=args.epochs, init_from=None,
                 **kw)
    warm = train(config, days.day2, root / "run-day2-warm", epochs=args.epochs,
                 init_from=root / "run-day1", **kw)
    infos = {name: json.loads((path / "manifest.json").read_text())
             for name, path in (("day1", days.day1), ("day2", days.day2))}
    target = max(cold["valid_history"])
    warm_metrics = [json.loads(line) for line in (root / "run-day2-warm" / "metrics.jsonl")
                    .read_text().splitlines()]
    carried = {k: v for m in warm_metrics for k, v in m.items() if k.startswith("warm_start/")}
    out = {
        "cpu": cpu_model(),
        "threads": os.cpu_count(),
        "scenario": {
            name: {"users": info["num_users"], "items": info["num_items"],
                   "interactions": info["num_interactions"]} for name, info in infos.items()
        },
        "held_back_items": days.new_items,
        "retired_items": days.retired_items,
        "warm_start": carried,
        "day1_best_valid_ndcg20": day1["best_valid"],
        "cold_valid_ndcg20": cold["valid_history"],
        "warm_valid_ndcg20": warm["valid_history"],
        "cold_best": target,
        "cold_best_epoch": first_epoch_reaching(cold["valid_history"], target),
        "warm_epoch_reaching_cold_best": first_epoch_reaching(warm["valid_history"], target),
        "cold_test": cold["test"],
        "warm_test": warm["test"],
        "seconds": {"prepare": prep_s, "day1": day1["wall_s"], "cold": cold["wall_s"],
                    "warm": warm["wall_s"]},
        "command": " ".join(["python -m bench.two_day", *sys.argv[1:]]),
    }
    if args.figure:
        plot(cold["valid_history"], warm["valid_history"], Path(args.figure),
             title=f"day 2: {infos['day2']['num_users']} users, {infos['day2']['num_items']} items")
    if not args.keep:
        shutil.rmtree(root)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
