"""The scale run: an industrial-size synthetic set end to end on this machine, 2 ranks.

    python -m bench.scale [--interactions 240000000] [--users 12000000] [--items 1050000]
        [--steps 30] [--valid-users 5000] [--infer-users 5000] [--exchange sparse]
        [--control-users 1200000] [--sweep 12000,100000,1000000,10000000,1000000:16]
        [--sweep-steps 8]
        [--workdir /tmp/scale] [--keep] [--reuse-data] [--out FILE]

Stages, each timed, with the peak resident memory (RSS) of every process:

1. **prepare**: a raw log (``data_prep.synthetic_logs``: string ids, planted intents,
   duplicates, malformed rows, bots) and ``python -m data_prep.build`` on it (5-core, 2 shards);
   the log is generated with more users and items than the goal (10 M users, 1 M items,
   200 M interactions) so that what survives the 5-core reaches it;
2. under ``deepspeed --num_gpus 2`` (CPU, gloo), per rank: **start** (model, k-means start of
   the centres on its bounded sample, engine), **train** (``--steps`` optimizer steps of epoch 0,
   the trainer's own ``run_step`` over the streamed batches, ``deepspeed.item_exchange`` as
   given), **validate** (``evaluate_sharded`` on a seeded sample of ``--valid-users``, the
   catalogue in item tiles), **infer** (top-20 of a seeded sample of ``--infer-users`` through
   ``elcrec_dist.inference.infer_batch``, the batch function ``launcher/infer.py`` runs for every
   user, items mapped back to original ids);
3. **control**: stage 2 again on a build of the same log spec with ``--control-users`` users
   (10x fewer) and the same catalogue: peak RSS that does not move with the number of users
   shows that the trainer holds no per-user structure;
4. **sweep**: step time and bytes per step against the catalogue size, dense and sparse
   exchange side by side, 2 ranks, on in-memory users whose items are uniform over the
   catalogue (the most rows a step can touch: the hardest case for sparse exchange). A size
   that does not fit in memory at hidden 64 is run at a smaller hidden size, and says so.

Prints one JSON line (also written to ``--out``) with every figure and the CPU model. The
workdir's log, work folder and datasets are deleted unless ``--keep``.
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
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "beauty.yaml"  # the paper's model: 1 layer, hidden 64, 256 centres
WORLD = 2
# bytes of one [N + 1, D] float32 copy per rank that fit the sweep on this machine (24 GiB,
# 2 ranks): each rank holds about seven (weights, gradient, two Adam moments, Adam's
# temporaries, DeepSpeed's flattened reduce buffer)
SWEEP_COPY_BYTES = 1 << 30


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def rss_mib() -> float:
    """This process's resident set now (MiB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class StagePeaks:
    """This process's RSS sampled every ``interval`` s; the peak within each named stage."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.stages: dict[str, dict[str, float]] = {}
        self._current: str | None = None
        self._peak = 0.0
        self._started = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = rss_mib()
            with self._lock:
                self._peak = max(self._peak, now)
            time.sleep(self.interval)

    def begin(self, name: str) -> None:
        with self._lock:
            self._current, self._peak, self._started = name, rss_mib(), time.perf_counter()

    def end(self) -> dict[str, float]:
        with self._lock:
            assert self._current is not None
            figures = {"seconds": time.perf_counter() - self._started,
                       "peak_rss_mib": max(self._peak, rss_mib()), "rss_end_mib": rss_mib()}
            self.stages[self._current] = figures
            self._current = None
        return figures

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# --- stage 1: prepare ---------------------------------------------------------------------------


def prepare(
    root: Path, *, interactions: int, users: int, items: int, reuse: bool
) -> dict[str, Any]:
    """Raw log and build under ``root``; returns the manifest counts and the stage figures."""
    from bench.prep_speed import PeakRss

    logs, out = root / "log", root / "data"
    if reuse and (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        return {"reused": True, **_counts(manifest)}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    figures: dict[str, Any] = {}
    for name, cmd in (
        ("log", [sys.executable, "-m", "data_prep.synthetic_logs", "--output", str(logs),
                 "--interactions", str(interactions), "--users", str(users), "--items", str(items),
                 "--files", str(max(2, interactions // 10_000_000)), "--seed", "0",
                 "--jobs", str(os.cpu_count() or 1)]),
        ("build", [sys.executable, "-m", "data_prep.build", "--input", str(logs / "*.parquet"),
                   "--output", str(out), "--user-col", "user_id", "--item-col", "item_id",
                   "--time-col", "timestamp", "--min-user-interactions", "5",
                   "--min-item-interactions", "5", "--shards", "2", "--no-progress",
                   "--jobs", str(os.cpu_count() or 1), "--work-dir", str(root / "work")]),
    ):
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        peak = PeakRss(proc.pid)
        _, stderr = proc.communicate()
        peak.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{stderr[-3000:]}")
        figures[name] = {"seconds": time.perf_counter() - started,
                         "peak_rss_all_mib": peak.peak_sum / 2**20,
                         "peak_rss_one_process_mib": peak.peak_one / 2**20}
    shutil.rmtree(logs)  # the raw log is not needed any more (GBs)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"reused": False, **figures, **_counts(manifest)}


def _counts(manifest: dict[str, Any]) -> dict[str, int]:
    return {k: int(manifest[k]) for k in ("num_users", "num_items", "num_interactions")}


# --- stage 2: the run on 2 ranks (worker) -------------------------------------------------------


def deepspeed_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "DS_ACCELERATOR": "cpu"}


def launch(args: list[str], *, out: Path) -> list[dict[str, Any]]:
    """``deepspeed --num_gpus 2 bench/scale.py ARGS --out OUT``: every rank's JSON."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["deepspeed", "--num_gpus", str(WORLD), "--master_port", str(port),
           str(REPO / "bench" / "scale.py"), *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=deepspeed_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def config_for(data: str, overrides: list[str]) -> Any:
    from elcrec_dist.config import load_config

    return load_config(CONFIG, [f"data.path={data}", "train.run_dir=/tmp/scale-unused",
                                *overrides])


