"""Worker for the hung-peer test, one process per rank (started by hand with the launcher's
variables). Every rank builds the same tiny engine and runs one step; rank ``--hang-rank`` stalls
inside its backward (a gradient hook that sleeps), after the step's forward collectives and
before DeepSpeed's gradient all-reduce, the point where a peer once held the others for torch's
default 30 minutes. The other ranks print how long they waited in the step before it failed.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.batching import make_train_batch
from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec
from elcrec_dist.trainer.engine import build_engine, train_step
from launcher.common import run_main

NUM_ITEMS = 40
USERS = 16


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout-s", type=float, required=True)
    parser.add_argument("--hang-rank", type=int, default=1)
    parser.add_argument("--hang-s", type=float, default=600.0)
    args = parser.parse_args()
    config = load_config(
        None, ["model.hidden_size=16", "model.max_len=8", "model.num_clusters=4",
               f"train.batch_size={USERS}"]
    )
    device = dist_utils.init(timeout_s=args.timeout_s)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    torch.manual_seed(0)
    engine = build_engine(ELCRec(config.model, num_items=NUM_ITEMS).to(device), config)
    rng = np.random.default_rng(0)
    users = [rng.choice(np.arange(1, NUM_ITEMS + 1), size=6, replace=False) for _ in range(USERS)]
    batch = make_train_batch(users, num_items=NUM_ITEMS, max_len=config.model.max_len,
                             augment=config.augment, generator=torch.Generator().manual_seed(0))
    if rank == args.hang_rank:
        first = next(p for p in engine.module.parameters() if p.requires_grad)

        def stall(grad: torch.Tensor) -> torch.Tensor:
            time.sleep(args.hang_s)
            return grad

        first.register_hook(stall)
    dist_utils.barrier()  # every rank has its engine: only the step itself can wait from here
    started = time.monotonic()
    try:
        train_step(engine, batch, config)
    finally:
        print(f"rank {rank} of {world}: the step ended after {time.monotonic() - started:.1f} s",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main, hard_exit=True)
