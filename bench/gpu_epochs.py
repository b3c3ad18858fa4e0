"""Beauty epochs on one GPU: seconds per epoch eager and compiled, and several runs sharing it.

    python -m bench.gpu_epochs --config configs/beauty.yaml --data data/beauty \\
        [--epochs 3] [--modes eager reduce-overhead] [--concurrent 4] [--set KEY=VALUE ...] \\
        [--device cuda] [--out runs/gpu-epochs]

Goal (issue 19): at most 0.6 s a training epoch on one H200, so 300 epochs take under 3
minutes. A Beauty step is small (1 layer, hidden 64, 3 x 256 sequences of 50), so an eager
step is a few hundred kernel launches and host work, not arithmetic.

Each measurement is a separate worker process (``--worker``): a fresh world of one on the device,
the model, k-means start and engine exactly as training builds them (``bench.train_speed.setup``),
then ``--epochs`` epochs of the trainer's own step (``run_step``), a full-rank validation pass
after each. ``--modes`` run one after the other, one worker each:

- ``eager``: the step as training runs it;
- ``compile``: the engine's module (model plus objective) through ``torch.compile``
  (TorchInductor: fused element-wise kernels, fewer launches);
- ``reduce-overhead``: the same with CUDA graphs (whole captured graphs replayed per step);
- ``max-autotune-no-cudagraphs``: inductor's autotuned kernels without graphs.

Then ``--concurrent K`` (0: skip) starts K eager workers at once on the same device, as a sweep
would run them, each with cores/K CPU threads.

Each worker prints one JSON line: per epoch the training seconds (the device synchronised at the
end), the seconds of building its batches on the CPU alone (the same seeds, timed in a separate
pass: the host work a step cannot hide), validation seconds and valid NDCG@20 (so a compiled
mode shows it trains the same model), peak device memory, and the device utilisation that
``nvidia-smi`` sampled while it ran. The first epoch of a compiled mode includes compiling. The
parent prints a summary line per mode and for the concurrent group (the mean epoch after the
first, and for the group the epochs per minute of all workers together). ``--device cpu`` runs
the same on the CPU (for checking the script without a GPU; no utilisation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODES = ("eager", "compile", "reduce-overhead", "max-autotune-no-cudagraphs")
UTILISATION_QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     "-lms", "200"]


class UtilisationSampler:
    """``nvidia-smi`` sampling the GPU's utilisation every 200 ms in the background (percent
    of the time a kernel ran): started and stopped around the measured epochs."""

    def __init__(self, gpu_index: int) -> None:
        self.samples: list[float] = []
        self.unavailable: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._gpu = gpu_index

    def start(self) -> None:
        if shutil.which("nvidia-smi") is None:
            self.unavailable = "nvidia-smi not found"
            return
        self._proc = subprocess.Popen([*UTILISATION_QUERY, f"--id={self._gpu}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def stop(self) -> dict[str, Any]:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.samples:
            return {"gpu_util_pct": None, "gpu_util_note": self.unavailable or "no samples"}
        return {"gpu_util_pct": {"mean": round(statistics.fmean(self.samples), 1),
                                 "max": max(self.samples), "samples": len(self.samples)}}


def synchronise(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args: argparse.Namespace) -> int:
    """One measured run (see the module docstring); prints its JSON line."""
    if args.device == "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    import torch

    from bench.train_speed import run_steps, setup
    from elcrec_dist import distributed as dist_utils
    from elcrec_dist.batching import make_train_batch
    from elcrec_dist.config import load_config
    from elcrec_dist.stream import StreamingDataset
    from elcrec_dist.trainer.engine import needs_views, step_seed
    from elcrec_dist.trainer.validation import evaluate_sharded

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    config = load_config(args.config, [*args.overrides, f"data.path={args.data}"])
    data = StreamingDataset.open(args.data)
    device = dist_utils.init()
    if device.type != args.device:
        print(f"error: asked for --device {args.device}, DeepSpeed gave {device}", file=sys.stderr)
        return 2
    trainer = setup(config, data, device)
    if args.mode != "eager":
        mode = None if args.mode == "compile" else args.mode
        trainer.engine.module.compile(mode=mode, dynamic=False)
    sampler = UtilisationSampler(device.index or 0) if device.type == "cuda" else None
    if sampler is not None:
        sampler.start()

    def batches_alone(epoch: int) -> float:
        """The host's share of an epoch: its batches built again with the steps' seeds."""
        t0 = time.perf_counter()
        train = config.train
        for global_step, rows in data.train_batches(epoch=epoch, rank=0, world=1,
                                                    batch_size=train.batch_size, seed=train.seed):
            seed = step_seed(train.seed, 0, global_step)
            make_train_batch(rows.sequences, num_items=data.info.num_items,
                             max_len=config.model.max_len, augment=config.augment,
                             generator=torch.Generator().manual_seed(seed),
                             with_views=needs_views(config.loss))
        return time.perf_counter() - t0

    train_s, batch_s, eval_s, valid = [], [], [], []
    for epoch in range(args.epochs):
        trainer.model.train()
        synchronise(device)
        t0 = time.perf_counter()
        run_steps(trainer)
        synchronise(device)
        train_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        metrics = evaluate_sharded(trainer.model, data, config, split="valid", device=device)
        synchronise(device)
        eval_s.append(time.perf_counter() - t0)
        valid.append(metrics["NDCG@20"])
        batch_s.append(batches_alone(epoch))
    if sampler is not None:
        utilisation = sampler.stop()
    else:
        utilisation = {"gpu_util_pct": None, "gpu_util_note": "cpu"}
    peak = dist_utils.peak_memory(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({
        "mode": args.mode, "device": name, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "train_epoch_s": [round(s, 3) for s in train_s],
        "batch_build_s": [round(s, 3) for s in batch_s],
        "eval_s": [round(s, 3) for s in eval_s], "valid_ndcg20": [round(v, 5) for v in valid],
        "peak_device_mib": peak["cuda_max_allocated_mib"], "peak_rss_mib": peak["rss_mib"],
        **utilisation,
    }), flush=True)
    dist_utils.teardown()
    return 0


def worker_command(args: argparse.Namespace, mode: str) -> list[str]:
    cmd = [sys.executable, "-m", "bench.gpu_epochs", "--worker", "--mode", mode,
           "--config", args.config, "--data", args.data, "--epochs", str(args.epochs),
           "--device", args.device]
    for override in args.overrides:
        cmd += ["--set", override]
    return cmd


def run_workers(args: argparse.Namespace, mode: str, count: int, out: Path) -> list[dict[str, Any]]:
    """``count`` workers of ``mode`` at once; their JSON lines (logs in ``out``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // count))}
    if args.device == "cuda":
        env["DS_ACCELERATOR"] = "cuda"
    procs = []
    for i in range(count):
        log = out / f"{mode}-x{count}-{i}.log"
        proc = subprocess.Popen(worker_command(args, mode), cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        procs.append((proc, log))
    results = []
    for proc, log in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a {mode} worker exited {proc.returncode}; log: {log}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def after_first(values: Sequence[float]) -> float:
    """Mean without the first epoch (start-up, compiling), or the one value there is."""
    return statistics.fmean(values[1:] or values)


def mean_after_first(results: Sequence[dict[str, Any]], key: str) -> float:
    """``after_first`` of ``key`` for each run, averaged over the runs."""
    return round(statistics.fmean(after_first(r[key]) for r in results), 3)


def summary(mode: str, results: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    per_run = [after_first(r["train_epoch_s"]) for r in results]
    return {
        "summary": mode, "runs": len(results), "wall_s": round(wall_s, 1),
        "train_epoch_s_after_first": [round(s, 3) for s in per_run],
        "first_epoch_s": [r["train_epoch_s"][0] for r in results],
        "batch_build_s_after_first": mean_after_first(results, "batch_build_s"),
        "eval_s_after_first": mean_after_first(results, "eval_s"),
        "epochs_per_min_all_runs": round(sum(60.0 / s for s in per_run), 1),
        "valid_ndcg20_last": [r["valid_ndcg20"][-1] for r in results],
        "gpu_util_pct": [r["gpu_util_pct"] for r in results],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["eager", "reduce-overhead"])
    parser.add_argument("--concurrent", type=int, default=4, metavar="K",
                        help="eager workers at once on the device (0: skip)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default="runs/gpu-epochs", help="folder for the workers' logs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="eager", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.concurrent < 0:
        print("error: --epochs must be >= 1 and --concurrent >= 0", file=sys.stderr)
        return 2
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = [(mode, 1) for mode in args.modes]
    if args.concurrent:
        groups.append(("eager", args.concurrent))
    for mode, count in groups:
        started = time.perf_counter()
        try:
            results = run_workers(args, mode, count, out)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for result in results:
            print(json.dumps({**result, "group": f"{mode} x{count}"}), flush=True)
        label = mode if count == 1 else f"{mode} x{count} at once"
        print(json.dumps(summary(label, results, time.perf_counter() - started)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
