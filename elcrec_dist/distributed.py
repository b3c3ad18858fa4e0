"""Process-group wiring, kept out of the model: init, rank helpers, reductions, teardown, and
the requests to stop that reach a rank from outside (SIGTERM, its launcher gone).

On CPU (DeepSpeed's CPU accelerator) the backend is gloo; on CUDA it is NCCL. A plain
``python launcher/train.py`` without a launcher runs as a world of one.

Every collective waits at most ``timeout_s`` (``train.collective_timeout_s``) for its peers: a
peer that hung or died makes the others fail within that time (exit 75, ``elcrec_dist.errors``)
instead of the backend's default of many minutes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from elcrec_dist.processes import has_ended, launcher_ancestors

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


DEFAULT_TIMEOUT_S = 120.0  # train.collective_timeout_s's default


def init(*, local_rank: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join (or create) the process group and return this process's device. Collectives,
    and the rendezvous itself, fail after ``timeout_s`` seconds without their peers."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    timeout = datetime.timedelta(seconds=timeout_s)
    accelerator = get_accelerator()
    backend = (
        "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    )
    present = [name for name in REQUIRED_ENV if name in os.environ]
    if not present:
        # Started without a launcher: a world of one. Its group lives in an in-process store,
        # so it needs no TCP port (a probed "free" port can be taken before it is bound).
        # MASTER_PORT 0: a child process that inherits this environment binds any free port.
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK=str(local_rank or 0),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT="0",
        )
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    elif len(present) != len(REQUIRED_ENV):
        missing = [name for name in REQUIRED_ENV if name not in os.environ]
        raise RuntimeError(f"distributed environment is incomplete: missing {', '.join(missing)}")
    if accelerator.device_name() == "cpu":
        skip_shm_allreduce_op()
    # With a group already in place DeepSpeed wraps it instead of creating one.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    new_groups_wait(timeout)
    lr = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one host share its cores; oversubscribed intra-op threads thrash.
            local = int(os.environ.get("LOCAL_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
        return torch.device("cpu")
    accelerator.set_device(lr)
    return torch.device(accelerator.device_name(), lr)


def new_groups_wait(timeout: datetime.timedelta) -> None:
    """Give every process group DeepSpeed creates from now on the same ``timeout`` as ours.

    DeepSpeed 0.19 does not run its collectives on the group it was handed: its data-parallel
    group, which carries the gradient all-reduce of every step, is a clone of the world made
    with ``torch.distributed.new_group(ranks)``, and a group made without a timeout gets
    torch's default (30 minutes on gloo, 10 on NCCL), not the world's. A peer that hung
    between its forward collectives and that all-reduce then held the other ranks for half an
    hour instead of ``train.collective_timeout_s``. Every group DeepSpeed makes goes through
    its backend's ``new_group``, so that one call is given the timeout.
    """
    import deepspeed.comm.comm as ds_comm

    backend = ds_comm.cdb
    if backend is None or not hasattr(backend, "new_group"):
        raise RuntimeError("DeepSpeed's communication backend is not initialised")

    def new_group(ranks: Any) -> Any:
        return dist.new_group(ranks=list(ranks), timeout=timeout)

    backend.new_group = new_group


def skip_shm_allreduce_op() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce op.

    DeepSpeed 0.19's torch backend JIT-compiles that op when it starts (about 90 s the first
    time, again whenever the build environment changes) and maps a 66 MB buffer per rank in
    /dev/shm named after the master address and port, which it never unlinks: every run on a
    new port leaves them behind (a day of tests filled 19 GB of /dev/shm and the OOM killer
    stepped in). Only ``inference_all_reduce`` uses the op, with a torch.distributed fallback;
    training's all-reduce never does, so not building it changes no number.
    """
    import importlib

    # not ``import deepspeed.comm.torch as m``: the package's ``torch`` attribute is torch itself
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch, "build_shm_op"):  # a later DeepSpeed without it builds nothing here
        setattr(ds_torch, "build_shm_op", lambda: None)  # noqa: B010


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def _all_reduce_dict(
    values: Mapping[str, float], device: torch.device, op: Any
) -> dict[str, float]:
    keys = sorted(values)
    if not dist.is_initialized() or world_size() == 1:
        return {k: float(values[k]) for k in keys}
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return dict(zip(keys, tensor.tolist(), strict=True))


