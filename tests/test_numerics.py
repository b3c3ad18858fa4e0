"""Subnormal flushing (``elcrec_dist.numerics``): where it is set, what it changes.

Each case runs in a fresh interpreter: the setting is per thread and fixed when torch's
intra-op threads start, so only a new process shows what an entry point gets.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from elcrec_dist import numerics
from elcrec_dist.errors import PermanentError

PROBE_AFTER_IMPORT = """
import torch
torch.set_num_threads(2)
{before}
import elcrec_dist.model
from elcrec_dist import numerics
print(numerics.probe())
"""
# Starts torch's intra-op threads (a large element-wise op) before the model module is imported.
POOL_FIRST = "torch.ones(1 << 22) * 2.0"


def probe_in_fresh_process(*, before: str = "", flush: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != numerics.ENV}
    if flush is not None:
        env[numerics.ENV] = flush
    code = PROBE_AFTER_IMPORT.format(before=before)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


def needs_daz() -> None:
    # torch flushes on x86 only; elsewhere apply() says so and there is nothing to test
    if not torch.set_flush_denormal(numerics.requested()):
        pytest.skip("this CPU has no flush-to-zero control torch can set")


def test_importing_the_model_flushes_on_every_intra_op_thread() -> None:
    needs_daz()
    assert probe_in_fresh_process() == "on"
    assert probe_in_fresh_process(flush="1") == "on"


def test_the_environment_keeps_subnormals_when_asked() -> None:
    needs_daz()
    assert probe_in_fresh_process(flush="0") == "off"


def test_threads_started_before_the_setting_keep_subnormals() -> None:
    """Why the setting sits at the model's import and not later (e.g. after argument parsing
    and data loading): a thread started before it keeps IEEE subnormals."""
    needs_daz()
    assert probe_in_fresh_process(before=POOL_FIRST) == "partial"


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(numerics.ENV, "yes")
    with pytest.raises(PermanentError, match=r"ELCREC_FLUSH_SUBNORMALS must be 0 .* or 1 .*'yes'"):
        numerics.apply()


def test_flushing_changes_only_values_below_the_normal_range() -> None:
    """In this (flushing) process: a product whose exact result is subnormal gives 0, the same
    product scaled into the normal range is exact, and subnormal inputs are read as 0."""
    needs_daz()
    tiny = torch.tensor([2.0**-70], dtype=torch.float32)
    assert (tiny * tiny).item() == 0.0  # 2^-140 < 2^-126, the smallest normal float32
    assert ((tiny * 2.0**10) * (tiny * 2.0**10)).item() == 2.0**-120
    subnormal_bits = torch.tensor([1 << 20], dtype=torch.int32).view(torch.float32)  # 2^-129
    assert (subnormal_bits * 2.0**40).item() == 0.0  # read as 0 (IEEE would give 2^-89)


# A 64 MiB tensor allocated, written and freed again and again, as a training step does with its
# activations. glibc's heap takes a few rounds to settle (the interpreter's small allocations
# leave holes a slightly larger aligned request does not fit), so the page faults (``ru_minflt``)
# are counted over the rounds after that: they show whether freed memory was kept or returned.
REFAULT = """
import resource
import torch
import elcrec_dist.model
from elcrec_dist import numerics
for _ in range({settle}):
    torch.empty(1 << 24).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({measured}):
    torch.empty(1 << 24).fill_(2.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(numerics.allocator(), faults)
"""
PAGES_64_MIB = (64 << 20) // 4096
SETTLE, MEASURED = 16, 8


def refaults_in_fresh_process(keep: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != numerics.KEEP_ENV}
    if keep is not None:
        env[numerics.KEEP_ENV] = keep
    code = REFAULT.format(settle=SETTLE, measured=MEASURED)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)
    state, _, faults = done.stdout.strip().splitlines()[-1].rpartition(" ")
    return state, int(faults)


def test_freed_memory_is_reused_without_page_faults() -> None:
    """With glibc's defaults every round faults the 64 MiB in again, page by page (the last
    tensor went back to the kernel); kept, the settled heap serves every round without one."""
    state, faults = refaults_in_fresh_process(None)
    if state != "freed memory kept":
        pytest.skip(f"not glibc: {state}")
    assert faults < PAGES_64_MIB // 10, f"{faults} faults over {MEASURED} rounds"
    state, faults = refaults_in_fresh_process("0")
    assert state == "glibc defaults"
    assert faults >= MEASURED * PAGES_64_MIB * 9 // 10


def test_a_bad_keep_freed_memory_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(numerics.KEEP_ENV, "yes")
    with pytest.raises(PermanentError, match="ELCREC_KEEP_FREED_MEMORY must be 0"):
        numerics.keep_freed_memory()
