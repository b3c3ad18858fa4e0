"""Two "pods" of the rendered Indexed Job, simulated on this machine, train the demo config over
gloo and produce exactly what `deepspeed --num_gpus 2 launcher/train.py` produces on one node.

Each pod runs the manifest's own command and arguments with the environment the kubelet would
give it (the manifest's env, the Job controller's JOB_COMPLETION_INDEX and job-name label); only
what a cluster provides is swapped for a local stand-in: the ConfigMap becomes a file, the shared
volume a temporary folder, and pod 0's DNS name maps to 127.0.0.1 through ELCREC_HOST_ALIASES.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import env_without_scheduler

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
# Small enough for seconds per run on two cores, large enough for several optimizer steps.
OVERRIDES = [
    "train.epochs=1",
    "train.batch_size=64",
    "kmeans.sample_users=200",
    "kmeans.restarts=1",
    "kmeans.iterations=3",
    "model.num_clusters=4",
]
TIMING = re.compile(r"(per_s|seconds|_time|finished_at|time_split|time/|peak_memory)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env() -> dict[str, str]:
    env = env_without_scheduler()
    # Both runs share this machine's cores; one intra-op thread per rank in both makes the float
    # arithmetic, and so the comparison, exact (the trainer otherwise sizes threads by LOCAL_SIZE,
    # which is 2 for the one-node run and 1 per pod).
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k8s-launch") / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.synthetic", "--output", str(out), "--users", "400",
         "--items", "120", "--intents", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def rendered_job(port: int) -> tuple[dict[str, Any], str]:
    """The Job and the ConfigMap's config for 2 pods x 1 CPU rank, as `render` prints them."""
    args = ["render", "--config", str(REPO / "configs/demo.yaml"), "--nodes", "2",
            "--gpus-per-node", "0", "--procs-per-node", "1", "--image", f"unused@sha256:{'0' * 64}",
            "--data", "pvc://shared/data", "--run-dir", "pvc://shared/run",
            "--master-port", str(port)]
    for item in OVERRIDES:
        args += ["--set", item]
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.k8s", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    docs = list(yaml.safe_load_all(proc.stdout))
    job = next(d for d in docs if d["kind"] == "Job")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    return job, config


def pod_process(job: dict[str, Any], index: int, *, config_file: Path, data: Path, run_dir: Path,
                log: Path) -> subprocess.Popen[bytes]:
    template = job["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = base_env()
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert (
                item["valueFrom"]["fieldRef"]["fieldPath"]
                == "metadata.labels['batch.kubernetes.io/job-name']"
            )
            env[item["name"]] = job["metadata"]["name"]
    env["JOB_COMPLETION_INDEX"] = str(index)  # set by the Job controller
    env["HOME"] = os.environ.get("HOME", "/tmp")  # keep DeepSpeed's compiled-op cache
    env["ELCREC_DATA"], env["ELCREC_RUN_DIR"] = str(data), str(run_dir)  # the shared volume
    master = f"{job['metadata']['name']}-0.{template['spec']['subdomain']}"
    env["ELCREC_HOST_ALIASES"] = f"{master}=127.0.0.1"
    command = [sys.executable if part == "python" else part for part in container["command"]]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    args = [str(config_file) if a == "/etc/elcrec/config.yaml" else a for a in args]
    with log.open("wb") as out:
        return subprocess.Popen(
            command + args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def last_json_line(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, text[-3000:]
    return json.loads(lines[-1])


def without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not TIMING.search(k)}
    return value


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [
        without_timing(json.loads(line))
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_two_indexed_job_pods_train_like_deepspeed_on_one_node(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    # One node, two ranks: the reference.
    reference_run = tmp_path / "reference"
    sets = [a for item in OVERRIDES for a in ("--set", item)]
    reference = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
         "--master_port", str(free_port()),
         "launcher/train.py", "--config", "configs/demo.yaml", "--data", str(tiny_dataset),
         "--run-dir", str(reference_run), *sets],
        cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    # Two pods of one rank each, from the rendered Job.
    job, config_text = rendered_job(free_port())
    config_file = tmp_path / "etc-elcrec" / "config.yaml"
    config_file.parent.mkdir()
    config_file.write_text(config_text)
    pods_run = tmp_path / "pods"
    logs = [tmp_path / f"pod-{i}.log" for i in range(2)]
    procs = [
        pod_process(
            job, i, config_file=config_file, data=tiny_dataset, run_dir=pods_run, log=logs[i]
        )
        for i in range(2)
    ]
    try:
        # As a Job would, give up on the gang as soon as one pod fails (its peer would otherwise
        # wait in a collective until gloo's timeout).
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        codes = [p.wait() for p in procs]
    outputs = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], f"pod exit codes {codes}\n" + "\n\n".join(
        f"--- pod {i} ---\n{o[-4000:]}" for i, o in enumerate(outputs))
    assert "indexed-job node 0/2, 1 process(es) per node, world size 2" in outputs[0]
    assert "indexed-job node 1/2" in outputs[1]
    assert "elcrec-demo-0.elcrec-demo -> 127.0.0.1" in outputs[1]

    # Same final line (test metrics), same results, same logged losses and metrics, same model.
    ref_line, pod_line = last_json_line(reference.stdout), last_json_line(outputs[0])
    assert (
        ref_line.pop("run_dir") == str(reference_run)
        and pod_line.pop("run_dir") == str(pods_run)
    )
    assert pod_line == ref_line
    ref_results = json.loads((reference_run / "results.json").read_text())
    pod_results = json.loads((pods_run / "results.json").read_text())
    assert ref_results["world_size"] == pod_results["world_size"] == 2
    assert without_timing(pod_results) == without_timing(ref_results)
    assert metrics(pods_run) == metrics(reference_run)
    assert any(k.startswith("loss/") for line in metrics(reference_run) for k in line)
    ref_model = torch.load(reference_run / "best_model.pt", weights_only=True)["model"]
    pod_model = torch.load(pods_run / "best_model.pt", weights_only=True)["model"]
    assert ref_model.keys() == pod_model.keys()
    for name, tensor in ref_model.items():
        assert torch.equal(tensor, pod_model[name]), name
