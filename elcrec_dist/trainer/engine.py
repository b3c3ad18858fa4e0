"""The DeepSpeed engine and one optimizer step.

One place (``build_engine``) calls ``deepspeed.initialize``; the model knows nothing of engines or
ranks. A step's randomness (batch negatives, augmentations, dropout) is seeded from
(seed, rank, global step) only, so a resumed run draws exactly what the uninterrupted one drew.

A step whose loss or gradient is not finite on any rank is not applied: each rank's finding
travels in the all-reduce that already sums the loss terms (no second collective, no second
host sync), so every rank skips the same step. DeepSpeed checks this only under fp16 loss
scaling; here it holds in fp32 and bf16 alike. The trainer counts the skipped steps
(``NONFINITE_RANKS`` in the step's record) and stops a run that keeps diverging.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from elcrec_dist import distributed as dist_utils
from elcrec_dist.batching import TrainBatch, make_train_batch
from elcrec_dist.checkpoint import safe_checkpoint_engine
from elcrec_dist.config import ExperimentConfig, LossConfig
from elcrec_dist.distributed import BatchShard
from elcrec_dist.losses import elcrec_terms, weighted_total
from elcrec_dist.model import ELCRec
from elcrec_dist.trainer.exchange import attach_item_exchange, exchange_after_backward
from elcrec_dist.trainer.intents import intent_source

# What ``train_step`` adds to its ``record``: 0-dim CPU tensors, the same on every rank.
NONFINITE_RANKS = "nonfinite_ranks"  # ranks whose loss or gradient was not finite (0: applied)
STOP_RANKS = "stop_ranks"  # ranks asked to stop (``dist_utils.request_stop``) before this step
# What ``train_step`` returns beside the loss terms: the L2 norm of the global batch's gradient
# over every trained parameter, before clipping and the update (the same number on every rank)
GRAD_NORM = "grad/norm"


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
    # deepspeed.item_exchange: how the table's gradient travels
    attach_item_exchange(engine, config)
    # DeepSpeed's own reader unpickles with weights_only=False: code in a planted file would run
    engine.checkpoint_engine = safe_checkpoint_engine()
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
    after-step hook (learned centres: back onto the unit sphere); neither happens when the loss
    or a gradient is not finite on any rank (the module docstring).

    Returns the loss terms of the *global* batch (the same numbers on every rank). ``record``
    also receives ``NONFINITE_RANKS`` and ``STOP_RANKS``.
    """
    device = engine.device
    shard = dist_utils.batch_shard(batch.inputs.shape[0], device=device,
                                   local_negatives=config.loss.negatives == "local")
    batch = TrainBatch(
        *(t.to(device) for t in (batch.inputs, batch.targets, batch.negatives, batch.views))
    )
    terms = engine(batch, shard, record)  # this rank's contributions; they sum to the terms
    total = weighted_total(terms, config.loss)
    # DeepSpeed averages gradients over ranks; the global loss is the *sum* of contributions.
    engine.backward(total * shard.world)
    exchange_after_backward(engine, batch)  # sparse: the item table's touched rows, after backward
    names = [*terms, "total"]
    grads = local_gradients(engine)
    norms = torch._foreach_norm(grads) if grads else []  # one fused pass, for both uses
    flags = [not_finite(total, grads, norms=norms),
             torch.tensor(float(dist_utils.stop_reason() is not None), device=device),
             gradient_norm_share(engine, norms, device=device)]
    values = torch.stack([*(t.detach().float() for t in terms.values()), total.detach().float(),
                          *flags])
    # the step's one sync
    *summed, nonfinite, stopping, norm_sq = dist_utils.global_sum(values).tolist()
    applied = nonfinite == 0
    with update_skipped(engine, skip=not applied):
        engine.step()  # skipped or not: DeepSpeed clears the gradients and its buffers
    if applied:
        intent_source(config.model.intents).after_step(engine)
    if record is not None:
        record[NONFINITE_RANKS] = torch.tensor(nonfinite)
        record[STOP_RANKS] = torch.tensor(stopping)
    figures = {f"loss/{name}": value for name, value in zip(names, summed, strict=True)}
    figures[GRAD_NORM] = math.sqrt(norm_sq) if math.isfinite(norm_sq) else math.inf
    return figures


