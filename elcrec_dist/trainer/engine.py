"""The DeepSpeed engine and one optimizer step.

One place (``build_engine``) calls ``deepspeed.initialize``; the model knows nothing of engines or
ranks. A step's randomness (batch negatives, augmentations, dropout) is seeded from
(seed, rank, global step) only, so a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from elcrec_dist import distributed as dist_utils
from elcrec_dist.batching import TrainBatch, make_train_batch
from elcrec_dist.config import ExperimentConfig, LossConfig
from elcrec_dist.distributed import BatchShard
from elcrec_dist.losses import elcrec_terms, weighted_total
from elcrec_dist.model import ELCRec
from elcrec_dist.trainer.exchange import attach_item_exchange, exchange_after_backward
from elcrec_dist.trainer.intents import intent_source


class ELCRecObjective(nn.Module):
    """What the engine runs: the model plus the configured objective, returning named terms."""

    def __init__(self, model: ELCRec, config: ExperimentConfig) -> None:
        super().__init__()
        self.model = model
        self.loss_config = config.loss
        self.normalised_centres = intent_source(config.model.intents).normalised_assignment

    def forward(
        self, batch: TrainBatch, shard: BatchShard, record: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return elcrec_terms(self.model, batch, self.loss_config, shard, record=record,
                            normalised_centres=self.normalised_centres)


def deepspeed_config(config: ExperimentConfig, world: int) -> dict[str, Any]:
    """The engine's JSON config, derived from the ``train`` and ``deepspeed`` sections."""
    train, ds = config.train, config.deepspeed
    if train.batch_size % world:
        raise ValueError(
            f"train.batch_size ({train.batch_size}) must be divisible by the world size ({world})"
        )
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // world,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                "torch_adam": ds.torch_adam,
                "adam_w_mode": False,
            },
        },
        "zero_optimization": {
            "stage": ds.zero_stage,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size,
            "overlap_comm": ds.overlap_comm,
        },
        "bf16": {"enabled": ds.bf16},
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: ELCRec, config: ExperimentConfig) -> Any:
    """The DeepSpeed engine over the objective. Centres that the intent source sets itself
    (``model.intents: epoch_kmeans``: k-means each epoch) are frozen and left out of it."""
    import deepspeed

    if not intent_source(config.model.intents).trainable:
        model.cluster_centers.requires_grad_(False)
    objective = ELCRecObjective(model, config)
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=[p for p in objective.parameters() if p.requires_grad],
        config=deepspeed_config(config, dist_utils.world_size()),
    )
    attach_item_exchange(engine, config)  # deepspeed.item_exchange: how the table's gradient travels
    return engine


def use_deterministic_kernels(device: torch.device, enabled: bool) -> None:
    """Switch torch's deterministic kernels on or off for this process (``train.deterministic``).

    On CPU every op of the training step has a deterministic kernel (``tests/test_train.py``
    checks a step's gradients bitwise at two threads); without them the backward of gathered
    rows accumulates in a thread-dependent order. On other devices an op without a
    deterministic kernel warns instead of stopping the run, and CUDA's cuBLAS gets the fixed
    workspace it needs (``CUBLAS_WORKSPACE_CONFIG``, unless already set); not verified on a GPU.
    """
    if enabled and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=device.type != "cpu")


def init_model(config: ExperimentConfig, *, num_items: int, device: torch.device) -> ELCRec:
    """The untrained model, the same on every rank (seeded by ``train.seed``), on ``device``,
    with the kernels' determinism set as ``train.deterministic`` asks."""
    use_deterministic_kernels(device, config.train.deterministic)
    torch.manual_seed(config.train.seed)
    return ELCRec(config.model, num_items=num_items).to(device)


def step_seed(seed: int, rank: int, global_step: int) -> int:
    """The seed of one rank's step: batches, augmentations and dropout depend on nothing else,
    which makes a resumed run draw exactly what the uninterrupted one drew."""
    state = np.random.SeedSequence([seed, rank, global_step]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> 1)


def needs_views(loss: LossConfig) -> bool:
    """Whether the step needs the two augmented views (a contrastive term has weight)."""
    return loss.seq_cl_weight > 0 or loss.intent_cl_weight > 0


def train_step(
    engine: Any,
    batch: TrainBatch,
    config: ExperimentConfig,
    *,
    record: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """One optimizer step on this rank's share of the global batch, then the intent source's
    after-step hook (learned centres: back onto the unit sphere).

    Returns the loss terms of the *global* batch (the same numbers on every rank).
    """
    device = engine.device
    shard = dist_utils.batch_shard(batch.inputs.shape[0], device=device,
                                   local_negatives=config.loss.negatives == "local")
    batch = TrainBatch(*(t.to(device) for t in (batch.inputs, batch.targets, batch.negatives, batch.views)))
    terms = engine(batch, shard, record)  # this rank's contributions; they sum to the terms
    total = weighted_total(terms, config.loss)
    # DeepSpeed averages gradients over ranks; the global loss is the *sum* of contributions.
    engine.backward(total * shard.world)
    exchange_after_backward(engine, batch)  # sparse: the item table's touched rows, after backward
    engine.step()
    intent_source(config.model.intents).after_step(engine)
    names = [*terms, "total"]
    values = torch.stack([*(t.detach().float() for t in terms.values()), total.detach().float()])
    summed = dist_utils.global_sum(values).tolist()
    return {f"loss/{name}": value for name, value in zip(names, summed, strict=True)}


def run_step(
    engine: Any,
    users: Sequence[np.ndarray],
    config: ExperimentConfig,
    *,
    num_items: int,
    rank: int,
    global_step: int,
    record: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Global step ``global_step`` on this rank's ``users`` (full sequences): the batch and the
    dropout seeded from (seed, rank, step), then ``train_step``. What training and the speed
    benchmarks run."""
    seed = step_seed(config.train.seed, rank, global_step)
    torch.manual_seed(seed)  # dropout
    batch = make_train_batch(users, num_items=num_items, max_len=config.model.max_len,
                             augment=config.augment, generator=torch.Generator().manual_seed(seed),
                             with_views=needs_views(config.loss))
    return train_step(engine, batch, config, record=record)
