"""Training and evaluation speed of one process (a world of one) on a prepared dataset.

    python -m bench.train_speed --config configs/beauty.yaml --data data/beauty [--profile 20]

Runs one full training epoch (the real step: batches, augmentations, DeepSpeed engine, centre
projection; no evaluation) and one full-rank validation pass, and prints one JSON line with
``train_epoch_s`` and ``eval_s``. ``--profile N`` also prints the operators that took the time
over N training steps (torch.profiler), for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.config import ExperimentConfig, load_config
from elcrec_dist.runlog import RunLogger
from elcrec_dist.stream import StreamingDataset
from elcrec_dist.trainer import Trainer
from elcrec_dist.trainer.engine import run_step
from elcrec_dist.trainer.validation import evaluate_sharded


def setup(config: ExperimentConfig, data: StreamingDataset, device: torch.device) -> Trainer:
    """A fresh run's model, centres and engine, exactly as training builds them (nothing is
    written: the run log is disabled and no checkpoint is saved)."""
    trainer = Trainer(config, data, device=device, run_log=RunLogger(config.train.run_dir, enabled=False))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N training steps")
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, f"data.path={args.data}"])
    data = StreamingDataset.open(args.data)
    device = dist_utils.init()
    trainer = setup(config, data, device)
    model, kmeans_s = trainer.model, trainer.state.seconds["clustering"]

    run_steps(trainer, limit=3)  # warm-up: allocator, threads, first-call paths
    t0 = time.perf_counter()
    steps, users = run_steps(trainer)
    train_epoch_s = time.perf_counter() - t0

    evaluate_sharded(model, data, config, split="valid", device=device)  # warm-up
    t0 = time.perf_counter()
    evaluate_sharded(model, data, config, split="valid", device=device)
    eval_s = time.perf_counter() - t0

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_steps(trainer, limit=args.profile)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)

    print(json.dumps({
        "train_epoch_s": round(train_epoch_s, 2), "eval_s": round(eval_s, 2), "steps": steps, "users": users,
        "step_ms": round(1000 * train_epoch_s / steps, 1), "kmeans_start_s": round(kmeans_s, 2),
        "threads": torch.get_num_threads(), "config": args.config,
    }))
    dist_utils.teardown()


if __name__ == "__main__":
    main()
