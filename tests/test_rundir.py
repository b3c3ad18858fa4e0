"""``elcrec_dist.rundir``: run folders as locations, local or ``s3://`` (a moto server on
loopback), with the same files, commit records and refusals; URLs never taken for local paths;
transient storage faults retried by botocore's configured budget and, past it, a retryable
``StorageError`` with nothing committed (a fault-injecting proxy in front of the server)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_proxy import FaultProxy

from elcrec_dist import checkpoint as ckpt
from elcrec_dist.errors import EXIT_PERMANENT, EXIT_RETRYABLE
from elcrec_dist.rundir import (
    DEFAULT_ATTEMPTS,
    FileRecord,
    Folder,
    LocationError,
    StorageError,
    check_location,
    filesystem,
    scheme_of,
)
from elcrec_dist.runlog import RunLogger


@pytest.fixture
def proxy(s3_env: str, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the test server; the environment points at it."""
    import s3fs

    fault_proxy = FaultProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.start())
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield fault_proxy
    finally:
        fault_proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["local", "s3"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A run folder location: a local path, or a prefix in a fresh test bucket."""
    if request.param == "local":
        return str(tmp_path / "run")
    bucket = request.getfixturevalue("s3_env")
    return f"s3://{bucket}/runs/x"


# --- locations -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["runs/x", "/abs/runs/x", "file:///abs/x", "./s3", "s3"])
def test_paths_and_file_urls_are_local(text: str) -> None:
    assert scheme_of(text) == "file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("s3:/bucket/x", r"looks like a URL but is not one \(expected s3://"),
        ("gs://bucket/x", r"unsupported scheme gs:// \(supported: a local path, file://, s3://\)"),
        ("hdfs://nn/x", "unsupported scheme hdfs://"),
        ("S3A://bucket/x", "unsupported scheme s3a://"),
    ],
)
def test_url_like_text_is_refused_not_created_as_a_local_path(
    text: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocationError, match=message) as caught:
        Folder(text).write_text("x", "config.yaml")
    assert caught.value.exit_code == EXIT_PERMANENT
    with pytest.raises(LocationError):
        RunLogger(text, enabled=True)
    with pytest.raises(LocationError):
        check_location(text, what="run folder")
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket/x, nothing at all


def test_an_s3_location_without_credentials_is_permanent(
    s3_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(LocationError, match=r"no storage credentials found.*never in the config"):
        check_location(f"s3://{s3_env}/runs/x", what="run folder")


def test_a_missing_bucket_is_permanent_and_an_existing_one_passes(s3_env: str) -> None:
    check_location(f"s3://{s3_env}/runs/x", what="run folder")
    with pytest.raises(
        LocationError,
        match=r"run folder s3://no-such-bucket-x/r: bucket 'no-such-bucket-x' does not exist",
    ):
        check_location("s3://no-such-bucket-x/r", what="run folder")


def test_the_retry_budget_is_set_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    fs, _ = filesystem("s3://bucket/x")
    assert fs.config_kwargs["retries"] == {
        "mode": "standard",
        "total_max_attempts": DEFAULT_ATTEMPTS,
    }
    assert fs.config_kwargs["connect_timeout"] == 10 and fs.config_kwargs["read_timeout"] == 60
    assert fs.retries == 1  # s3fs's own loop makes one pass: botocore's attempts are the budget
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert filesystem("s3://bucket/x")[0].config_kwargs["retries"]["total_max_attempts"] == 3
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "none")
    with pytest.raises(LocationError, match="AWS_MAX_ATTEMPTS='none'"):
        filesystem("s3://bucket/x")


# --- files ---------------------------------------------------------------------------------------


def test_a_folder_reads_back_what_it_wrote_and_lists_it(run_dir: str, tmp_path: Path) -> None:
    folder = Folder(run_dir)
    folder.makedirs()
    record = folder.write_text("a: 1\n", "config.yaml")
    assert record == FileRecord("config.yaml", 5, hashlib.sha256(b"a: 1\n").hexdigest())
    source = tmp_path / "weights.bin"
    source.write_bytes(bytes(range(256)) * 40)
    uploaded = folder.upload(source, "checkpoints/step-00000003/weights.bin")
    assert uploaded == FileRecord("checkpoints/step-00000003/weights.bin", 10240,
                                       hashlib.sha256(source.read_bytes()).hexdigest())
    assert folder.read_text("config.yaml") == "a: 1\n"
    assert folder.files() == {"checkpoints/step-00000003/weights.bin": 10240, "config.yaml": 5}
    assert [f.name for f in folder.child("checkpoints").folders()] == ["step-00000003"]
    assert folder.child("checkpoints").folders()[0] == Folder(
        f"{run_dir}/checkpoints/step-00000003"
    )
    back = tmp_path / "back.bin"
    folder.download(uploaded.path, back, expect=uploaded)
    assert back.read_bytes() == source.read_bytes()
    wrong = FileRecord(uploaded.path, uploaded.bytes, "0" * 64)
    with pytest.raises(StorageError, match="the record says 10240 bytes, 0000"):
        folder.download(uploaded.path, back, expect=wrong)
    with pytest.raises(FileNotFoundError):
        folder.read_bytes("absent.json")
    folder.child("checkpoints").remove()
    assert folder.files() == {"config.yaml": 5}


def _engine_file(step: int) -> bytes:
    """An engine file's bytes (a torch file of one tensor, as DeepSpeed writes them)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"module": {"model.w": torch.full((4,), float(step))}}, buffer)
    return buffer.getvalue()


def _checkpoint(run: Folder, step: int, tmp_path: Path) -> Folder:
    """A checkpoint folder as a run writes one: the engine's file, then the commit record."""
    folder = run.child(ckpt.CHECKPOINTS, ckpt.tag_of(step))
    local = tmp_path / f"engine-{step}.pt"
    local.write_bytes(_engine_file(step))
    record = folder.upload(local, ckpt.MODEL_STATES)
    ckpt.commit(folder, state=ckpt.TrainState(global_step=step), config={"train": {"lr": 0.1}},
                files=[record] if not run.local else None)
    return folder


def test_a_torn_checkpoint_is_refused_and_the_previous_one_used(
    run_dir: str, tmp_path: Path
) -> None:
    run = Folder(run_dir)
    _checkpoint(run, 10, tmp_path)
    newest = _checkpoint(run, 20, tmp_path)
    found = ckpt.latest_checkpoint(run)
    assert found is not None and found[0] == newest and found[1]["state"]["global_step"] == 20
    engine_file = _engine_file(20)
    assert found[1]["files"] == [{"path": ckpt.MODEL_STATES, "bytes": len(engine_file),
                                  "sha256": hashlib.sha256(engine_file).hexdigest()}]
    # a changed byte (same size), then a missing file: the newest does not count any more
    newest.write_bytes(engine_file[:-1] + bytes([engine_file[-1] ^ 1]), ckpt.MODEL_STATES)
    assert ckpt.verify(newest) is None
    found = ckpt.latest_checkpoint(run)
    assert found is not None and found[0].name == ckpt.tag_of(10)
    newest.remove(ckpt.MODEL_STATES)
    assert ckpt.verify(newest) is None
    # an upload that never committed (a killed save) is skipped by the cheap check too, and
    # pruning removes it
    run.child(ckpt.CHECKPOINTS, ckpt.tag_of(30)).write_bytes(b"partial", ckpt.MODEL_STATES)
    assert [f.name for f in ckpt.checkpoint_folders(run)] == [ckpt.tag_of(s) for s in (30, 20, 10)]
    record = ckpt.newest_record(run)
    assert record is not None and record[0] == newest  # its record exists; its files do not match
    ckpt.prune(run, keep=2)
    kept = [f.name for f in ckpt.checkpoint_folders(run)]
    assert ckpt.tag_of(30) not in kept and kept[-1] == ckpt.tag_of(10)


def test_model_files_round_trip_through_any_run_folder(run_dir: str) -> None:
    import torch

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    path = f"{run_dir}/{ckpt.BEST_MODEL}"
    ckpt.save_model(path, state=state, config={"a": 1}, meta={"epoch": 3})
    loaded = ckpt.load_model(path)
    assert torch.equal(loaded["model"]["w"], state["w"]) and loaded["meta"] == {"epoch": 3}
    assert torch.equal(ckpt.load_model_weights(path)["w"], state["w"])
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.load_model(f"{run_dir}/nothing.pt")


# --- the run log ---------------------------------------------------------------------------------


def _scalars(location: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files at ``location``, read by TensorBoard's own
    loader (for ``s3://``, TensorBoard's S3 client with the endpoint from the environment)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(location)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_run_log_is_stored_at_each_flush_and_tensorboard_reads_it(run_dir: str) -> None:
    folder = Folder(run_dir)
    log = RunLogger(run_dir, enabled=True, sync_every_s=3600)  # flushes: sync() and close() only
    log.log({"loss/total": 1.5}, step=1)
    log.log({"loss/total": 1.25}, step=2)
    if not folder.local:  # not stored before a flush
        assert not folder.exists("metrics.jsonl")
    log.sync()  # what a checkpoint commit does first
    assert folder.read_text("metrics.jsonl").splitlines() == [
        '{"step": 1, "loss/total": 1.5}', '{"step": 2, "loss/total": 1.25}']
    assert _scalars(f"{run_dir}/tb") == {"loss/total": [(1, 1.5), (2, 1.25)]}
    log.log({"loss/total": 1.0}, step=3)
    log.close()
    assert json.loads(folder.read_text("metrics.jsonl").splitlines()[-1]) == {
        "step": 3,
        "loss/total": 1.0,
    }

    # a resumed run (a new process, e.g. another pod) continues the stored log from its
    # checkpoint's step; TensorBoard drops the steps after it (the purge event)
    resumed = RunLogger(run_dir, enabled=True, sync_every_s=3600)
    resumed.rewind(2)
    resumed.log({"loss/total": 0.5}, step=3)
    resumed.close()
    rows = [json.loads(line) for line in folder.read_text("metrics.jsonl").splitlines()]
    assert rows == [{"step": 1, "loss/total": 1.5}, {"step": 2, "loss/total": 1.25},
                    {"step": 3, "loss/total": 0.5}]
    assert _scalars(f"{run_dir}/tb") == {"loss/total": [(1, 1.5), (2, 1.25), (3, 0.5)]}


def test_the_run_log_syncs_when_its_interval_has_passed(s3_env: str) -> None:
    run_dir = f"s3://{s3_env}/runs/timed"
    log = RunLogger(run_dir, enabled=True, sync_every_s=0.0)
    log.log({"loss/total": 2.0}, step=1)  # the interval (0 s) has passed: stored at once
    assert Folder(run_dir).read_text("metrics.jsonl") == '{"step": 1, "loss/total": 2.0}\n'
    log.close()


# --- storage faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["503", "500", "reset"])
def test_transient_faults_on_writes_and_reads_are_retried(
    proxy: FaultProxy, s3_env: str, kind: str, tmp_path: Path
) -> None:
    run = Folder(f"s3://{s3_env}/runs/faults")
    source = tmp_path / "engine.pt"
    source.write_bytes(os.urandom(4096))
    proxy.inject(kind, 2, method="PUT")  # the first two writes fail
    record = run.upload(source, "checkpoints/step-00000001/engine.pt")
    proxy.inject(kind, 2, method="GET")  # then the first two reads
    back = tmp_path / "back.pt"
    run.download(record.path, back, expect=record)
    assert back.read_bytes() == source.read_bytes()
    assert [(f.method, f.kind) for f in proxy.faults] == [("PUT", kind)] * 2 + [("GET", kind)] * 2


def test_past_the_budget_a_save_raises_retryable_and_commits_nothing(
    proxy: FaultProxy, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # a small budget keeps the test short
    run = Folder(f"s3://{s3_env}/runs/outage")
    _checkpoint(run, 10, tmp_path)
    proxy.inject("503", None, method="PUT")  # every write fails from now on
    with pytest.raises(StorageError, match="after 2 attempt") as caught:
        _checkpoint(run, 20, tmp_path)
    assert caught.value.exit_code == EXIT_RETRYABLE
    assert len(proxy.faults) == 2  # exactly the budget: no second retry loop around botocore's
    proxy.clear()
    assert not run.exists("checkpoints", ckpt.tag_of(20), ckpt.COMMIT_NAME)
    found = ckpt.latest_checkpoint(run)
    assert found is not None and found[0].name == ckpt.tag_of(10)
