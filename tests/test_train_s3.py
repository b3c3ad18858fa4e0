"""Training with ``s3://`` (a local S3-protocol server on loopback): a dataset there equals the
same prepared dataset in a local folder (issue 3); a run folder there holds what a local one
holds, through transient storage faults, resumes from it, exits 75 with nothing committed past
the retry budget, and is refused before any work when it cannot be used (issue 16)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PreparedSets
from fault_proxy import FaultProxy
from launch import deepspeed_command, deepspeed_env

from data_prep.synthetic import SyntheticSpec
from elcrec_dist.rundir import Folder

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "train.epochs=2",
    "train.batch_size=64",
    "model.num_clusters=8",
    "kmeans.sample_users=400",
    "train.log_every=1",
]


def _train(data: str, run_dir: str | Path, *extra: str, env: Mapping[str, str] | None = None,
           drop: Sequence[str] = (), cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "launcher/train.py"),
           "--config", str(REPO / "configs/demo.yaml"), "--data", data, "--run-dir", str(run_dir)]
    for o in OVERRIDES:
        cmd += ["--set", o]
    # One intra-op thread: with two, CPU float reductions (e.g. the embedding gradient) are not
    # bitwise repeatable from run to run, and this test compares runs exactly.
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for name in drop:
        full.pop(name, None)
    return subprocess.run(
        [*cmd, *extra], cwd=cwd, capture_output=True, text=True, timeout=600, env=full
    )


@pytest.mark.slow
def test_training_from_s3_equals_training_from_a_local_folder(
    s3_env: str, tmp_path: Path, prepared_sets: PreparedSets
) -> None:
    import fsspec

    local = prepared_sets(SyntheticSpec(users=600, items=150, intents=4, seed=2))
    remote = f"s3://{s3_env}/prepared/demo"
    fs = fsspec.filesystem("s3")
    for path in sorted(local.iterdir()):
        fs.put(str(path), f"{remote}/{path.name}")

    a = _train(str(local), tmp_path / "run-local")
    b = _train(remote, tmp_path / "run-s3")
    assert a.returncode == 0, a.stderr[-3000:]
    assert b.returncode == 0, b.stderr[-3000:]
    ra, rb = (
        json.loads((tmp_path / d / "results.json").read_text()) for d in ("run-local", "run-s3")
    )
    assert ra["test"] == rb["test"] and ra["valid_history"] == rb["valid_history"]
    assert (
        ra["popularity_test"] == rb["popularity_test"]
        and ra["intent_recovery"] == rb["intent_recovery"]
    )
    la, lb = (
        (tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("run-local", "run-s3")
    )
    losses = [
        [{k: v for k, v in json.loads(x).items() if k.startswith("loss/")} for x in lines]
        for lines in (la, lb)
    ]
    # 600 users / 64 -> 10 steps per epoch
    assert losses[0] == losses[1] and sum(1 for row in losses[0] if row) == 2 * 10
    # no credentials end up in the run folder
    for path in (tmp_path / "run-s3").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".jsonl"):
            assert "testing" not in path.read_text()


def test_a_missing_s3_dataset_is_a_permanent_error(s3_env: str, tmp_path: Path) -> None:
    proc = _train(f"s3://{s3_env}/nothing-here", tmp_path / "run")
    assert proc.returncode == 2
    assert "manifest.json" in proc.stderr


# --- the run folder on s3 (issue 16) --------------------------------------------------------------

TIMING = re.compile(r"(per_s|seconds|_time|finished_at|time_split|time/|peak_memory|_s$)")


def _without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if not TIMING.search(k)}
    return value


def _rows(text: str) -> list[dict[str, Any]]:
    return [_without_timing(json.loads(line)) for line in text.splitlines()]


def _scalars(location: str) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard events at ``location``, read by TensorBoard's own loader
    (for ``s3://``: TensorBoard's S3 client, with the endpoint from the environment)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(location)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if not TIMING.search(tag)}


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(s3_server)
    fault_proxy.start()
    try:
        yield fault_proxy
    finally:
        fault_proxy.stop()


def _upload_dataset(local: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    for path in sorted(local.iterdir()):
        fs.put(str(path), f"{url}/{path.name}")


# Every kind of file the trainer reads or writes on s3 meets a fault first (each rule must be
# used up: the run then shows that each was retried, not skipped).
TRANSIENT_FAULTS = [
    ("503", 2, "GET", r"/prepared/demo/part-.*\.parquet"),  # data: a row group or a footer
    ("reset", 1, "PUT", r"/run/config\.yaml"),
    ("reset", 2, "PUT", r"/run/checkpoints/step-\d+/mp_rank_00_model_states\.pt"),
    ("500", 1, "PUT", r"/run/checkpoints/step-\d+/COMMITTED\.json"),
    ("503", 1, "PUT", r"/run/metrics\.jsonl"),
    ("reset", 1, "PUT", r"/run/tb/events\.out\.tfevents"),
    ("500", 1, "PUT", r"/run/best_model\.pt"),
    ("503", 1, "PUT", r"/run/results\.json"),
    ("500", 1, "GET", r"/run/checkpoints/step-\d+/mp_rank_00_model_states\.pt"),  # verify reads
]


@pytest.mark.slow
def test_a_run_folder_on_s3_through_storage_faults_holds_what_a_local_one_holds(
    s3_env: str, proxy: FaultProxy, tmp_path: Path, prepared_sets: PreparedSets
) -> None:
    from elcrec_dist.checkpoint import latest_checkpoint, load_model, load_model_weights

    local_data = prepared_sets(SyntheticSpec(users=600, items=150, intents=4, seed=2))
    data = f"s3://{s3_env}/prepared/demo"
    _upload_dataset(local_data, data)
    run = f"s3://{s3_env}/run"
    rules = [proxy.inject(kind, count, method=method, path=path)
             for kind, count, method, path in TRANSIENT_FAULTS]
    through_proxy = {"AWS_ENDPOINT_URL": proxy.url}

    a = _train(str(local_data), str(tmp_path / "run-local"), "--set", "train.checkpoint_every=4")
    b = _train(data, run, "--set", "train.checkpoint_every=4", env=through_proxy)
    assert a.returncode == 0, a.stderr[-3000:]
    assert b.returncode == 0, b.stderr[-3000:]
    assert [(r.kind, r.served) for r in rules] == [(r.kind, r.count) for r in rules], proxy.faults
    assert f"run folder: {run}" in b.stdout
    assert not (REPO / "s3:").exists()

    local = tmp_path / "run-local"
    remote = Folder(run)
    assert _without_timing(json.loads(remote.read_text("results.json"))) == _without_timing(
        json.loads((local / "results.json").read_text()))
    assert _rows(remote.read_text("metrics.jsonl")) == _rows((local / "metrics.jsonl").read_text())
    assert remote.read_text("config.yaml").replace(run, "RUN") == (local / "config.yaml").read_text(
    ).replace(str(local), "RUN").replace(str(local_data), data)
    # TensorBoard finds the same curves in the bucket as in the local folder
    curves = _scalars(f"{run}/tb")
    assert curves == _scalars(str(local / "tb")) and len(curves["loss/total"]) == 20
    # the same checkpoints, committed with every file's size and sha256, and the same models
    found, found_local = latest_checkpoint(remote), latest_checkpoint(local)
    assert found is not None and found_local is not None
    assert found[0].name == found_local[0].name == "step-00000020"
    assert found[1]["files"][0]["path"] == "mp_rank_00_model_states.pt"
    weights, weights_local = load_model_weights(found[0]), load_model_weights(found_local[0])
    assert weights.keys() == weights_local.keys()
    assert all(torch.equal(weights[k], weights_local[k]) for k in weights)
    best, best_local = load_model(f"{run}/best_model.pt"), load_model(local / "best_model.pt")
    assert all(torch.equal(best["model"][k], v) for k, v in best_local["model"].items())
    # no credentials in the bucket
    for name in remote.files():
        if name.endswith((".json", ".yaml", ".jsonl")):
            assert "testing" not in remote.read_text(name), name

    # --resume reads the newest committed checkpoint back from the bucket (through faults too)
    proxy.clear()
    again = proxy.inject("500", 2, method="GET", path=r"/run/checkpoints/step-\d+/mp_rank")
    c = _train(data, run, "--resume", "--set", "train.epochs=3",
               "--set", "train.checkpoint_every=4", env=through_proxy)
    assert c.returncode == 0, c.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/step-00000020 (epoch 2, step 0" in c.stderr
    assert again.served == 2
    assert json.loads(remote.read_text("results.json"))["epochs_run"] == 3


@pytest.mark.slow
def test_past_the_storage_budget_a_run_exits_75_and_commits_nothing(
    s3_env: str, proxy: FaultProxy, tmp_path: Path, small_synthetic: Path
) -> None:
    run = f"s3://{s3_env}/outage"
    proxy.inject("503", None, method="PUT", path=r"/outage/checkpoints/")  # an outage for writes
    proc = _train(
        str(small_synthetic), run, env={"AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "2"}
    )
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "storage failed after 2 attempt(s)" in proc.stderr
    assert "Traceback" not in proc.stderr
    stored = Folder(run).files()
    assert "config.yaml" in stored  # the run had started
    assert not [name for name in stored if name.endswith("COMMITTED.json")]
    assert "results.json" not in stored


@pytest.mark.parametrize(
    ("run_dir", "message"),
    [
        ("s3:/bucket/run", "looks like a URL but is not one (expected s3://...)"),
        ("gs://bucket/run", "unsupported scheme gs://"),
        ("s3://no-such-bucket-zz/run", "bucket 'no-such-bucket-zz' does not exist"),
    ],
)
def test_a_run_folder_that_cannot_be_used_is_refused_before_any_work(
    s3_env: str, run_dir: str, message: str, small_synthetic: Path, tmp_path: Path
) -> None:
    proc = _train(str(small_synthetic), run_dir, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "world size" not in proc.stderr  # no process group, no run folder: nothing started
    assert list(tmp_path.iterdir()) == []  # and no ./s3:/bucket/run


def test_an_s3_run_folder_without_credentials_is_refused_before_any_work(
    s3_env: str, small_synthetic: Path, tmp_path: Path
) -> None:
    env = {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    proc = _train(str(small_synthetic), f"s3://{s3_env}/run", env=env,
                  drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"run folder s3://{s3_env}/run: no storage credentials found" in proc.stderr
    assert "world size" not in proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_whose_shard_cannot_land_stops_every_rank_before_the_commit(
    s3_env: str, proxy: FaultProxy, small_synthetic: Path
) -> None:
    run = f"s3://{s3_env}/zero"
    # ZeRO stage 1 over 2 ranks: rank 1 writes its own optimizer partition, and it never lands
    proxy.inject("503", None, method="PUT", path=r"/zero/checkpoints/step-\d+/zero_pp_rank_1_")
    sets = [a for o in [*OVERRIDES, "deepspeed.zero_stage=1"] for a in ("--set", o)]
    cmd, _ = deepspeed_command("launcher/train.py", "--config", "configs/demo.yaml", "--data",
                               str(small_synthetic), "--run-dir", run, *sets)
    env = deepspeed_env(AWS_ENDPOINT_URL=proxy.url, AWS_MAX_ATTEMPTS="2", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 75, output[-3000:]
    # rank 1 names its shard (rank 0 stops with it, "rank 1: ...", unless the launcher ends it
    # first)
    assert re.search(r"s3://\S+/zero_pp_rank_1_mp_rank_00_optim_states\.pt: storage failed "
                     r"after 2 attempt\(s\)", output), output[-3000:]
    stored = Folder(run).files()
    assert any(name.endswith("/zero_pp_rank_0_mp_rank_00_optim_states.pt") for name in stored)
    assert not [name for name in stored if name.endswith("COMMITTED.json")]
    assert "results.json" not in stored
