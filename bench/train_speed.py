"""Training and evaluation speed of one process (a world of one) on a prepared dataset.

    python -m bench.train_speed --config configs/beauty.yaml --data data/beauty \
        [--repeat 3] [--profile 20]

Runs full training epochs (the real step: batches, augmentations, DeepSpeed engine, centre
projection; no evaluation) and full-rank validation passes, ``--repeat`` times each, and prints
one JSON line: ``train_epoch_s`` and ``eval_s`` (the fastest of the repeats, the figure least
disturbed by other work on the machine) with every repeat beside them, the CPU seconds of each
(all threads of the process: far less sensitive to a shared machine), the CPU model, whether
subnormal floats are flushed on every intra-op thread (``elcrec_dist.numerics``; set
``ELCREC_FLUSH_SUBNORMALS=0`` to time without), the thread count and the load average before
and after. ``--profile N`` also prints the operators that took the time over N training steps
(torch.profiler), for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist import numerics
from elcrec_dist.config import ExperimentConfig, load_config
from elcrec_dist.runlog import RunLogger
from elcrec_dist.stream import StreamingDataset
from elcrec_dist.trainer import Trainer
from elcrec_dist.trainer.engine import run_step
from elcrec_dist.trainer.validation import evaluate_sharded

R = TypeVar("R")


def setup(config: ExperimentConfig, data: StreamingDataset, device: torch.device) -> Trainer:
    """A fresh run's model, centres and engine, exactly as training builds them (nothing is
    written: the run log is disabled and no checkpoint is saved)."""
    trainer = Trainer(
        config, data, device=device, run_log=RunLogger(config.train.run_dir, enabled=False)
    )
    trainer.restore_or_start()
    return trainer


def run_steps(trainer: Trainer, *, limit: int | None = None) -> tuple[int, int]:
    """Training steps of epoch 0 on a world of one (all, or the first ``limit``), each the
    trainer's own step (``run_step``): -> (steps, users)."""
    config, data = trainer.config, trainer.data
    steps = users = 0
    batches = data.train_batches(epoch=0, rank=0, world=1, batch_size=config.train.batch_size,
                                 seed=config.train.seed)
    for global_step, rows in batches:
        run_step(trainer.engine, rows.sequences, config, num_items=data.info.num_items, rank=0,
                 global_step=global_step)
        steps, users = steps + 1, users + len(rows)
        if limit is not None and steps >= limit:
            break
    return steps, users


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as the kernel reports it (the first core's)."""
    if not cpuinfo.is_file():
        return "unknown (no /proc/cpuinfo)"
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown (no model name in /proc/cpuinfo)"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def timed(repeat: int, work: Callable[[], R]) -> tuple[list[float], list[float], R]:
    """Wall seconds and CPU seconds (this process, every thread) of each of ``repeat`` calls of
    ``work``, and what the last call returned. CPU seconds depend much less than wall seconds
    on what else runs on the machine."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = work()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="epochs and passes to time")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile N training steps"
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    config = load_config(args.config, [*args.overrides, f"data.path={args.data}"])
    data = StreamingDataset.open(args.data)
    device = dist_utils.init()
    trainer = setup(config, data, device)
    model, kmeans_s = trainer.model, trainer.state.seconds["clustering"]
    load_before = os.getloadavg()

    run_steps(trainer, limit=3)  # warm-up: allocator, threads, first-call paths
    epochs, epochs_cpu, (steps, users) = timed(args.repeat, lambda: run_steps(trainer))

    def validation() -> None:
        evaluate_sharded(model, data, config, split="valid", device=device)

    validation()  # warm-up
    passes, passes_cpu, _ = timed(args.repeat, validation)
    load_after = os.getloadavg()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_steps(trainer, limit=args.profile)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(table, file=sys.stderr)

    train_epoch_s = min(epochs)
    print(json.dumps({
        "train_epoch_s": round(train_epoch_s, 2), "eval_s": round(min(passes), 3),
        "train_epoch_s_all": [round(s, 2) for s in epochs],
        "eval_s_all": [round(s, 3) for s in passes],
        "train_epoch_cpu_s": [round(s, 2) for s in epochs_cpu],
        "eval_cpu_s": [round(s, 3) for s in passes_cpu],
        "steps": steps, "users": users, "step_ms": round(1000 * train_epoch_s / steps, 1),
        "kmeans_start_s": round(kmeans_s, 2), "threads": torch.get_num_threads(),
        "cpu": cpu_model(), "flush_subnormals": numerics.probe(),
        "allocator": numerics.allocator(), "peak_rss_mib": peak_rss_mib(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after], "config": args.config,
    }))
    dist_utils.teardown()


if __name__ == "__main__":
    main()