def all_reduce_sums(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over ranks (float64, fixed key order)."""
    return _all_reduce_dict(values, device, dist.ReduceOp.SUM)


def all_reduce_max(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Maximum of a dict of floats over ranks (float64, fixed key order)."""
    return _all_reduce_dict(values, device, dist.ReduceOp.MAX)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if dist.is_initialized() and world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) ``value`` on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's (picklable) ``value``, in rank order, on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def row_counts(local_rows: int, device: torch.device) -> list[int]:
    """Every rank's number of rows, in rank order."""
    if not dist.is_initialized() or world_size() == 1:
        return [local_rows]
    mine = torch.tensor([local_rows], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(counts, mine)
    return [int(c.item()) for c in counts]


def gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] from every rank in rank order, keeping the gradient.

    Ranks may hold different numbers of rows (``counts``): rows are padded to the largest count
    for the collective and the padding is cut off again, so it receives no gradient.
    """
    if len(counts) == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    width = max(counts)
    if x.shape[0] < width:
        x = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))])
    parts = all_gather(x)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (no gradient); ``x`` itself in a world of one."""
    if not dist.is_initialized() or world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class BatchShard:
    """Where this rank's B_local rows sit in the global batch of B_global rows.

    Under data parallelism every term is returned as this rank's *contribution*: the terms of
    the global batch are the sums of the contributions over ranks (so 2 ranks x 128 users
    compute the same loss as 1 rank x 256). ``gather`` concatenates a [B_local, ...] tensor
    from all ranks in rank order, with gradient; ``global_sum`` adds a tensor over ranks
    (no gradient). With ``local_negatives`` the contrastive terms use only this rank's rows as
    negatives (each rank's mean, weighted by its share of the global batch).
    The default is a world of one, where a contribution is the term itself.
    """

    world: int = 1
    offset: int = 0  # index of this rank's first row in the gathered batch
    global_rows: int | None = None  # B_global; None means B_local (a world of one)
    gather: Callable[[torch.Tensor], torch.Tensor] = _identity
    global_sum: Callable[[torch.Tensor], torch.Tensor] = _identity
    local_negatives: bool = False

    def rows(self, local_rows: int) -> int:
        return local_rows if self.global_rows is None else self.global_rows


LOCAL = BatchShard()


def batch_shard(
    local_rows: int, *, device: torch.device, local_negatives: bool = False
) -> BatchShard:
    """The ``BatchShard`` of this rank for a step where it holds ``local_rows`` users."""
    counts = row_counts(local_rows, device)
    r = rank()
    return BatchShard(
        world=len(counts),
        offset=sum(counts[:r]),
        global_rows=sum(counts),
        gather=lambda x: gather_rows(x, counts),
        global_sum=global_sum,
        local_negatives=local_negatives,
    )


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak memory of the busiest rank: resident set (MiB) and, on CUDA, the allocator's peak."""
    import resource

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else -1.0
    peak = all_reduce_max({"rss_mib": rss_mib, "cuda_mib": cuda_mib}, device)
    cuda = peak["cuda_mib"] if peak["cuda_mib"] >= 0 else None
    return {"rss_mib": peak["rss_mib"], "cuda_max_allocated_mib": cuda}


# --- requests to stop ----------------------------------------------------------------------------
#
# A rank is asked to stop from outside by SIGTERM (pod deletion, preemption, the launcher passing
# on its own signal) or by its DeepSpeed launcher disappearing (``kill`` of a bare ``deepspeed``
# command ends the runner at once and would leave the ranks running as orphans). Either only
# sets a flag here; the trainer folds the flag into the step's one all-reduce, so every rank
# sees a request made on any rank at the same step, checkpoints there and exits 75.

_stop_reason: str | None = None
_stop_lock = threading.Lock()


def request_stop(reason: str) -> None:
    """Ask this process to stop at the next step boundary; the first reason is kept."""
    global _stop_reason
    with _stop_lock:
        if _stop_reason is None:
            _stop_reason = reason


def stop_reason() -> str | None:
    """Why this process was asked to stop, or None (this rank only: see ``request_stop``)."""
    return _stop_reason


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    request_stop(signal.Signals(signum).name)


class _LauncherWatch(threading.Thread):
    """Polls the launcher processes above this rank; requests a stop when one has ended."""

    def __init__(self, chain: list[Any], poll_s: float) -> None:
        super().__init__(name="launcher-watch", daemon=True)
        self.chain, self.poll_s = chain, poll_s
        self.done = threading.Event()

    def run(self) -> None:
        while self.chain and not self.done.wait(self.poll_s):
            for process in self.chain:
                if has_ended(process):
                    request_stop(f"launcher process {process.pid} ended")
                    return


@contextlib.contextmanager
def stop_requests(*, poll_s: float = 1.0) -> Iterator[None]:
    """Within: SIGTERM, or the end of a DeepSpeed launcher process above this rank (checked
    every ``poll_s`` seconds), requests a stop (``stop_reason``) instead of ending the process.
    The SIGTERM handler is installed from the main thread only (Python allows no other)."""
    global _stop_reason
    _stop_reason = None
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    watch = _LauncherWatch(launcher_ancestors(), poll_s)
    watch.start()
    try:
        yield
    finally:
        watch.done.set()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