def worker_run(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 2 on this rank: start, train ``--steps`` steps, validate on a sample, infer top-K
    for a sample. Returns this rank's figures."""
    import torch

    from elcrec_dist import distributed as dist_utils
    from elcrec_dist.idmaps import IdMaps
    from elcrec_dist.inference import infer_batch
    from elcrec_dist.runlog import RunLogger
    from elcrec_dist.stream import StreamingDataset
    from elcrec_dist.trainer import Trainer
    from elcrec_dist.trainer.engine import run_step
    from elcrec_dist.trainer.exchange import exchange_figures
    from elcrec_dist.trainer.validation import evaluate_sharded

    peaks = StagePeaks()
    config = config_for(args.data, [f"deepspeed.item_exchange={args.exchange}",
                                    f"eval.valid_users={args.valid_users}", *args.overrides])
    data = StreamingDataset.open(args.data)
    device = dist_utils.init(local_rank=args.local_rank)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    out: dict[str, Any] = {"rank": rank, "world": world, "threads": torch.get_num_threads()}

    peaks.begin("start")  # model, k-means start of the centres (bounded sample), engine
    trainer = Trainer(config, data, device=device,
                      run_log=RunLogger(config.train.run_dir, enabled=False))
    trainer.restore_or_start()
    peaks.end()

    peaks.begin("train")
    step_s, figures = [], []
    batches = data.train_batches(epoch=0, rank=rank, world=world,
                                 batch_size=config.train.batch_size, seed=config.train.seed)
    assert isinstance(batches, Generator)  # closed below: stops the read-ahead thread
    try:
        for step, users in batches:
            t0 = time.perf_counter()
            run_step(trainer.engine, users.sequences, config, num_items=data.info.num_items,
                     rank=rank, global_step=step)
            step_s.append(time.perf_counter() - t0)
            figures.append(exchange_figures(trainer.engine))
            if len(step_s) >= args.steps:
                break
    finally:
        batches.close()
    out["train"] = {"steps": len(step_s), "step_s": step_s,
                    "exchange": _means(figures[1:] or figures)}
    peaks.end()

    peaks.begin("validate")
    out["valid"] = evaluate_sharded(trainer.model, data, config, split="valid", device=device)
    peaks.end()

    peaks.begin("infer")
    model = trainer.model.eval()
    sample = data.sample_sequences(rank=rank, world=world, count=args.infer_users,
                                   seed=config.train.seed + 2)
    idmaps = IdMaps.open(data.url, data.info)
    scored = 0
    for start in range(0, len(sample), config.eval.batch_size):
        chunk = sample.sequences[start : start + config.eval.batch_size]
        result = infer_batch(model, chunk, k=20, tile_items=config.eval.tile_items)
        idmaps.items(result.items[result.items > 0])  # the original ids, as infer.py writes
        scored += len(chunk)
    out["infer"] = {"users": scored, "k": 20}
    peaks.end()

    out["stages"] = peaks.stages
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks.close()
    return out


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for row in rows for k in row})
    return {k: float(np.mean([row[k] for row in rows if k in row])) for k in keys}


