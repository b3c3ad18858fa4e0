"""Peak memory and time of one step of the full-catalogue softmax next-item term
(``loss.next_item: softmax``) at catalogue scale: scored in chunks of positions
(``loss.softmax_max_logits``) against the [P, N] logits at once.

    python -m bench.softmax_memory [--items 1000000] [--batch 256] [--max-len 50] [--dim 64] \
        [--max-logits 67108864] [--cases chunked whole] [--repeat 1]

Inputs: a synthetic item table [N + 1, D] and encoder states [B, T, D] (normal, seeded) with
every one of the P = B x T positions a real target, both requiring a gradient, as the trainer's
are. One step is ``losses.next_item_softmax_loss`` forward and backward. Each case runs in a
fresh process, so its peak resident memory is its own:

- ``chunked``: ``max_logits=--max-logits`` (the default budget, 2^26 logits);
- ``whole``: ``max_logits=None``, the [P, N] logits at once (what the term did before the
  budget; at 12,800 positions x 1 M items its logits alone are 48.8 GiB, so run it on a smaller
  batch).

``peak_mib`` is the process's peak resident set (``ru_maxrss``) less its resident set once the
inputs exist and the kernels have run once on a small slice; ``seconds`` the fastest of
``--repeat`` steps (wall). With both cases, the loss and the two gradients are compared
(``max_rel_diff``: the largest difference over the largest magnitude, per tensor). Prints the
CPU model, the figures and the load average as one JSON line.
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
from elcrec_dist.losses import next_item_softmax_loss

CASES = ("chunked", "whole")


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B, T, D], targets [B, T] (ids 1..N, no padding), table [N + 1, D], seeded."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(args.items + 1, args.dim, generator=gen) * 0.1
    hidden = torch.randn(args.batch, args.max_len, args.dim, generator=gen)
    targets = torch.randint(1, args.items + 1, (args.batch, args.max_len), generator=gen)
    return hidden, targets, table


def step(
    hidden: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, max_logits: int | None
) -> dict[str, torch.Tensor]:
    """One forward and backward of the term: the loss and both gradients."""
    h, e = hidden.clone().requires_grad_(), table.clone().requires_grad_()
    loss = next_item_softmax_loss(h, targets, e, max_logits=max_logits)
    loss.backward()
    assert h.grad is not None and e.grad is not None
    return {"loss": loss.detach(), "hidden_grad": h.grad, "table_grad": e.grad}


def child(args: argparse.Namespace) -> None:
    """Run one case ``--repeat`` times in this (fresh) process; print its figures as JSON and
    save its outputs to ``--out`` for the comparison."""
    hidden, targets, table = inputs(args)
    max_logits = args.max_logits if args.case == "chunked" else None
    # Kernels and thread pools set themselves up on first use: do that before the baseline.
    step(hidden[:1, :4], targets[:1, :4] % 999 + 1, table[:1000], 2000)
    step(hidden[:1, :4], targets[:1, :4] % 999 + 1, table[:1000], None)
    baseline = psutil.Process().memory_info().rss
    times: list[float] = []
    out: dict[str, torch.Tensor] = {}
    for _ in range(args.repeat):
        out = {}  # the previous step's tensors go before the next step starts
        started = time.perf_counter()
        out = step(hidden, targets, table, max_logits)
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    torch.save(out, args.out)
    # The kernel's RSS counters are cached per thread (up to 64 pages each), so a step that adds
    # nothing can read a hair below the baseline: no growth is 0.
    print(json.dumps({"peak_mib": round(max(peak - baseline, 0) / 2**20, 1),
                      "seconds": round(min(times), 3),
                      "inputs_mib": round(baseline / 2**20, 1)}))


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue size N")
    parser.add_argument("--batch", type=int, default=256, help="users per step B (paper: 256)")
    parser.add_argument("--max-len", type=int, default=50, help="positions per user T")
    parser.add_argument("--dim", type=int, default=64, help="hidden size D")
    parser.add_argument("--max-logits", type=int, default=2**26,
                        help="loss.softmax_max_logits for the chunked case")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=["chunked"],
                        help="which cases to run (whole needs P x N x 4 bytes several times)")
    parser.add_argument("--repeat", type=int, default=1, help="steps per case (fastest reported)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1 or args.items < 1000 or min(args.batch, args.max_len, args.dim) < 1:
        parser.error("--repeat, --batch, --max-len and --dim must be >= 1 and --items >= 1000")
    if args.case:
        child(args)
        return 0

    load_before = os.getloadavg()
    figures: dict[str, dict[str, float]] = {}
    outputs = {}
    own = list(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            ran = run_case_process("bench.softmax_memory", own, case, Path(tmp))
            if ran is None:
                return 1
            figures[case], outputs[case] = ran
    positions = args.batch * args.max_len
    result: dict[str, object] = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "items": args.items, "positions": positions, "dim": args.dim,
        "max_logits": args.max_logits,
        "chunk_positions": max(1, args.max_logits // args.items),
        "whole_logits_mib": round(positions * args.items * 4 / 2**20, 1),
        **figures,
    }
    if len(outputs) == 2:
        result["max_rel_diff"] = {
            name: max_rel_diff(outputs["chunked"][name], outputs["whole"][name])
            for name in ("loss", "hidden_grad", "table_grad")
        }
    result["load_avg"] = [round(x, 1) for x in (*load_before, *os.getloadavg())]
    for case, f in figures.items():
        print(f"{case:8s} peak {f['peak_mib']:9.1f} MiB  {f['seconds']:8.3f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
