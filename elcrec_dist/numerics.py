"""Process-wide settings for CPU work: subnormal floats flushed to zero, no filling of fresh
tensors in deterministic mode, and freed memory kept by the allocator for the next step.

Why: the gradients of the contrastive terms (softmaxes of raw dot products at temperature 1)
hold many entries below float32's smallest normal value, 1.2e-38. Intel cores take a
microcode assist for every arithmetic operation on such an operand: on a 2-core Xeon a
[508, 508] x [508, 3200] product in the sequence-contrastive backward took 72 ms instead of
6 ms, and a Beauty training epoch 60 s instead of 32 s (issue 19). With FTZ (results below
the normal range become 0) and DAZ (such inputs are read as 0) the hardware never sees one.
What changes is only values smaller than 1.2e-38, each of which adds less than 1e-38 to
anything it enters: float noise, far below one float32 rounding step of the losses, weights
and scores we compute (docs/PERFORMANCE.md holds the before/after figures).

Where: the setting lives in each thread's MXCSR register, and a thread starts with its
creator's. torch's intra-op threads are created at the first large tensor operation, and a
thread created before the setting keeps subnormals (``probe`` then reports "partial"). So it
is applied when ``elcrec_dist.model`` is imported: every process that computes with the model
(training ranks, evaluation, inference, the benches and probes, the test process) imports it
before its first tensor operation, while data preparation and the Kubernetes CLI, which never
load torch, do not pay for it. ``ELCREC_FLUSH_SUBNORMALS=0`` keeps IEEE subnormals (for
comparing with runs made before, or on purpose); unset or ``1`` flushes them. On CPUs without
the control (torch supports it on x86) ``apply`` returns False and ``probe`` reports "off".

Fresh tensors: with ``torch.use_deterministic_algorithms(True)`` (``train.deterministic``, the
default) torch also fills every newly allocated tensor with NaN, so that a kernel reading memory
it never wrote shows up. That is a debugging aid, not part of determinism (a kernel that writes
its whole output gives the same bits either way, and the seeded-run tests compare bits), and it
cost 10-15 % of a CPU training step: a write pass over every activation, gradient and
temporary. ``apply`` switches it off.

Freed memory: torch's CPU tensors come from the C library's ``malloc``, and glibc serves a
request above 32 MiB (and, by its sliding threshold, many above 128 KiB) with a fresh ``mmap``
that ``free`` hands straight back to the kernel. A training step allocates and frees the same
large activations and gradients every time (Beauty's FFN activations are 39 MB each), so every
step page-faulted them in again, each 4 KiB page zeroed by the kernel: a [38100, 64] x [64, 256]
product took 18 ms into a fresh tensor and 7 ms into a kept one, and the faults were about a
third of a Beauty training step. ``apply`` tells glibc (``mallopt``) to serve every request from
its heap and to keep freed memory there: the next step reuses it without a fault. The costs:
the process keeps its peak heap until it exits (a trainer does anyway: every step reaches the
same peak), and the heap takes a few rounds to settle, holding the holes that the interpreter's
small allocations leave between large blocks (a Beauty training process peaked at 956 MiB
against 944 MiB with glibc's defaults and stayed flat over 70 epochs; a loop of one 64 MiB
tensor alone, the worst case, settles at up to 735 MiB). ``ELCREC_KEEP_FREED_MEMORY=0``
leaves glibc's defaults; on a C library other than glibc (``mallopt`` missing) nothing changes
and ``allocator`` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from elcrec_dist.errors import PermanentError

ENV = "ELCREC_FLUSH_SUBNORMALS"
KEEP_ENV = "ELCREC_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h): no mmap'd chunks; give the heap's top back to the
# kernel only above this many free bytes (never, in practice)
_M_MMAP_MAX, _M_TRIM_THRESHOLD = -4, -1
_NEVER_TRIM = (1 << 31) - 1
_allocator = "glibc defaults"
# Large enough that torch splits an element-wise op over every intra-op thread (its grain is
# 32,768 elements), small enough to cost about a millisecond.
_PROBE_ELEMENTS = 1 << 20
# The bits of a float32 subnormal (2^-129, about 1.5e-39), written as an integer: converting a
# Python float would itself be flushed on a thread that flushes.
_SUBNORMAL_BITS = 0x00100000


def _switch(name: str, off: str, on: str) -> bool:
    """Whether the environment switch ``name`` is on: unset or 1 (0 is off, anything else an
    error naming it)."""
    value = os.environ.get(name, "1").strip()
    if value not in ("0", "1"):
        raise PermanentError(f"{name} must be 0 ({off}) or 1 ({on}), got {value!r}")
    return value == "1"


def requested() -> bool:
    """Whether this process should flush subnormals: ``ELCREC_FLUSH_SUBNORMALS`` unset or 1."""
    return _switch(ENV, "keep subnormal floats", "flush them")


def keep_freed_memory() -> str:
    """Tell glibc to keep freed memory for reuse (the module docstring) unless
    ``ELCREC_KEEP_FREED_MEMORY=0``; returns what ``allocator`` then reports. Idempotent."""
    global _allocator
    if not _switch(KEEP_ENV, "glibc's defaults", "keep freed memory"):
        _allocator = "glibc defaults"
        return _allocator
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        _allocator = "not glibc: unchanged"
    elif mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1:
        _allocator = "freed memory kept"
    else:
        _allocator = "mallopt refused: unchanged"
    return _allocator


def allocator() -> str:
    """What ``keep_freed_memory`` did in this process: "freed memory kept", "glibc defaults"
    (switched off or not applied yet) or why nothing changed."""
    return _allocator


def apply() -> bool:
    """Set flush-to-zero and denormals-are-zero on this thread (and on the threads it creates
    from now on) as ``requested``, stop deterministic mode from filling fresh tensors and keep
    freed memory (``keep_freed_memory``). Returns whether this CPU supports flushing (x86
    does). Idempotent."""
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    keep_freed_memory()
    return bool(torch.set_flush_denormal(requested()))


def probe() -> str:
    """What the intra-op threads do with subnormals now: "on" (every thread flushes), "off"
    (none does) or "partial" (some threads, e.g. those created before the setting, do not).

    Multiplies a float32 tensor of subnormals by 1 in torch's parallel element-wise kernel,
    which gives each intra-op thread a share, and counts the results that stayed non-zero (by
    their bits: a comparison in floating point would itself read subnormals as 0).
    """
    bits = torch.full((_PROBE_ELEMENTS,), _SUBNORMAL_BITS, dtype=torch.int32)
    product = bits.view(torch.float32) * 1.0
    kept = int((product.view(torch.int32) != 0).sum())
    if kept == 0:
        return "on"
    return "off" if kept == _PROBE_ELEMENTS else "partial"
