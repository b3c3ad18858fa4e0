"""Peak memory and time of the most-popular baseline's ranks (run at the end of every training
run) at catalogue scale: one shared score row, binary-searched (``evaluation.SharedScores``),
against the dense path it replaces (the row expanded to [B, N + 1], then
``evaluation.answer_ranks``, which under ``score_zero`` copies that matrix).

    python -m bench.popularity_baseline [--items 1000000] [--users 1024] [--history 50] \
        [--repeat 2]

Inputs: item counts drawn from a Zipf law over N items (many ties among the rare ones, as in
real counts), B users (one batch of ``popularity_sums``) each with an answer and L history items,
a quarter of the answers repeating a history item. Four cases, ``{shared,dense}/{exclude,
score_zero}``, each in a fresh process so that its peak resident memory is its own (measured as
in ``bench.topk_memory``: ``ru_maxrss`` less the resident set once the inputs exist). ``seconds``
is the fastest of ``--repeat`` runs; ``shared`` includes sorting the row, which a run does once
for all its batches. Prints the CPU model, the figures and whether the two paths' ranks are equal
as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from bench.topk_memory import cpu_model, run_case_process
from elcrec_dist.config import HistoryItems
from elcrec_dist.evaluation import SharedScores, answer_ranks

CASES = ("shared/exclude", "dense/exclude", "shared/score_zero", "dense/score_zero")


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """counts [N + 1] float64 (padding 0), answers [B], history [B, L], seeded."""
    gen = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, args.items + 1, dtype=torch.float64)
    counts = torch.zeros(args.items + 1, dtype=torch.float64)
    counts[1:] = torch.floor(1e6 / ranks)[torch.randperm(args.items, generator=gen)]
    answers = torch.randint(1, args.items + 1, (args.users,), generator=gen)
    history = torch.randint(1, args.items + 1, (args.users, args.history), generator=gen)
    repeat = torch.rand(args.users, generator=gen) < 0.25
    history[repeat, 0] = answers[repeat]
    return counts, answers, history


def child(args: argparse.Namespace) -> None:
    counts, answers, history = inputs(args)
    path, rule = args.case.split("/")
    history_items: HistoryItems = "score_zero" if rule == "score_zero" else "exclude"
    SharedScores(counts[:100]).ranks(answers[:4] % 99 + 1, history[:4] % 99 + 1,
                                     history_items=history_items)  # kernels set up first
    baseline = psutil.Process().memory_info().rss
    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        if path == "shared":
            ranks = SharedScores(counts).ranks(answers, history, history_items=history_items)
        else:
            ranks = answer_ranks(counts.expand(len(answers), -1), answers, history,
                                 history_items=history_items)
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"ranks": ranks}, args.out)
    print(json.dumps({"peak_mib": round(max(peak - baseline, 0) / 2**20, 1),
                      "seconds": round(min(times), 3)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue size N")
    parser.add_argument("--users", type=int, default=1024, help="users per batch")
    parser.add_argument("--history", type=int, default=50, help="history items per user")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("items", "users", "history", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.case:
        child(args)
        return 0
    argv = ["--items", str(args.items), "--users", str(args.users),
            "--history", str(args.history), "--repeat", str(args.repeat)]
    report: dict[str, object] = {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                                 "items": args.items, "users": args.users,
                                 "history": args.history,
                                 "dense_matrix_mib": round(args.users * (args.items + 1) * 8
                                                           / 2**20, 1)}
    outputs = {}
    with tempfile.TemporaryDirectory() as folder:
        for case in CASES:
            result = run_case_process("bench.popularity_baseline", argv, case,
                                      Path(folder))
            if result is None:
                return 1
            report[case], outputs[case] = result
    report["ranks_equal"] = all(
        torch.equal(outputs[f"shared/{rule}"]["ranks"], outputs[f"dense/{rule}"]["ranks"])
        for rule in ("exclude", "score_zero")
    )
    report["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(report))
    return 0 if report["ranks_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
