"""End to end as a platform team runs it: the rendered Indexed Job, two "pods" simulated on this
machine, trains with its run folder in a bucket (the moto server on loopback); one pod is killed
after a checkpoint, both restart with the manifest's own ``--resume auto``, and the run ends
with the parameters, results and logs of an uninterrupted run; the rendered TensorBoard
Deployment's command shows the curves from the bucket.

Each pod runs the manifest's command and arguments with the environment the kubelet would give
it: the manifest's env, the Job controller's ``JOB_COMPLETION_INDEX``, and the storage Secret's
keys (``envFrom``) as the test server's endpoint and credentials. Only what a cluster provides
is swapped for a local stand-in: the ConfigMap becomes a file, pod 0's DNS name maps to
127.0.0.1 through ``ELCREC_HOST_ALIASES``, a pod's deletion is a SIGKILL of its process tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from conftest import env_without_scheduler
from launch import free_port

from elcrec_dist.checkpoint import latest_checkpoint, load_model, load_model_weights
from elcrec_dist.rundir import Folder

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
# 400 users / 64 = 7 steps per epoch, 14 in all; a checkpoint every 3 steps and at epoch ends.
# ZeRO stage 1: each rank writes its own optimizer partition, which must land before the commit.
OVERRIDES = ["train.epochs=2", "train.batch_size=64", "train.checkpoint_every=3",
             "train.log_every=1", "kmeans.sample_users=200", "kmeans.restarts=1",
             "kmeans.iterations=3", "model.num_clusters=4", "deepspeed.zero_stage=1"]
TIMING = re.compile(r"(per_s|seconds|_time|finished_at|time_split|time/|peak_memory|_s$)")


def without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not TIMING.search(k)}
    return value


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rundir-k8s") / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.synthetic", "--output", str(out), "--users", "400",
         "--items", "120", "--intents", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def render(data: str, run_dir: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The Job, the TensorBoard Deployment and the ConfigMap's config, as `render` prints them
    for 2 pods x 1 CPU rank with both locations in the bucket."""
    args = ["render", "--config", str(REPO / "configs/demo.yaml"), "--nodes", "2",
            "--gpus-per-node", "0",
            "--procs-per-node", "1", "--image", f"unused@sha256:{'0' * 64}", "--data", data,
            "--run-dir", run_dir, "--master-port", str(free_port())]
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
    tensorboard = next(d for d in docs if d["kind"] == "Deployment")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    return job, tensorboard, config


def container_env(container: dict[str, Any], job_name: str) -> dict[str, str]:
    """The kubelet's environment for ``container``: the manifest's values, the Downward API's
    job name, and the storage Secret's keys (endpoint, credentials) from this test's server."""
    env = env_without_scheduler()
    env["OMP_NUM_THREADS"] = "1"  # the runs are compared bitwise (see test_k8s_launch.py)
    assert [ref["secretRef"]["name"] for ref in container["envFrom"]], "no storage Secret"
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert (
                item["valueFrom"]["fieldRef"]["fieldPath"]
                == "metadata.labels['batch.kubernetes.io/job-name']"
            )
            env[item["name"]] = job_name
    env["HOME"] = os.environ.get("HOME", "/tmp")  # keep DeepSpeed's compiled-op cache
    return env