# --- stage 4: step time against the catalogue size (worker) -------------------------------------


def sweep_users(n: int, num_items: int, seed: int) -> list[np.ndarray]:
    """``n`` users of 5..60 distinct items (lognormal lengths, mean about 20), uniform over the
    catalogue."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(2.8, 0.6, n)), 5, 60).astype(int)
    return [np.unique(rng.integers(1, num_items + 1, 2 * int(k)))[: int(k)] for k in lengths]


def worker_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Step time of the real step at ``--num-items`` items: ``--sweep-steps`` timed steps after
    two warm-up steps, this rank's users drawn per step."""
    import torch

    from elcrec_dist import distributed as dist_utils
    from elcrec_dist.trainer.engine import build_engine, init_model, run_step
    from elcrec_dist.trainer.exchange import exchange_figures

    config = config_for("", [f"deepspeed.item_exchange={args.exchange}", *args.overrides])
    device = dist_utils.init(local_rank=args.local_rank)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    model = init_model(config, num_items=args.num_items, device=device)
    engine = build_engine(model, config)
    local = config.train.batch_size // world
    step_s, figures = [], []
    for step in range(2 + args.sweep_steps):
        users = sweep_users(local, args.num_items, seed=1000 * step + rank)
        t0 = time.perf_counter()
        run_step(engine, users, config, num_items=args.num_items, rank=rank, global_step=step)
        if step >= 2:
            step_s.append(time.perf_counter() - t0)
        figures.append(exchange_figures(engine))
    out = {"rank": rank, "num_items": args.num_items, "exchange": args.exchange,
           "hidden_size": config.model.hidden_size, "step_s": step_s,
           "figures": _means(figures[2:]), "threads": torch.get_num_threads(),
           "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.profile:
        out["profile"] = profile_steps(engine, config, args, rank=rank, local=local)
    return out


def profile_steps(engine: Any, config: Any, args: argparse.Namespace, *, rank: int,
                  local: int) -> list[dict[str, Any]]:
    """Where ``--profile`` more steps spend their time (torch.profiler, self CPU time): the ten
    largest operators, with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    from elcrec_dist.trainer.engine import run_step

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(args.profile):
            users = sweep_users(local, args.num_items, seed=7000 + 1000 * step + rank)
            run_step(engine, users, config, num_items=args.num_items, rank=rank,
                     global_step=100 + step)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return [{"op": e.key, "share": e.self_cpu_time_total / total,
             "ms_per_step": e.self_cpu_time_total / 1000 / args.profile} for e in top]


# --- the bench ----------------------------------------------------------------------------------


def summarise_run(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: the slowest rank's seconds and each rank's peak RSS; step time and bytes."""
    stages = {
        name: {"seconds": max(r["stages"][name]["seconds"] for r in ranks),
               "peak_rss_mib_per_rank": [round(r["stages"][name]["peak_rss_mib"]) for r in ranks]}
        for name in ranks[0]["stages"]
    }
    steps = np.array([r["train"]["step_s"] for r in ranks]).max(axis=0)  # a step ends on both
    return {
        "stages": stages,
        "step_ms_median": float(np.median(steps[1:]) * 1000),
        "step_ms_first": float(steps[0] * 1000),
        "exchange_per_step": ranks[0]["train"]["exchange"],
        "valid": ranks[0]["valid"],
        "infer_users": sum(r["infer"]["users"] for r in ranks),
        "threads_per_rank": ranks[0]["threads"],
        "peak_rss_mib_per_rank": [round(r["ru_maxrss_mib"]) for r in ranks],
    }


def sweep_hidden(num_items: int) -> int:
    """Hidden 64 (the model's), halved until one table copy fits ``SWEEP_COPY_BYTES``."""
    hidden = 64
    while (num_items + 1) * hidden * 4 > SWEEP_COPY_BYTES and hidden > 8:
        hidden //= 2
    return hidden


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=int, default=240_000_000)
    parser.add_argument("--users", type=int, default=12_000_000)
    parser.add_argument("--items", type=int, default=1_050_000)
    parser.add_argument("--control-users", type=int, default=1_200_000,
                        help="users of the control build (same catalogue; 0: no control)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--valid-users", type=int, default=5000)
    parser.add_argument("--infer-users", type=int, default=5000)
    parser.add_argument("--exchange", default="sparse", choices=("dense", "sparse", "auto"))
    parser.add_argument(
        "--sweep",
        default="12000,100000,1000000,10000000",
        help="catalogue sizes of the step-time sweep, each N or N:HIDDEN ('' for none)",
    )
    parser.add_argument("--sweep-steps", type=int, default=8)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N more steps of each sweep point (torch.profiler)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", default="/tmp/scale")
    parser.add_argument("--reuse-data", action="store_true", help="reuse builds made before")
    parser.add_argument("--keep", action="store_true", help="keep the builds")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--skip-run", action="store_true", help="the sweep only")
    args = parser.parse_args()
    root = Path(args.workdir)
    result: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "world": WORLD,
                              "command": " ".join(["python -m bench.scale", *sys.argv[1:]]),
                              "load_avg_before": os.getloadavg()}
    common = ["--steps", str(args.steps), "--valid-users", str(args.valid_users),
              "--infer-users", str(args.infer_users), "--exchange", args.exchange,
              *[a for o in args.overrides for a in ("--set", o)]]
    if not args.skip_run:
        result["prepare"] = prepare(root / "main", interactions=args.interactions,
                                    users=args.users, items=args.items, reuse=args.reuse_data)
        print(json.dumps({"prepared": result["prepare"]}), file=sys.stderr, flush=True)
        ranks = launch(["--worker", "run", "--data", str(root / "main" / "data"), *common],
                       out=root / "out-main")
        result["run"] = summarise_run(ranks)
        print(json.dumps({"run": result["run"]}), file=sys.stderr, flush=True)
        if args.control_users:
            fewer = args.interactions * args.control_users // args.users
            result["control_prepare"] = prepare(root / "control", interactions=fewer,
                                                users=args.control_users, items=args.items,
                                                reuse=args.reuse_data)
            ranks = launch(["--worker", "run", "--data", str(root / "control" / "data"), *common],
                           out=root / "out-control")
            result["control_run"] = summarise_run(ranks)
    sweep = []
    for entry in [s for s in args.sweep.split(",") if s]:
        size, _, given = entry.partition(":")  # N, or N:HIDDEN to set the hidden size
        num_items = int(size)
        hidden = int(given) if given else sweep_hidden(num_items)
        for exchange in ("dense", "sparse"):
            ranks = launch(["--worker", "sweep", "--num-items", str(num_items), "--exchange",
                            exchange, "--sweep-steps", str(args.sweep_steps),
                            "--profile", str(args.profile),
                            "--set", f"model.hidden_size={hidden}",
                            *[a for o in args.overrides for a in ("--set", o)]],
                           out=root / f"out-sweep-{num_items}-{exchange}")
            steps = np.array([r["step_s"] for r in ranks]).max(axis=0)
            if args.profile:
                print(json.dumps({"profile": ranks[0]["profile"], "num_items": num_items,
                                  "exchange": exchange}), file=sys.stderr, flush=True)
            row = {"num_items": num_items, "hidden_size": hidden, "exchange": exchange,
                   "step_ms_median": float(np.median(steps) * 1000),
                   "item_bytes_sent_per_rank": ranks[0]["figures"].get("exchange/item_bytes_sent"),
                   "item_rows_touched": ranks[0]["figures"].get("exchange/item_rows_touched"),
                   "item_rows_union": ranks[0]["figures"].get("exchange/item_rows_union"),
                   "peak_rss_mib_per_rank": [round(r["ru_maxrss_mib"]) for r in ranks]}
            sweep.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result["sweep"] = sweep
    result["load_avg_after"] = os.getloadavg()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


def worker_main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=("run", "sweep"), required=True)
    parser.add_argument("--data", default="")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--valid-users", type=int, default=5000)
    parser.add_argument("--infer-users", type=int, default=5000)
    parser.add_argument("--exchange", default="sparse")
    parser.add_argument("--num-items", type=int, default=0)
    parser.add_argument("--sweep-steps", type=int, default=8)
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    figures = worker_run(args) if args.worker == "run" else worker_sweep(args)
    Path(args.out, f"rank{figures['rank']}.json").write_text(json.dumps(figures) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the entry points: skip an interpreter shutdown that can abort (common.py)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main()
    sys.exit(main())
