"""How the item table's gradient travels between ranks (``deepspeed.item_exchange``).

Data parallelism all-reduces every gradient after the backward pass. The item table's gradient
is [N + 1, D], but one step touches only the rows of the items in its batch (inputs, targets,
sampled negatives, augmented views): a few tens of thousands out of millions. Each rank's
gradient is exactly zero outside those rows, so exchanging them alone sums to the same result.

- ``dense``: DeepSpeed's own all-reduce of every gradient (the table included), inside
  ``engine.backward``. Bytes per step follow the catalogue: (N + 1) x D x 4.
- ``sparse``: every gradient except the table's is all-reduced exactly as DeepSpeed does
  (``engine.buffered_allreduce_fallback``); for the table each rank all-gathers its touched row
  ids and those rows, and every rank adds the ranks' rows in rank order into the union of the
  touched rows, then scales by DeepSpeed's averaging factor. Bytes per step follow the rows the
  step touched. Only at ZeRO stage 0: stages 1 and 2 reduce in the ZeRO optimizer's own hooks
  (the config refuses ``sparse`` there).
- ``auto``: at ZeRO stage 0, per step, ``sparse`` when the gathered rows cost fewer bytes on
  the wire than the table's all-reduce, else the table's dense all-reduce (the decision uses the
  row counts every rank has gathered, so every rank decides the same); at stages 1 and 2,
  ``dense``.

Why not DeepSpeed's own sparse path: DeepSpeed 0.19.8 reduces sparsely only gradients that are
natively sparse (``nn.Embedding(sparse=True)``; its ``sparse_gradients`` flag, which compressed
dense embedding gradients, was removed and is ignored with a warning), and it leaves a sparse
COO gradient that torch's Adam refuses ("Adam does not support sparse gradients"). The table
here is tied: looked up by ``nn.Embedding`` for the inputs and indexed directly for the
next-item scores of targets and negatives, so even with ``sparse=True`` autograd accumulates a
dense gradient (checked: the lookup's sparse part plus the indexing's dense part is strided).

Exactness. Per element, DeepSpeed's path is ``all_reduce(sum)`` then ``mul_(predivide / world)``
(``DeepSpeedEngine.allreduce_bucket``). Here a row's sum is ``((0 + g_0) + g_1) + ...`` in rank
order (ranks that did not touch it contribute nothing, where the all-reduce adds their zero).
On 2 ranks that is ``g_0 + g_1``, which is what the all-reduce computes (addition commutes
bitwise), so parameters and Adam moments equal the dense path's exactly
(``tests/test_exchange.py``; ±0 are one value there). With 3 or more ranks the all-reduce sums in
an order of its own (a ring's chunks), so the two paths can differ in the last bit, as DeepSpeed's
bucket sizes already make them; every rank still ends bitwise identical, because all of them add
the same rows in the same order. The optimizer stays dense Adam: every row's moments decay
every step, touched or not.

Bytes (logged per step as ``exchange/...``, means over the logging interval): wire bytes one
rank sends for the table under the usual ring algorithms, ``2 (w - 1) / w x (N + 1) x D x 4``
for the all-reduce and ``(w - 1) x R_max x (D + 1) x 4`` for the all-gather of rows padded to
the largest rank's count R_max (each row carries its id as one more int32):
``item_bytes_sent`` what was sent, ``item_bytes_if_dense`` / ``item_bytes_if_sparse`` both ways
(sparse and auto), ``item_rows_touched`` the ranks' touched rows summed, ``item_rows_union``
the distinct ones, ``item_sparse_steps`` the share of steps that went sparse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from elcrec_dist.batching import TrainBatch
from elcrec_dist.config import ConfigError, ExperimentConfig


def touched_rows(batch: TrainBatch) -> torch.Tensor:
    """The item ids whose table rows a step on ``batch`` can give a gradient: the unique ids of
    its inputs [B, T], targets [B, T], negatives [B, T] and views [2B, T] -> [R] int64, sorted
    (0, the padding row, included when present: its gradient is zero, sending it costs one row)."""
    ids = [batch.inputs, batch.targets, batch.negatives, batch.views]
    return torch.unique(torch.cat([t.reshape(-1) for t in ids]))


def ring_allreduce_bytes(elements: int, world: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``elements`` float32 values."""
    return 2.0 * (world - 1) / world * elements * 4


