"""Beauty for a fixed number of epochs on one GPU, bf16 (and fp32 beside it): epoch time and peak memory.

    python -m bench.gpu_epochs --config configs/beauty.yaml --data data/beauty --epochs 5 \\
        [--precisions bf16 fp32] [--runs-root runs/gpu-epochs]

Each precision is one run of the real entry point (``launcher/train.py``, a world of one on
``cuda:0``, validation every epoch, paper settings otherwise) for exactly ``--epochs`` epochs:
``bf16`` is ``deepspeed.bf16=true`` with ZeRO stage 1 (the fp32 master copy the centre
re-projection writes through), ``fp32`` is the default engine. From the run's own log it prints
one JSON line per precision: training seconds per epoch (every epoch, and the mean without the
first, which pays for CUDA start-up), validation seconds, peak GPU memory (the caching
allocator's ``max_memory_allocated``), peak RSS, and valid NDCG@20 after each epoch.
Needs a CUDA device; refuses to run without one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = {
    "bf16": ["deepspeed.bf16=true", "deepspeed.zero_stage=1"],
    "fp32": ["deepspeed.bf16=false"],
}


def summarise(run_dir: Path, precision: str, wall_s: float) -> dict[str, object]:
    """The figures of one finished run, read from its metrics.jsonl and results.json."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_s = [row["time/train_s"] for row in rows if "time/train_s" in row]
    eval_s = [row["time/eval_s"] for row in rows if "time/eval_s" in row]
    valid = [row["valid/NDCG@20"] for row in rows if "valid/NDCG@20" in row]
    results = json.loads((run_dir / "results.json").read_text())
    steady = train_s[1:] or train_s
    return {
        "precision": precision,
        "epochs": len(train_s),
        "train_epoch_s": [round(s, 3) for s in train_s],
        "train_epoch_s_mean_after_first": round(statistics.fmean(steady), 3),
        "eval_s_mean": round(statistics.fmean(eval_s), 3),
        "peak_cuda_mib": results["peak_memory"]["cuda_max_allocated_mib"],
        "peak_rss_mib": results["peak_memory"]["rss_mib"],
        "valid_ndcg20": [round(v, 4) for v in valid],
        "test": {k: round(v, 4) for k, v in results["test"].items()},
        "wall_s": round(wall_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", choices=sorted(ENGINE), default=["bf16", "fp32"])
    parser.add_argument("--runs-root", default="runs/gpu-epochs")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("error: bench/gpu_epochs.py needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(0)
    for precision in args.precisions:
        run_dir = Path(args.runs_root) / f"{Path(args.config).stem}-{precision}-e{args.epochs}"
        if run_dir.exists():
            print(f"error: {run_dir} exists; remove it or pass another --runs-root", file=sys.stderr)
            return 2
        cmd = [sys.executable, str(REPO / "launcher" / "train.py"), "--config", args.config, "--data", args.data,
               "--run-dir", str(run_dir), "--set", f"train.epochs={args.epochs}"]
        for override in ENGINE[precision]:
            cmd += ["--set", override]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cuda"}, capture_output=True, text=True)
        wall_s = time.perf_counter() - started
        (Path(args.runs_root) / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"error: the {precision} run failed with exit code {proc.returncode}; log: {run_dir}.log", file=sys.stderr)
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        print(json.dumps({"device": device_name, "torch": torch.__version__, **summarise(run_dir, precision, wall_s)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
