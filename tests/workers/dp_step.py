"""Worker for the data-parallel equivalence tests, started by the deepspeed launcher.

Every rank builds the same model (seeded) and the same global batch of users and augmentations;
rank r trains on its rows. Results go to OUT/rank{r}.pt for the test to compare.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.batching import TrainBatch, make_train_batch
from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec
from elcrec_dist.trainer.engine import build_engine, train_step
from launcher.common import run_main

NUM_ITEMS = 300


def users(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.choice(np.arange(1, NUM_ITEMS + 1), size=int(rng.integers(4, 70)), replace=False)
        for _ in range(n)
    ]


def rows_of(batch: TrainBatch, lo: int, hi: int) -> TrainBatch:
    """Users lo..hi-1 of a batch, with their rows of both views."""
    b = batch.inputs.shape[0]
    views = torch.cat([batch.views[lo:hi], batch.views[b + lo : b + hi]])
    return TrainBatch(batch.inputs[lo:hi], batch.targets[lo:hi], batch.negatives[lo:hi], views)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    config = load_config(
        None,
        [
            "model.num_clusters=16",
            "train.batch_size=256",
            "loss.cluster_weight=10.0",
            *args.overrides,
        ],
    )
    device = dist_utils.init(local_rank=args.local_rank)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    model = ELCRec(config.model, num_items=NUM_ITEMS).to(device)
    engine = build_engine(model, config)
    torch.manual_seed(100 + rank)  # dropout (when on) differs per rank
    per_rank = config.train.batch_size // world
    losses = []
    for step in range(args.steps):
        # the same global batch (users, negatives, augmentations) on every rank
        batch = make_train_batch(
            users(config.train.batch_size, seed=step),
            num_items=NUM_ITEMS,
            max_len=config.model.max_len,
            augment=config.augment,
            generator=torch.Generator().manual_seed(step),
        )
        losses.append(
            train_step(engine, rows_of(batch, rank * per_rank, (rank + 1) * per_rank), config)
        )
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    out = {"losses": losses, "state": state, "world": world}
    if hasattr(model.cluster_centers, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        out["master_centres"] = safe_get_full_fp32_param(model.cluster_centers).float().clone()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save(out, Path(args.out) / f"rank{rank}.pt")
    dist_utils.teardown()
    return 0


if __name__ == "__main__":
    # Exit as launcher/train.py does: once the results are saved, os._exit skips the interpreter
    # shutdown, where a rank was seen to abort ("terminate called without an active exception",
    # exit -6) while background threads were torn down, failing a test whose work had finished.
    run_main(main, hard_exit=True)
