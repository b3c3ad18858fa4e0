"""DeepSpeed's launcher processes around a training rank, told apart by their command lines.

``deepspeed`` (the runner: the ``deepspeed`` script, or ``python -m deepspeed.launcher.runner``)
starts ``python -m deepspeed.launcher.launch`` on each node, which starts the ranks. Two things
need to know which is which: a rank, to notice that the launchers above it have ended (a
``kill`` of the runner alone would leave the ranks running as orphans: ``distributed``), and the
container entrypoint, to pass a termination signal to the ranks themselves, so that they
checkpoint and the launchers report the ranks' exit code (``launcher.entrypoint``). Imports no
torch: the entrypoint uses it before anything heavy is loaded.
"""

from __future__ import annotations

import os
from typing import Any


def is_deepspeed_launcher(process: Any) -> bool:
    """Whether the ``psutil.Process`` is DeepSpeed's runner or its per-node launcher."""
    import psutil

    try:
        head = process.cmdline()[:4]  # interpreter, its flags, then the script or module
    except psutil.Error:
        return False
    return any(
        part.startswith("deepspeed.launcher") or os.path.basename(part) == "deepspeed"
        for part in head
    )


def launcher_ancestors() -> list[Any]:
    """The DeepSpeed launcher processes above this one, nearest first; none when this process
    was started without a launcher."""
    import psutil

    chain = []
    process = psutil.Process().parent()
    while process is not None and is_deepspeed_launcher(process):
        chain.append(process)
        process = process.parent()
    return chain


def ranks_below(pid: int) -> list[Any]:
    """The processes below ``pid`` that are not DeepSpeed launchers: the ranks (and anything
    they started), for a signal meant for the ranks alone."""
    import psutil

    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [process for process in below if not is_deepspeed_launcher(process)]


def has_ended(process: Any) -> bool:
    """Whether the ``psutil.Process`` has ended (a zombie, awaiting its parent, has too; a pid
    reused by another process is told apart by its start time)."""
    import psutil

    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
