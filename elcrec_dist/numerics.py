"""Process-wide torch settings for CPU work: subnormal floats flushed to zero, and no filling
of fresh tensors in deterministic mode.

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
"""

from __future__ import annotations

import os

import torch

from elcrec_dist.errors import PermanentError

ENV = "ELCREC_FLUSH_SUBNORMALS"
# Large enough that torch splits an element-wise op over every intra-op thread (its grain is
# 32,768 elements), small enough to cost about a millisecond.
_PROBE_ELEMENTS = 1 << 20
# The bits of a float32 subnormal (2^-129, about 1.5e-39), written as an integer: converting a
# Python float would itself be flushed on a thread that flushes.
_SUBNORMAL_BITS = 0x00100000


def requested() -> bool:
    """Whether this process should flush subnormals: ``ELCREC_FLUSH_SUBNORMALS`` unset or 1."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise PermanentError(
            f"{ENV} must be 0 (keep subnormal floats) or 1 (flush them), got {value!r}"
        )
    return value == "1"


def apply() -> bool:
    """Set flush-to-zero and denormals-are-zero on this thread (and on the threads it creates
    from now on) as ``requested``, and stop deterministic mode from filling fresh tensors.
    Returns whether this CPU supports flushing (x86 does). Idempotent."""
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
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
