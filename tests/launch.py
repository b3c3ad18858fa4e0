"""Starting the real entry points under the deepspeed launcher from tests (CPU, gloo)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A loopback port free at the time of asking (the launcher binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deepspeed_env(**extra: str) -> dict[str, str]:
    """This environment with this interpreter's scripts (``deepspeed``) first on PATH, the CPU
    accelerator chosen explicitly, and ``extra`` on top."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "DS_ACCELERATOR": "cpu",
        **extra,
    }


def deepspeed_command(script: str | Path, *args: str, ranks: int = 2) -> tuple[list[str], int]:
    """``deepspeed --num_gpus RANKS --master_port PORT SCRIPT ARGS...`` and the port it uses."""
    port = free_port()
    return [
        "deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(script), *args
    ], port
