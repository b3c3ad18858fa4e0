"""ELCRec's efficiency claim, measured: learned centres (``elcrec``) against per-epoch k-means over
all users (``iclrec``) as the number of users grows.

    python -m bench.efficiency --users 10000 100000 1000000 [--train-steps 100] \\
        [--config configs/beauty.yaml] [--items 12000] [--data-root data/efficiency]
        [--out FILE.json]

For every size a synthetic planted-intent dataset is written once (``data_prep.synthetic``,
``--items`` items, cached under ``--data-root``). Each (size, variant) then runs in its own
process (so peak memory is its own), with the dataset config's model (Beauty: 1 layer, 256
centres, batch 256) and the variant layer from ``configs/variants/``, and times one epoch split
into

- ``clustering_s``: ``iclrec`` embeds every user and runs k-means over all of them, every
  epoch (``trainer.intents.refresh_intents``); ``elcrec`` pays nothing per epoch (its one-off
  k-means start on a bounded sample is reported apart, ``start_s``);
- ``train_s``: the epoch's optimizer steps. With ``--train-steps N`` the first N steps (after
  3 warm-up steps) are timed and scaled to the epoch's step count (``train_extrapolated``
  says so); ``--train-steps 0`` times the whole epoch;
- ``eval_s``: one full-ranking validation pass over every user;

plus peak RSS and, on CUDA, the allocator's peak. It prints one JSON line per measurement and a
markdown table, and writes all of it to ``--out`` if given. The encoder is warmed up by 3
training steps before anything is timed; the embedding and evaluation passes are timed cold
(their first-call costs are small against a pass over every user).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("elcrec", "iclrec")


def ensure_dataset(root: Path, users: int, items: int) -> Path:
    """The synthetic dataset of ``users`` users (written once, then reused)."""
    folder = root / f"users-{users}"
    if (folder / "manifest.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "data_prep.synthetic", "--output", str(folder),
           "--users", str(users), "--items", str(items), "--intents", "32", "--seed", "7"]
    subprocess.run(cmd, cwd=REPO, check=True)
    return folder


def measure_one(
    config_path: str, variant: str, data_path: str, train_steps: int, overrides: list[str]
) -> dict[str, object]:
    """One (dataset, variant): clustering, training and evaluation time of one epoch, and memory."""
    import resource

    import torch

    from bench.train_speed import run_steps, setup
    from elcrec_dist import distributed as dist_utils
    from elcrec_dist.config import load_config
    from elcrec_dist.stream import StreamingDataset
    from elcrec_dist.trainer.validation import evaluate_sharded

    config = load_config(
        [config_path, str(REPO / "configs" / "variants" / f"{variant}.yaml")],
        [*overrides, f"data.path={data_path}"],
    )
    data = StreamingDataset.open(data_path)
    device = dist_utils.init()

    def timed(fn: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    trainer = setup(config, data, device)  # model, the intent source's start, engine: as training
    model, start_s = trainer.model, trainer.state.seconds["clustering"]
    run_steps(trainer, limit=3)  # warm-up of the encoder (threads, allocator)
    clustering_s = trainer.refresh_intents(1)  # epoch_kmeans: over every user; learned: nothing
    steps_per_epoch = data.steps_per_epoch(config.train.batch_size)
    counted: list[int] = []
    if train_steps:
        train_time = timed(lambda: counted.append(run_steps(trainer, limit=train_steps)[0]))
        train_s = train_time / counted[0] * steps_per_epoch
    else:
        train_s = timed(lambda: counted.append(run_steps(trainer)[0]))
    eval_s = timed(lambda: evaluate_sharded(model, data, config, split="valid", device=device))
    result = {
        "variant": variant,
        "users": data.info.num_users,
        "items": data.info.num_items,
        "device": str(device),
        "clustering_s": round(clustering_s, 3),
        "train_s": round(train_s, 3),
        "eval_s": round(eval_s, 3),
        "epoch_s": round(clustering_s + train_s + eval_s, 3),
        "start_s": round(start_s, 3),
        "steps_per_epoch": steps_per_epoch,
        "steps_timed": counted[0],
        "train_extrapolated": bool(train_steps) and counted[0] < steps_per_epoch,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if device.type == "cuda"
        else None,
        "threads": torch.get_num_threads(),
    }
    dist_utils.teardown()
    return result


def table(rows: list[dict[str, object]]) -> str:
    """Markdown: one row per (users, variant), the time split of one epoch and peak memory."""
    lines = [
        (
            "| users | variant | clustering s | training s | evaluation s | epoch s "
            "| peak RSS MiB | peak GPU MiB |"
        ),
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gpu = "—" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:.0f}"
        star = "*" if r["train_extrapolated"] else ""
        lines.append(
            f"| {r['users']:,} | {r['variant']} | {r['clustering_s']:.2f} | "
            f"{r['train_s']:.2f}{star} | {r['eval_s']:.2f} | {r['epoch_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} | {gpu} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--config", default="configs/beauty.yaml")
    parser.add_argument("--items", type=int, default=12_000)
    parser.add_argument(
        "--train-steps",
        type=int,
        default=100,
        help="steps timed and scaled to an epoch (0: the whole epoch)",
    )
    parser.add_argument("--data-root", default="data/efficiency")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", help="write every measurement and the table here (JSON)")
    # child process
    parser.add_argument("--one", nargs=2, metavar=("DATA", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_steps < 0:
        parser.error("--train-steps must be >= 0")

    if args.one:
        print(
            json.dumps(
                measure_one(args.config, args.one[1], args.one[0], args.train_steps, args.overrides)
            ),
            flush=True,
        )
        return 0

    rows: list[dict[str, object]] = []
    for users in args.users:
        folder = ensure_dataset(Path(args.data_root), users, args.items)
        for variant in args.variants:
            cmd = [sys.executable, "-m", "bench.efficiency", "--one", str(folder), variant,
                   "--config", args.config, "--train-steps", str(args.train_steps),
                   *[a for o in args.overrides for a in ("--set", o)]]
            proc = subprocess.run(
                cmd, cwd=REPO, capture_output=True, text=True, env=os.environ.copy()
            )
            if proc.returncode != 0:
                print(
                    f"error: {variant} on {users} users failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-3000:]}",
                    file=sys.stderr,
                )
                return proc.returncode
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"command": sys.argv, "rows": rows, "table": text}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