def substitute(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def start_pod(
    job: dict[str, Any], index: int, *, config_file: Path, log: Path
) -> subprocess.Popen[bytes]:
    template = job["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = container_env(container, job["metadata"]["name"])
    env["JOB_COMPLETION_INDEX"] = str(index)  # set by the Job controller
    env["ELCREC_HOST_ALIASES"] = (
        f"{job['metadata']['name']}-0.{template['spec']['subdomain']}=127.0.0.1"
    )
    command = [sys.executable if part == "python" else part for part in container["command"]]
    args = [
        str(config_file) if a == "/etc/elcrec/config.yaml" else a
        for a in substitute(container["args"], env)
    ]
    # what a restart relies on
    assert "--resume" in args and args[args.index("--resume") + 1] == "auto"
    with log.open("ab") as out:
        return subprocess.Popen(
            command + args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def kill_pod(pod: subprocess.Popen[bytes]) -> None:
    """What deleting a pod does to its processes: SIGKILL, the whole tree at once."""
    try:
        tree = [psutil.Process(pod.pid), *psutil.Process(pod.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    pod.wait()


def run_pods(
    job: dict[str, Any], config_file: Path, logs: list[Path], *, until: Any = None
) -> list[int | None]:
    """Start both pods and wait until they exit, one fails (a gang restart follows), or
    ``until()`` is true (then pod 1 is deleted, and pod 0 with it: the gang restarts)."""
    pods = [start_pod(job, i, config_file=config_file, log=logs[i]) for i in range(2)]
    try:
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in pods) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in pods):
                break
            if until is not None and until():
                kill_pod(pods[1])
                break
            time.sleep(0.05)
    finally:
        for p in pods:
            if p.poll() is None:
                kill_pod(p)
    return [p.returncode for p in pods]


def pod_logs(logs: list[Path]) -> str:
    return "\n\n".join(
        f"--- pod {i} ---\n{log.read_text(errors='replace')[-4000:]}" for i, log in enumerate(logs)
    )


def scalars_from_tensorboard(deployment: dict[str, Any], tag: str, tmp_path: Path, *,
                             points: int) -> list[list[float]]:
    """Run the rendered TensorBoard container's command against the bucket and ask its HTTP API
    for one curve, [[wall time, step, value], ...], until it has ``points`` points (TensorBoard
    loads event files one after the other, reloading every few seconds)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = container_env(container, "unused")
    port = free_port()
    args = substitute(container["args"], env)
    args[args.index("--port") + 1] = str(port)
    command = [str(Path(sys.executable).parent / container["command"][0]), *args]
    with (tmp_path / "tensorboard.log").open("wb") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, curve = time.monotonic() + 120, []
        while True:
            try:
                url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag={tag}"
                with urllib.request.urlopen(url, timeout=5) as answer:
                    curve = json.loads(answer.read())
                if len(curve) >= points:
                    return curve
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (
                f"{len(curve)} of {points} points; "
                + (tmp_path / "tensorboard.log").read_text()[-3000:]
            )
            time.sleep(0.5)
    finally:
        server.kill()
        server.wait()


def test_two_pods_with_an_s3_run_folder_survive_a_killed_pod(
    s3_env: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    import fsspec

    data = f"s3://{s3_env}/prepared/demo"
    fs = fsspec.filesystem("s3")
    for path in sorted(tiny_dataset.iterdir()):
        fs.put(str(path), f"{data}/{path.name}")

    runs: dict[str, Folder] = {}
    for name in ("straight", "broken"):
        run_dir = f"s3://{s3_env}/runs/{name}"
        job, tensorboard, config_text = render(data, run_dir)
        config_file = tmp_path / name / "config.yaml"
        config_file.parent.mkdir()
        config_file.write_text(config_text)
        logs = [tmp_path / name / f"pod-{i}.log" for i in range(2)]
        runs[name] = folder = Folder(run_dir)
        if name == "broken":
            # killed once the step-6 checkpoint is committed (mid-epoch 0 ended at 3; 7 ends it)
            marker = "checkpoints/step-00000006/COMMITTED.json"
            codes = run_pods(job, config_file, logs, until=lambda f=folder, m=marker: f.exists(m))
            assert folder.exists(marker), pod_logs(logs)
            assert codes[1] == -9 and not folder.exists("results.json"), pod_logs(logs)
        codes = run_pods(job, config_file, logs)  # (again, for the broken run: the gang restart)
        assert codes == [0, 0], f"pod exit codes {codes}\n{pod_logs(logs)}"
    restarted = (tmp_path / "broken" / "pod-0.log").read_text()
    assert f"resumed from s3://{s3_env}/runs/broken/checkpoints/step-0000000" in restarted

    straight, broken = runs["straight"], runs["broken"]
    # the final parameters: the newest committed checkpoint of each, and the best model
    found = [latest_checkpoint(run) for run in (straight, broken)]
    newest = [f[0] for f in found if f is not None]
    assert [f.name for f in newest] == ["step-00000014"] * 2
    # pod 0 committed both pods' files: the model, and each rank's optimizer partition
    records = [f[1] for f in found if f is not None]
    assert [e["path"] for e in records[1]["files"]] == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    final = [load_model_weights(f) for f in newest]
    assert final[0].keys() == final[1].keys()
    for name, tensor in final[0].items():
        assert torch.equal(tensor, final[1][name]), name
    best = [load_model(run.show("best_model.pt"))["model"] for run in (straight, broken)]
    assert all(torch.equal(best[0][k], best[1][k]) for k in best[0])
    # results.json and the logs are in the bucket, and tell the same story
    results = [json.loads(run.read_text("results.json")) for run in (straight, broken)]
    assert (
        results[0]["world_size"] == 2
        and without_timing(results[0]) == without_timing(results[1])
    )
    rows = [
        [without_timing(json.loads(line)) for line in run.read_text("metrics.jsonl").splitlines()]
        for run in (straight, broken)
    ]
    assert rows[0] == rows[1]  # no row lost at the kill, none twice
    assert sum("loss/total" in row for row in rows[0]) == 14
    assert [name for name in broken.files() if name.startswith("tb/events.out.tfevents")]
    # the rendered TensorBoard Deployment's command reads the curves from the bucket
    losses = scalars_from_tensorboard(tensorboard, "loss/total", tmp_path, points=14)
    by_step = {int(step): value for _, step, value in losses}
    assert len(losses) == 14  # the steps the killed run logged after its checkpoint were purged
    assert sorted(by_step) == list(range(1, 15))
    expected = {row["step"]: row["loss/total"] for row in rows[1] if "loss/total" in row}
    assert by_step == pytest.approx(expected, rel=1e-6)  # float32 in the events
