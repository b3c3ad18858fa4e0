"""Worker for the item-exchange tests, started by the deepspeed launcher.

Every rank builds the same model (seeded) and the same global batches; rank r trains on its
share of the users for ``--steps`` steps under the configured ``deepspeed.item_exchange``. Each
rank saves its parameters, its Adam state (by parameter name) and the exchange's figures to
OUT/rank{r}.pt, for the test to compare with another exchange's run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.batching import make_train_batch
from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec
from elcrec_dist.trainer.engine import build_engine, train_step
from elcrec_dist.trainer.exchange import exchange_figures
from launcher.common import run_main


def users(n: int, num_items: int, seed: int) -> list[np.ndarray]:
    """``n`` users of 5 to 40 distinct items drawn uniformly from 1..num_items."""
    rng = np.random.default_rng(seed)
    return [rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(5, 40)), replace=False)
            for _ in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-items", type=int, default=5000)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    config = load_config(None, ["model.num_clusters=16", "train.batch_size=64", *args.overrides])
    device = dist_utils.init(local_rank=args.local_rank)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    model = ELCRec(config.model, num_items=args.num_items).to(device)
    engine = build_engine(model, config)
    torch.manual_seed(100 + rank)  # dropout differs per rank, the same whatever the exchange
    losses, figures = [], []
    for step in range(args.steps):
        everyone = users(config.train.batch_size, args.num_items, seed=step)
        mine = everyone[rank::world]  # ranks hold different users: their touched rows differ
        batch = make_train_batch(mine, num_items=args.num_items, max_len=config.model.max_len,
                                 augment=config.augment,
                                 generator=torch.Generator().manual_seed(1000 * step + rank))
        losses.append(train_step(engine, batch, config))
        ids = np.concatenate([t.numpy().ravel() for t in (batch.inputs, batch.targets,
                                                          batch.negatives, batch.views)])
        figures.append({**exchange_figures(engine), "rows_here": float(len(np.unique(ids)))})
    names = {id(p): name for name, p in model.named_parameters()}
    adam = {}
    for param, state in engine.optimizer.state.items():
        adam[names[id(param)]] = {k: v.detach().clone() if torch.is_tensor(v) else v
                                  for k, v in state.items()}
    out = {
        "losses": losses,
        "figures": figures,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "adam": adam,
        "world": world,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save(out, Path(args.out) / f"rank{rank}.pt")
    dist_utils.teardown()
    return 0


if __name__ == "__main__":
    run_main(main, hard_exit=True)  # as dp_step.py: skip the interpreter's shutdown once saved
