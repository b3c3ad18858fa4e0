"""Worker for the non-finite step tests, one process per rank (the deepspeed launcher, or plain
``python`` for a world of one).

Every rank builds the same model (seeded) and the same global batch per step; rank r trains on
its rows. Two engines from the same start run the same steps: in "skipped", at ``--bad-step``
rank ``--bad-rank`` alone multiplies one gradient by NaN (the grad of the *last* trainable
parameter, which ZeRO places in the last rank's partition, so under ZeRO only that rank holds
the NaN after the reduction); "omitted" leaves that step out entirely, the reference a skipped
step must equal bitwise. Writes OUT/rank{r}.pt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.batching import TrainBatch, make_train_batch
from elcrec_dist.config import ExperimentConfig, load_config
from elcrec_dist.model import ELCRec
from elcrec_dist.trainer.engine import NONFINITE_RANKS, base_optimizer, build_engine, train_step
from launcher.common import run_main

NUM_ITEMS = 80
USERS = 32


def users(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.choice(np.arange(1, NUM_ITEMS + 1), size=int(rng.integers(4, 12)), replace=False)
        for _ in range(n)
    ]


def rows_of(batch: TrainBatch, lo: int, hi: int) -> TrainBatch:
    b = batch.inputs.shape[0]
    views = torch.cat([batch.views[lo:hi], batch.views[b + lo : b + hi]])
    return TrainBatch(batch.inputs[lo:hi], batch.targets[lo:hi], batch.negatives[lo:hi], views)


def run(
    config: ExperimentConfig,
    device: torch.device,
    *,
    steps: int,
    bad_step: int,
    bad_rank: int,
    omit: bool,
) -> dict[str, object]:
    rank, world = dist_utils.rank(), dist_utils.world_size()
    torch.manual_seed(0)
    model = ELCRec(config.model, num_items=NUM_ITEMS).to(device)
    engine = build_engine(model, config)
    last = [p for p in engine.module.parameters() if p.requires_grad][-1]
    per_rank = USERS // world
    losses, flags = [], []
    for step in range(steps):
        if omit and step == bad_step:
            continue
        batch = make_train_batch(
            users(USERS, seed=step),
            num_items=NUM_ITEMS,
            max_len=config.model.max_len,
            augment=config.augment,
            generator=torch.Generator().manual_seed(step),
        )
        hook = None
        if step == bad_step and rank == bad_rank:
            hook = last.register_hook(lambda g: g * float("nan"))
        record: dict[str, torch.Tensor] = {}
        losses.append(
            train_step(
                engine,
                rows_of(batch, rank * per_rank, (rank + 1) * per_rank),
                config,
                record=record,
            )
        )
        flags.append(int(record[NONFINITE_RANKS]))
        if hook is not None:
            hook.remove()
    optimizer = base_optimizer(engine)
    result: dict[str, object] = {
        "state": {k: v.detach().float().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict()["state"],
        "losses": losses,
        "flags": flags,
    }
    if hasattr(model.cluster_centers, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        result["master_centres"] = safe_get_full_fp32_param(model.cluster_centers).float().clone()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bad-step", type=int, default=-1)
    parser.add_argument("--bad-rank", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    config = load_config(
        None,
        [
            "model.hidden_size=16",
            "model.max_len=12",
            "model.num_clusters=4",
            f"train.batch_size={USERS}",
            "model.hidden_dropout=0.0",
            "model.attention_dropout=0.0",
            *args.overrides,
        ],
    )
    device = dist_utils.init(local_rank=args.local_rank)
    out = {
        variant: run(
            config,
            device,
            steps=args.steps,
            bad_step=args.bad_step,
            bad_rank=args.bad_rank,
            omit=variant == "omitted",
        )
        for variant in ("skipped", "omitted")
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save(out, Path(args.out) / f"rank{dist_utils.rank()}.pt")
    dist_utils.teardown()
    return 0


if __name__ == "__main__":
    run_main(main, hard_exit=True)
