"""Peak memory and time of the rank count (evaluation) and of top-K (recommendation) at catalogue
scale, scored in item tiles, against the dense [B, N + 1] score matrix they replace.

    python -m bench.topk_memory [--items 1000000] [--users 1024] [--tile-items 16384] \
        [--dim 64] [--k 20] [--history 50] [--repeat 2]

Inputs: a synthetic item table [N + 1, D] and B user vectors (normal, seeded), each user with
an answer and a history of L items. Four cases, each in a fresh process so that its peak
resident memory is its own:

- ``rank/tiled``: ``evaluation.tiled_answer_ranks``; ``rank/dense``: the whole score matrix,
  then ``evaluation.answer_ranks`` (what evaluation did before the tiles);
- ``top_k/tiled``: ``evaluation.top_k_items``; ``top_k/dense``: the whole score matrix, padding
  and history set to -inf, then ``torch.topk``.

``peak_mib`` is the process's peak resident set (``ru_maxrss``) less its resident set once the
inputs exist and the kernels have run once on a small slice; ``seconds`` the fastest of
``--repeat`` runs (wall), ``cpu_seconds`` the least CPU time of a run over all threads (which
includes OpenMP threads spinning between parallel regions, see docs/PERFORMANCE.md). Prints
the CPU model, the figures, whether tiled and dense agree (ranks equal, top-K ids and scores
equal) and the load average as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

from elcrec_dist.evaluation import answer_ranks, tiled_answer_ranks, top_k_items

CASES = ("rank/tiled", "rank/dense", "top_k/tiled", "top_k/dense")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as the kernel reports it (the first core's)."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return "unknown (no model name in /proc/cpuinfo)"


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """table [N + 1, D], users [B, D], answers [B], history [B, L] (ids 1..N), seeded."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(args.items + 1, args.dim, generator=gen) * 0.1
    users = torch.randn(args.users, args.dim, generator=gen)
    answers = torch.randint(1, args.items + 1, (args.users,), generator=gen)
    history = torch.randint(1, args.items + 1, (args.users, args.history), generator=gen)
    return table, users, answers, history


def dense_scores(users: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return users @ table.T  # [B, N + 1]


def run_case(case: str, args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], float, float]:
    """One run of ``case``: its outputs, its wall seconds and its CPU seconds (all threads)."""
    table, users, answers, history = args.data
    started, cpu_started = time.perf_counter(), time.process_time()
    if case == "rank/tiled":
        out = {"ranks": tiled_answer_ranks(users, table, answers, history,
                                           tile_items=args.tile_items)}
    elif case == "rank/dense":
        out = {"ranks": answer_ranks(dense_scores(users, table), answers, history)}
    elif case == "top_k/tiled":
        best = top_k_items(users, table, history, k=args.k, tile_items=args.tile_items)
        out = {"items": best.items, "scores": best.scores}
    else:
        scores = dense_scores(users, table)
        scores[:, 0] = -torch.inf
        scores.scatter_(1, history, -torch.inf)
        values, items = scores.topk(args.k, dim=1)
        out = {"items": items, "scores": values}
    return out, time.perf_counter() - started, time.process_time() - cpu_started


def child(args: argparse.Namespace) -> None:
    """Run one case ``--repeat`` times in this (fresh) process; print its figures as JSON and
    save its outputs to ``--out`` for the comparison."""
    args.data = inputs(args)
    table, users, answers, history = args.data
    # Kernels and thread pools set themselves up on first use: do that before the baseline.
    tiled_answer_ranks(users[:8], table[:1000], answers[:8] % 999 + 1, history[:8] % 999 + 1,
                       tile_items=500)
    top_k_items(users[:8], table[:1000], history[:8] % 999 + 1, k=5, tile_items=500)
    baseline = psutil.Process().memory_info().rss
    times, cpu_times = [], []
    with torch.no_grad():
        for _ in range(args.repeat):
            out, seconds, cpu_seconds = run_case(args.case, args)
            times.append(seconds)
            cpu_times.append(cpu_seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    torch.save(out, args.out)
    # The kernel's RSS counters are cached per thread (up to 64 pages each), so a step that adds
    # nothing can read a hair below the baseline: no growth is 0.
    print(json.dumps({"peak_mib": round(max(peak - baseline, 0) / 2**20, 1),
                      "seconds": round(min(times), 3),
                      "cpu_seconds": round(min(cpu_times), 3),
                      "inputs_mib": round(baseline / 2**20, 1)}))


def run_case_process(
    module: str, argv: Sequence[str], case: str, folder: Path
) -> tuple[dict[str, float], dict[str, torch.Tensor]] | None:
    """``python -m module *argv --case case --out FILE`` in a fresh process (so its peak memory
    is its own): the figures it printed (its last stdout line, JSON) and the outputs it saved
    to FILE in ``folder``. None, with its stderr and an error line printed, if it failed."""
    out = folder / (case.replace("/", "-") + ".pt")
    command = [sys.executable, "-m", module, *argv, "--case", case, "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        print(f"error: case {case} failed (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out, weights_only=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue size N")
    parser.add_argument("--users", type=int, default=1024,
                        help="users per batch (eval.batch_size's default)")
    parser.add_argument("--tile-items", type=int, default=16384,
                        help="items per tile (eval.tile_items's default)")
    parser.add_argument("--dim", type=int, default=64, help="hidden size D")
    parser.add_argument("--k", type=int, default=20, help="top-K's K")
    parser.add_argument("--history", type=int, default=50, help="history items per user")
    parser.add_argument("--repeat", type=int, default=2, help="runs per case (fastest reported)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child(args)
        return 0

    load_before = os.getloadavg()
    figures: dict[str, dict[str, dict[str, float]]] = {"rank": {}, "top_k": {}}
    outputs = {}
    own = list(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            ran = run_case_process("bench.topk_memory", own, case, Path(tmp))
            if ran is None:
                return 1
            kind, path = case.split("/")
            figures[kind][path], outputs[case] = ran
    same_ranks = torch.equal(outputs["rank/tiled"]["ranks"], outputs["rank/dense"]["ranks"])
    same_top = all(
        torch.equal(outputs["top_k/tiled"][name], outputs["top_k/dense"][name])
        for name in ("items", "scores")
    )
    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "items": args.items, "users": args.users, "dim": args.dim, "k": args.k,
        "history": args.history, "tile_items": args.tile_items,
        "dense_matrix_mib": round(args.users * (args.items + 1) * 4 / 2**20, 1),
        "tile_mib": round(args.users * args.tile_items * 4 / 2**20, 1),
        **figures,
        "ranks_equal": same_ranks, "top_k_equal": same_top,
        "load_avg": [round(x, 1) for x in (*load_before, *os.getloadavg())],
    }
    for kind in ("rank", "top_k"):
        for path in ("tiled", "dense"):
            f = figures[kind][path]
            print(f"{kind:6s} {path:6s} peak {f['peak_mib']:9.1f} MiB  {f['seconds']:8.3f} s"
                  f"  cpu {f['cpu_seconds']:8.3f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