@dataclass
class ExchangeLog:
    """Per-step figures summed since the last ``drain``."""

    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, figures: dict[str, float]) -> None:
        self.steps += 1
        for name, value in figures.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def drain(self) -> dict[str, float]:
        """Means per step since the last call (empty when no step ran); counting restarts."""
        out = {name: value / self.steps for name, value in self.sums.items()} if self.steps else {}
        self.steps, self.sums = 0, {}
        return out


class ItemExchange:
    """One way of exchanging the table's gradient. ``attach`` runs once, when the engine is
    built; ``after_backward`` after every ``engine.backward``, before ``engine.step``."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.log = ExchangeLog()

    def attach(self, engine: Any, config: ExperimentConfig) -> None:
        """Called once with the freshly built engine."""

    def after_backward(self, engine: Any, batch: TrainBatch) -> None:
        raise NotImplementedError


class DenseExchange(ItemExchange):
    """DeepSpeed's own all-reduce (done inside ``engine.backward``); only the bytes are logged."""

    name = "dense"

    def after_backward(self, engine: Any, batch: TrainBatch) -> None:
        table = item_table(engine)
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.log.add({"exchange/item_bytes_sent": ring_allreduce_bytes(table.numel(), world),
                      "exchange/item_sparse_steps": 0.0})


class SparseExchange(ItemExchange):
    """Touched rows only (see the module docstring). ``choose_cheaper``: ``auto``'s per-step
    choice of the cheaper of the two on the wire."""

    name = "sparse"
    choose_cheaper = False

    def attach(self, engine: Any, config: ExperimentConfig) -> None:
        if config.deepspeed.zero_stage != 0:  # config validation refuses this; never reached
            raise ConfigError(f"deepspeed.item_exchange={self.name} needs deepspeed.zero_stage 0")
        # mirror DeepSpeed's default averaging only; anything else would need its other branches
        if not (engine.gradient_average and engine.postscale_gradients()):
            raise ConfigError(
                "deepspeed.item_exchange: sparse exchange mirrors DeepSpeed's default "
                "gradient averaging (post-scaled mean); this engine is set otherwise"
            )
        table = item_table(engine)
        if table.dtype != torch.float32:
            raise ConfigError(f"deepspeed.item_exchange: sparse exchange needs an fp32 item table, "
                              f"got {table.dtype}")
        engine.enable_backward_allreduce = False  # this object reduces after engine.backward

    def after_backward(self, engine: Any, batch: TrainBatch) -> None:
        table = item_table(engine)
        reduce_all_but(engine, table)
        if table.grad is None:
            table.grad = torch.zeros_like(table)
        ids = touched_rows(batch)
        world = dist.get_world_size()
        counts = all_counts(ids.numel(), ids.device)
        rows, width = table.shape[1], max(counts)
        sparse_bytes = float((world - 1) * width * (rows + 1) * 4)
        dense_bytes = ring_allreduce_bytes(table.numel(), world)
        both = {"exchange/item_bytes_if_dense": dense_bytes,
                "exchange/item_bytes_if_sparse": sparse_bytes,
                "exchange/item_rows_touched": float(sum(counts))}
        if self.choose_cheaper and dense_bytes <= sparse_bytes:
            engine.buffered_allreduce_fallback(grads=[table.grad.data])
            self.log.add({**both, "exchange/item_bytes_sent": dense_bytes,
                          "exchange/item_sparse_steps": 0.0})
            return
        union = exchange_rows(engine, table.grad, ids, counts)
        self.log.add({**both, "exchange/item_bytes_sent": sparse_bytes,
                      "exchange/item_sparse_steps": 1.0, "exchange/item_rows_union": float(union)})


class AutoExchange(SparseExchange):
    """``auto`` at ZeRO stage 0 (the per-step cheaper choice); ``item_exchange`` picks dense at
    stages 1 and 2."""

    name = "auto"
    choose_cheaper = True


ITEM_EXCHANGES: dict[str, type[ItemExchange]] = {
    cls.name: cls for cls in (DenseExchange, SparseExchange, AutoExchange)
}