def local_gradients(engine: Any) -> list[torch.Tensor]:
    """The gradients this rank holds after ``engine.backward``: the parameters' own (ZeRO 0), or
    the ZeRO optimizer's partition of the reduced gradients (stages 1 and 2), or both."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    partitions = getattr(engine.optimizer, "averaged_gradients", None) or {}
    for group in partitions.values():
        grads.extend(g for g in group or () if g is not None)
    return grads


def gradient_norm_share(
    engine: Any, norms: Sequence[torch.Tensor], *, device: torch.device
) -> torch.Tensor:
    """This rank's share of the squared global gradient norm, from the L2 norms of its
    ``local_gradients`` (0-dim float32, no host sync):
    summed over ranks it is the square of ``GRAD_NORM``. At ZeRO 0 every rank holds the whole
    reduced gradient, so each contributes 1/world of its squared norm; at stages 1 and 2 each
    holds a disjoint partition (``local_gradients``) and contributes all of its own."""
    if not norms:
        return torch.zeros((), device=device)
    squares = torch.stack([n.float() for n in norms]).square().sum()
    if engine.zero_optimization_stage() == 0:
        return squares / dist_utils.world_size()
    return squares


def not_finite(
    loss: torch.Tensor, grads: Sequence[torch.Tensor], *,
    norms: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """1.0 if ``loss`` is NaN or infinite, or a gradient holds a NaN or infinity or squares past
    float32's range, else 0.0 (0-dim float32 on the loss's device; no host sync).

    The gradients are checked through their L2 norms (one fused pass, ``_foreach_norm``, as
    ``clip_grad_norm_`` does; an element-wise ``isfinite`` pass cost 80x more on CPU). A norm is
    not finite when an element is not, or when the squares overflow: elements above ~1e19,
    which Adam's second moment (the squared gradient) would turn into infinity anyway.
    """
    if norms is None:
        norms = torch._foreach_norm(list(grads)) if grads else []
    values = torch.stack([loss.detach().float().reshape(()), *(n.float() for n in norms)])
    return (~torch.isfinite(values).all()).float()


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that updates the fp32 weights: the engine's own at ZeRO 0, the one
    inside DeepSpeed's ZeRO optimizer at stages 1 and 2."""
    for candidate in (engine.optimizer, getattr(engine.optimizer, "optimizer", None)):
        if isinstance(candidate, torch.optim.Optimizer):
            return candidate
    raise RuntimeError(f"no torch optimizer inside {type(engine.optimizer).__name__}")


def engine_state_finite(engine: Any) -> bool:
    """Whether every weight this rank holds (the module's, the optimizer's fp32 copy or ZeRO
    partition) and every tensor of its optimizer state (Adam's moments) is finite. One host
    sync; for the checks before a checkpoint is committed, not for every step."""
    optimizer = base_optimizer(engine)
    tensors = [*engine.module.parameters(),
               *(p for group in optimizer.param_groups for p in group["params"])]
    tensors += [v for state in optimizer.state.values() for v in state.values()
                if torch.is_tensor(v)]
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


@contextlib.contextmanager
def update_skipped(engine: Any, *, skip: bool) -> Iterator[None]:
    """Within, with ``skip``, the base optimizer's ``step`` does nothing: ``engine.step()`` then
    runs DeepSpeed's own bookkeeping (gradients and ZeRO buffers cleared, partitions copied back
    unchanged) but changes no weight, no Adam moment and no Adam step count."""
    if not skip:
        yield
        return
    optimizer = base_optimizer(engine)
    optimizer.step = lambda *args, **kwargs: None  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del optimizer.step  # the class's step again


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
