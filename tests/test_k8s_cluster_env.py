"""The entrypoint's environment mapping: Indexed Job, Kubeflow PyTorchJob, Volcano, and the
errors for missing or contradictory variables; the entrypoint's plan, exit codes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import env_without_scheduler

from elcrec_dist.errors import EXIT_PERMANENT, EXIT_RETRYABLE, exit_code_for
from launcher.cluster_env import (
    ClusterEnvError,
    ClusterSpec,
    MasterUnreachable,
    detect,
    parse_host_aliases,
    wait_for_master,
)

REPO = Path(__file__).resolve().parents[1]


def no_gpu() -> int:
    return 0


def gpus(n: int):
    return lambda: n


INDEXED = {
    "JOB_COMPLETION_INDEX": "1",
    "ELCREC_NUM_NODES": "4",
    "ELCREC_PROCS_PER_NODE": "8",
    "ELCREC_JOB_NAME": "elcrec-beauty",
    "ELCREC_SERVICE_NAME": "elcrec-beauty",
}


# --- Indexed Job ----------------------------------------------------------------------------------

def test_indexed_job_maps_index_nodes_and_pod0_dns_name():
    spec = detect(INDEXED, device_count=no_gpu)
    assert spec == ClusterSpec(
        source="indexed-job", node_rank=1, num_nodes=4, procs_per_node=8,
        master_addr="elcrec-beauty-0.elcrec-beauty", master_port=29500,
        master_name="elcrec-beauty-0.elcrec-beauty",
    )
    assert spec.world_size == 32
    # Node-major layout: node 1 holds ranks 8..15.
    assert [spec.global_rank(lr) for lr in range(8)] == list(range(8, 16))
    assert spec.rank_env(3) == {
        "RANK": "11", "WORLD_SIZE": "32", "LOCAL_RANK": "3",
        "MASTER_ADDR": "elcrec-beauty-0.elcrec-beauty", "MASTER_PORT": "29500",
    }
    assert spec.hostfile().splitlines() == [f"node-{i} slots=8" for i in range(4)]


def test_indexed_job_port_master_override_and_gpu_count():
    env = {**INDEXED, "ELCREC_MASTER_PORT": "23456", "ELCREC_MASTER_ADDR": "10.1.2.3"}
    del env["ELCREC_PROCS_PER_NODE"], env["ELCREC_JOB_NAME"], env["ELCREC_SERVICE_NAME"]
    spec = detect(env, device_count=gpus(4))
    assert (spec.master_addr, spec.master_port, spec.procs_per_node) == ("10.1.2.3", 23456, 4)


def test_host_aliases_map_the_master_name_without_etc_hosts():
    env = {
        **INDEXED,
        "ELCREC_HOST_ALIASES": "other=10.0.0.9, elcrec-beauty-0.elcrec-beauty=127.0.0.1",
    }
    spec = detect(env, device_count=no_gpu)
    assert spec.master_name == "elcrec-beauty-0.elcrec-beauty"
    assert spec.master_addr == "127.0.0.1"
    assert parse_host_aliases("") == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"JOB_COMPLETION_INDEX": None, "ELCREC_NUM_NODES": None}, "no cluster environment found"),
        ({"ELCREC_NUM_NODES": None}, "ELCREC_NUM_NODES is not set"),
        ({"JOB_COMPLETION_INDEX": "4"}, "node rank 4 is outside [0, 4)"),
        ({"JOB_COMPLETION_INDEX": "one"}, "JOB_COMPLETION_INDEX='one' is not an integer"),
        ({"JOB_COMPLETION_INDEX": "-1"}, "JOB_COMPLETION_INDEX=-1 must be >= 0"),
        ({"ELCREC_NUM_NODES": "0"}, "ELCREC_NUM_NODES=0 must be >= 1"),
        ({"ELCREC_JOB_NAME": None}, "ELCREC_JOB_NAME is not set"),
        ({"ELCREC_SERVICE_NAME": None}, "ELCREC_SERVICE_NAME is not set"),
        ({"ELCREC_PROCS_PER_NODE": None}, "set ELCREC_PROCS_PER_NODE"),
        ({"ELCREC_PROCS_PER_NODE": "0"}, "ELCREC_PROCS_PER_NODE=0 must be >= 1"),
        ({"ELCREC_MASTER_PORT": "70000"}, "master port 70000 is not a TCP port"),
        ({"ELCREC_HOST_ALIASES": "pod0"}, "expected name=address"),
        ({"PET_NNODES": "4"}, "contradictory cluster environment"),
        ({"VK_TASK_INDEX": "1"}, "contradictory cluster environment"),
        ({"ELCREC_CLUSTER_ENV": "slurm"}, "expected one of indexed-job, pytorchjob, volcano"),
    ],
)
def test_indexed_job_errors_name_the_problem(change, message):
    env = dict(INDEXED)
    for key, value in change.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    with pytest.raises(ClusterEnvError) as info:
        detect(env, device_count=no_gpu)
    assert message in str(info.value)
    assert exit_code_for(info.value) == EXIT_PERMANENT


def test_forced_source_resolves_contradictory_markers():
    env = {**INDEXED, "PET_NNODES": "9", "ELCREC_CLUSTER_ENV": "indexed-job"}
    assert detect(env, device_count=no_gpu).num_nodes == 4


# --- Kubeflow PyTorchJob --------------------------------------------------------------------------

PYTORCHJOB = {  # what a recent training operator gives worker 1 (node rank 2) of 4 x 8
    "PET_NNODES": "4",
    "PET_NODE_RANK": "2",
    "PET_NPROC_PER_NODE": "8",
    "MASTER_ADDR": "beauty-master-0",
    "MASTER_PORT": "23456",
    "WORLD_SIZE": "32",
    "RANK": "2",
    "PYTHONUNBUFFERED": "0",
}


def test_pytorchjob_recent_operator():
    spec = detect(PYTORCHJOB, device_count=no_gpu)
    assert (spec.source, spec.node_rank, spec.num_nodes, spec.procs_per_node) == (
        "pytorchjob",
        2,
        4,
        8,
    )
    assert (spec.master_addr, spec.master_port) == ("beauty-master-0", 23456)
    assert spec.rank_env(0)["RANK"] == "16"


def test_pytorchjob_pet_master_and_pod_count_world_size():
    env = {
        **PYTORCHJOB,
        "PET_MASTER_ADDR": "beauty-master-0",
        "PET_MASTER_PORT": "23456",
        "WORLD_SIZE": "4",
    }
    env.pop("PET_NODE_RANK")  # older operators: RANK is the pod's rank
    assert detect(env, device_count=no_gpu).node_rank == 2


def test_pytorchjob_nproc_auto_counts_gpus():
    env = {**PYTORCHJOB, "PET_NPROC_PER_NODE": "auto", "WORLD_SIZE": "4"}
    assert detect(env, device_count=gpus(2)).procs_per_node == 2


def test_pytorchjob_forced_without_pet_vars_reads_world_size_as_pods():
    env = {"ELCREC_CLUSTER_ENV": "pytorchjob", "MASTER_ADDR": "m", "MASTER_PORT": "23456",
           "WORLD_SIZE": "3", "RANK": "1", "ELCREC_PROCS_PER_NODE": "2"}
    spec = detect(env, device_count=no_gpu)
    assert (spec.node_rank, spec.num_nodes, spec.world_size) == (1, 3, 6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"PET_NNODES": "1:4"}, "elastic PyTorchJobs are not supported"),
        ({"PET_NODE_RANK": "1"}, "contradictory node rank: PET_NODE_RANK=1, RANK=2"),
        ({"PET_MASTER_ADDR": "elsewhere"}, "contradictory master address"),
        ({"PET_MASTER_PORT": "29500"}, "contradictory master port"),
        ({"MASTER_ADDR": None}, "master address missing: set PET_MASTER_ADDR or MASTER_ADDR"),
        ({"PET_NODE_RANK": None, "RANK": None}, "node rank missing"),
        ({"WORLD_SIZE": "5"}, "WORLD_SIZE=5 is neither PET_NNODES (4) nor"),
        ({"ELCREC_PROCS_PER_NODE": "4"}, "contradictory processes per node"),
        ({"ELCREC_NUM_NODES": "2"}, "contradictory node count: ELCREC_NUM_NODES=2"),
        ({"PET_NODE_RANK": "4", "RANK": "4"}, "node rank 4 is outside [0, 4)"),
    ],
)
def test_pytorchjob_errors(change, message):
    env = dict(PYTORCHJOB)
    for key, value in change.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    with pytest.raises(ClusterEnvError, match=None) as info:
        detect(env, device_count=no_gpu)
    assert message in str(info.value)


# --- Volcano --------------------------------------------------------------------------------------

def test_volcano_pytorch_plugin_rank_wins_over_task_index():
    # Worker 0 of a master+worker job: task index 0, but pod rank 1 (the master is 0).
    env = {"VK_TASK_INDEX": "0", "VC_TASK_INDEX": "0", "RANK": "1", "WORLD_SIZE": "3",
           "MASTER_ADDR": "vj-master-0.vj", "MASTER_PORT": "23456", "ELCREC_PROCS_PER_NODE": "8"}
    spec = detect(env, device_count=no_gpu)
    assert (spec.source, spec.node_rank, spec.num_nodes, spec.master_addr, spec.master_port) == (
        "volcano", 1, 3, "vj-master-0.vj", 23456)


def test_volcano_svc_plugin_hosts():
    env = {
        "VK_TASK_INDEX": "2",
        "VC_TRAINER_HOSTS": "vj-trainer-0.vj,vj-trainer-1.vj,vj-trainer-2.vj",
        "VC_TRAINER_NUM": "3",
        "ELCREC_PROCS_PER_NODE": "1",
    }
    spec = detect(env, device_count=no_gpu)
    assert (spec.node_rank, spec.num_nodes, spec.master_addr, spec.master_port) == (
        2,
        3,
        "vj-trainer-0.vj",
        29500,
    )


def test_volcano_several_tasks_need_a_choice():
    env = {"VK_TASK_INDEX": "0", "VC_TRAINER_HOSTS": "a.vj,b.vj", "VC_PS_HOSTS": "ps.vj",
           "ELCREC_PROCS_PER_NODE": "1"}
    with pytest.raises(ClusterEnvError, match="set ELCREC_VOLCANO_TASK"):
        detect(env, device_count=no_gpu)
    spec = detect({**env, "ELCREC_VOLCANO_TASK": "trainer"}, device_count=no_gpu)
    assert (spec.num_nodes, spec.master_addr) == (2, "a.vj")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"VK_TASK_INDEX": "0", "RANK": "0", "WORLD_SIZE": "2"},
            "MASTER_ADDR, MASTER_PORT missing",
        ),
        (
            {"VK_TASK_INDEX": "0", "VC_TRAINER_HOSTS": "a,b", "VC_TRAINER_NUM": "3"},
            "VC_TRAINER_NUM=3 but",
        ),
        (
            {"VK_TASK_INDEX": "1", "VC_TASK_INDEX": "0", "VC_T_HOSTS": "a,b"},
            "contradictory task index",
        ),
        ({"VK_TASK_INDEX": "0"}, "enable the pytorch plugin"),
        ({"VK_TASK_INDEX": "0", "VC_T_HOSTS": " , "}, "VC_T_HOSTS is empty"),
        (
            {"VK_TASK_INDEX": "0", "VC_T_HOSTS": "a,b", "ELCREC_VOLCANO_TASK": "x"},
            "VC_X_HOSTS is not set",
        ),
        ({"VK_TASK_INDEX": "2", "VC_T_HOSTS": "a,b"}, "node rank 2 is outside [0, 2)"),
    ],
)
def test_volcano_errors(env, message):
    with pytest.raises(ClusterEnvError) as info:
        detect({**env, "ELCREC_PROCS_PER_NODE": "1"}, device_count=no_gpu)
    assert message in str(info.value)


# --- waiting for the master -----------------------------------------------------------------------

def test_wait_for_master_retries_until_the_name_resolves():
    calls = []

    def resolve(host: str) -> None:
        calls.append(host)
        if len(calls) < 3:
            raise OSError("Name or service not known")

    spec = detect(INDEXED, device_count=no_gpu)
    wait_for_master(spec, timeout_s=10, interval_s=0.0, resolve=resolve)
    assert calls == ["elcrec-beauty-0.elcrec-beauty"] * 3


def test_master_that_never_resolves_is_retryable():
    def resolve(host: str) -> None:
        raise OSError("Name or service not known")

    spec = detect(INDEXED, device_count=no_gpu)
    with pytest.raises(MasterUnreachable, match="did not resolve within") as info:
        wait_for_master(spec, timeout_s=0.05, interval_s=0.01, resolve=resolve)
    assert exit_code_for(info.value) == EXIT_RETRYABLE


# --- the entrypoint process -----------------------------------------------------------------------

def _clean_env(**extra: str) -> dict[str, str]:
    return {**env_without_scheduler(), **extra}


def test_entrypoint_plan_is_a_no_ssh_deepspeed_launch():
    env = _clean_env(**INDEXED, ELCREC_HOST_ALIASES="elcrec-beauty-0.elcrec-beauty=127.0.0.1")
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.entrypoint", "--print-plan", "--",
         "--config", "configs/demo.yaml", "--set", "train.epochs=1", "--local_rank_like=--x"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    cmd = plan["command"]
    runner = cmd.index("deepspeed.launcher.runner")
    assert cmd[runner + 1:runner + 12] == [
        "--hostfile", "HOSTFILE", "--no_ssh", "--node_rank", "1", "--master_addr", "127.0.0.1",
        "--master_port", "29500", "--module", "launcher.train",
    ]
    assert cmd[runner + 12:] == [
        "--config", "configs/demo.yaml", "--set", "train.epochs=1", "--local_rank_like=--x"
    ]
    assert plan["hostfile"].splitlines() == [f"node-{i} slots=8" for i in range(4)]
    assert [r["RANK"] for r in plan["ranks"]] == [str(r) for r in range(8, 16)]
    assert {r["WORLD_SIZE"] for r in plan["ranks"]} == {"32"}


def test_entrypoint_without_cluster_env_exits_permanent_with_a_message():
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.entrypoint", "--", "--config", "configs/demo.yaml"],
        cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == EXIT_PERMANENT
    assert "no cluster environment found" in proc.stderr
    assert "JOB_COMPLETION_INDEX" in proc.stderr


@pytest.mark.parametrize("code", [0, EXIT_PERMANENT, EXIT_RETRYABLE])
def test_run_node_returns_the_launchers_exit_code(code):
    from launcher.entrypoint import run_node

    spec = detect(INDEXED, device_count=no_gpu)
    assert (
        run_node(spec, [sys.executable, "-c", f"raise SystemExit({code})"], env=os.environ) == code
    )


def test_run_node_reports_death_by_signal_as_128_plus_n():
    from launcher.entrypoint import run_node

    spec = detect(INDEXED, device_count=no_gpu)
    cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert run_node(spec, cmd, env=os.environ) == 128 + signal.SIGKILL


def test_sigterm_reaches_the_training_processes(tmp_path: Path):
    """Pod deletion or preemption sends SIGTERM to the entrypoint only (PID 1); it must reach the
    launched process group, whose exit code (here 75 from the handler) becomes the pod's."""
    ready = tmp_path / "ready"
    trainer = textwrap.dedent(f"""
        import signal, sys, time, pathlib
        signal.signal(signal.SIGTERM, lambda *a: sys.exit({EXIT_RETRYABLE}))
        pathlib.Path({str(ready)!r}).write_text("up")
        time.sleep(60)
    """)
    driver = textwrap.dedent(f"""
        import os, sys
        from launcher.cluster_env import detect
        from launcher.entrypoint import run_node
        spec = detect({INDEXED!r}, device_count=lambda: 0)
        sys.exit(run_node(spec, [sys.executable, "-c", {trainer!r}], env=os.environ))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline, "trainer never started"
            assert proc.poll() is None, "driver exited early"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == EXIT_RETRYABLE
    finally:
        if proc.poll() is None:
            proc.kill()