def item_exchange(config: ExperimentConfig) -> ItemExchange:
    """A fresh exchange for ``deepspeed.item_exchange`` (``auto`` at ZeRO 1/2 is ``dense``)."""
    name = config.deepspeed.item_exchange
    if name == "auto" and config.deepspeed.zero_stage != 0:
        name = "dense"
    try:
        return ITEM_EXCHANGES[name]()
    except KeyError:
        raise ConfigError(f"deepspeed.item_exchange: unknown exchange {name!r} "
                          f"(known: {', '.join(ITEM_EXCHANGES)})") from None


def attach_item_exchange(engine: Any, config: ExperimentConfig) -> ItemExchange:
    """Give ``engine`` its item exchange (``engine.item_exchange``); returns it."""
    exchange = item_exchange(config)
    exchange.attach(engine, config)
    engine.item_exchange = exchange
    return exchange


def exchange_after_backward(engine: Any, batch: TrainBatch) -> None:
    """The engine's exchange after ``engine.backward`` (engines built elsewhere: dense)."""
    exchange = getattr(engine, "item_exchange", None)
    if exchange is not None:
        exchange.after_backward(engine, batch)


def exchange_figures(engine: Any) -> dict[str, float]:
    """Bytes and rows per step since the last call, for the run log (empty without an exchange)."""
    exchange = getattr(engine, "item_exchange", None)
    return exchange.log.drain() if exchange is not None else {}


def item_table(engine: Any) -> torch.Tensor:
    """The item table parameter [N + 1, D] of the engine's model."""
    table: torch.Tensor = engine.module.model.item_embeddings.weight
    return table


def reduce_all_but(engine: Any, table: torch.Tensor) -> None:
    """All-reduce every trainable parameter's gradient except ``table``'s, as DeepSpeed's own
    stage-0 path does (a missing gradient becomes zeros first, as DeepSpeed makes it)."""
    grads = []
    for param in engine.module.parameters():
        if not param.requires_grad or param.numel() == 0 or param is table:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad.data)
    engine.buffered_allreduce_fallback(grads=grads)


def all_counts(count: int, device: torch.device) -> list[int]:
    """Every rank's ``count``, in rank order."""
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [int(p) for p in parts]


def averaging_factor(engine: Any) -> float | None:
    """What DeepSpeed multiplies a reduced gradient by (``allreduce_bucket``, post-scaled mean),
    or None when it leaves it as summed."""
    world = dist.get_world_size() / float(engine.sequence_parallel_size)
    predivide = engine.gradient_predivide_factor()
    if predivide != 1.0:  # pragma: no cover - our engine config never sets it
        raise ConfigError("deepspeed.item_exchange: sparse exchange expects no gradient predivide")
    return predivide / world if predivide != world else None


@torch.no_grad()
def exchange_rows(engine: Any, grad: torch.Tensor, ids: torch.Tensor, counts: list[int]) -> int:
    """Replace this rank's ``grad`` [N + 1, D] rows by their average over ranks, sending only
    this rank's ``ids`` [R] (its touched rows; every other row of its ``grad`` is zero).
    ``counts``: every rank's R. Returns the number of rows in the union.

    One all-gather of [R_max, D + 1] int32 per rank (the rows' float32 bits, then the id), the
    ranks' rows added in rank order into a zeroed [U, D] buffer, scaled, and written back."""
    d = grad.shape[1]
    width = max(counts)
    payload = torch.zeros((width, d + 1), dtype=torch.int32, device=grad.device)
    payload[: ids.numel(), :d] = grad.index_select(0, ids).view(torch.int32)
    payload[: ids.numel(), d] = ids.to(torch.int32)
    parts = [torch.empty_like(payload) for _ in counts]
    dist.all_gather(parts, payload)
    gathered = [part[:n] for part, n in zip(parts, counts, strict=True)]
    all_ids = torch.cat([part[:, d] for part in gathered]).long()
    union, where = torch.unique(all_ids, return_inverse=True)
    summed = torch.zeros((union.numel(), d), dtype=grad.dtype, device=grad.device)
    start = 0
    for part in gathered:  # rank order, the same on every rank: ranks stay bitwise identical
        n = part.shape[0]
        summed.index_add_(0, where[start : start + n], part[:, :d].contiguous().view(grad.dtype))
        start += n
    factor = averaging_factor(engine)
    if factor is not None:
        summed.mul_(factor)
    grad.index_copy_(0, union, summed)
    return int(union.numel())
