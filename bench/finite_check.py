"""Cost of the per-step finite check (``trainer.engine.not_finite``) beside the Adam update it
guards, for a model of the config's shape and a catalogue of ``--items`` items.

    python -m bench.finite_check --config configs/beauty.yaml --items 12101 [--threads 1]

Gradients are random tensors shaped like the model's trainable parameters. Prints one JSON
line: the best-of-repeats milliseconds of the check as the trainer runs it (fused L2 norms),
of an element-wise ``isfinite`` pass over the same gradients (the alternative it replaced),
and of one torch Adam step over the same parameters, with the CPU model and thread count.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from bench.train_speed import cpu_model
from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec
from elcrec_dist.trainer.engine import not_finite


def best_ms(work: Callable[[], object], *, calls: int = 50, repeats: int = 5) -> float:
    """The fastest mean over ``repeats`` runs of ``calls`` calls, in milliseconds."""
    for _ in range(3):
        work()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            work()
        best = min(best, (time.perf_counter() - started) / calls * 1e3)
    return round(best, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--items", type=int, required=True, help="catalogue size")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    model = ELCRec(config.model, num_items=args.items)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    loss = torch.tensor(1.0)
    adam = torch.optim.Adam(params, lr=1e-3)
    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "items": args.items,
        "gradient_elements": sum(g.numel() for g in grads),
        "check_ms": best_ms(lambda: not_finite(loss, grads)),
        "elementwise_isfinite_ms": best_ms(
            lambda: torch.stack([torch.isfinite(g).all() for g in grads]).all()),
        "adam_step_ms": best_ms(adam.step),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
