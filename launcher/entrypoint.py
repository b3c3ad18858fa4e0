"""Container entrypoint for one node (pod) of a multi-node training job.

    python -m launcher.entrypoint [--module launcher.train] [--master-wait-s 600] [--print-plan] \\
        -- --config /etc/elcrec/config.yaml --data s3://... --run-dir s3://...

Reads the pod's place in the job from the scheduler's environment (Kubernetes Indexed Job,
Kubeflow PyTorchJob or TrainJob, or Volcano; see ``launcher.cluster_env``), waits until the
master's name resolves, writes a DeepSpeed hostfile and runs

    deepspeed --no_ssh --hostfile H --node_rank R --master_addr A --master_port P \\
        --module launcher.train ARGS...

so that DeepSpeed's per-node launcher starts this node's ranks with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set; nothing is reached over ssh. SIGTERM/SIGINT (pod deletion,
preemption) are passed to the ranks themselves (before they exist, to the whole process group):
each rank checkpoints at its next step and exits 75, and DeepSpeed's launchers, left running,
report that code. The exit code is the training's: 0, 2 (permanent: bad config or data, or a
bad cluster environment here) or 75 (retryable: a lost peer, storage trouble, a preemption, a
master whose name never resolved). The temporary hostfile folder is removed on every exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

import psutil

from elcrec_dist.processes import ranks_below
from launcher.cluster_env import ClusterSpec, detect, wait_for_master
from launcher.common import run_main

DEFAULT_MODULE = "launcher.train"


def launch_command(
    spec: ClusterSpec, *, hostfile: str, module: str, train_args: Sequence[str]
) -> list[str]:
    """The DeepSpeed runner invocation for this node (``python -m deepspeed.launcher.runner`` is
    the ``deepspeed`` script without relying on PATH)."""
    return [
        sys.executable, "-u", "-m", "deepspeed.launcher.runner",
        "--hostfile", hostfile,
        "--no_ssh",
        "--node_rank", str(spec.node_rank),
        "--master_addr", spec.master_addr,
        "--master_port", str(spec.master_port),
        "--module", module,
        *train_args,
    ]


def plan(spec: ClusterSpec, command: Sequence[str]) -> dict[str, object]:
    return {
        "source": spec.source,
        "node_rank": spec.node_rank,
        "num_nodes": spec.num_nodes,
        "procs_per_node": spec.procs_per_node,
        "world_size": spec.world_size,
        "master_name": spec.master_name,
        "master_addr": spec.master_addr,
        "master_port": spec.master_port,
        "ranks": [spec.rank_env(lr) for lr in range(spec.procs_per_node)],
        "command": list(command),
    }


def run_node(spec: ClusterSpec, command: Sequence[str], *, env: Mapping[str, str]) -> int:
    """Run the launcher in its own process group; forward termination signals to that group."""
    child = subprocess.Popen(list(command), env=dict(env), start_new_session=True)

    def forward(signum: int, _frame: FrameType | None) -> None:
        # to the ranks, not to DeepSpeed's launchers: a signalled launcher exits at once (the
        # runner) or SIGKILLs the ranks 30 s later (launch), either way not with their code
        ranks = ranks_below(child.pid)
        for rank in ranks:
            with contextlib.suppress(psutil.Error):
                rank.send_signal(signum)
        if not ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--module",
        default=DEFAULT_MODULE,
        help=f"training module run on every rank (default {DEFAULT_MODULE})",
    )
    parser.add_argument("--master-wait-s", type=float, default=600.0,
                        help="how long to wait for the master's name to resolve (default 600)")
    parser.add_argument("--print-plan", action="store_true",
                        help="print this node's plan as JSON and exit without launching")
    parser.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="arguments for the training module, after --"
    )
    args = parser.parse_args(argv)
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]

    spec = detect(os.environ)
    if args.print_plan:
        command = launch_command(
            spec, hostfile="HOSTFILE", module=args.module, train_args=train_args
        )
        print(json.dumps({**plan(spec, command), "hostfile": spec.hostfile()}, indent=2))
        return 0
    hostfile = Path(tempfile.mkdtemp(prefix="elcrec-node-")) / "hostfile"
    try:
        command = launch_command(spec, hostfile=str(hostfile), module=args.module,
                                 train_args=train_args)
        print(
            f"elcrec entrypoint: {spec.source} node {spec.node_rank}/{spec.num_nodes}, "
            f"{spec.procs_per_node} process(es) per node, world size {spec.world_size}, "
            f"master {spec.master_name} -> {spec.master_addr}:{spec.master_port}",
            file=sys.stderr, flush=True,
        )
        wait_for_master(spec, timeout_s=args.master_wait_s)
        hostfile.write_text(spec.hostfile())
        return run_node(spec, command, env=os.environ)
    finally:
        shutil.rmtree(hostfile.parent, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
