"""Damaged checkpoints (issue 20, item 4): whether a checkpoint counts is decided by its hashes,
not by the presence of its commit record; falling back past one says why; ``--resume auto``
over a history with damaged checkpoints refuses instead of starting a second history, and a run
killed before its first checkpoint starts afresh with its own settings, its log rewound."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PreparedSets
from faults import DATA, STEPS_PER_EPOCH, logged_losses, train

from elcrec_dist import checkpoint as ckpt
from elcrec_dist.config import ExperimentConfig, load_config
from elcrec_dist.errors import EXIT_OK, EXIT_PERMANENT


def _checkpoint(run_dir: Path, step: int, *, damaged: bool = False) -> Path:
    """A committed checkpoint folder of one small tensor file; ``damaged`` flips one byte of
    it afterwards (same size), as a disk or a copy may."""
    folder = run_dir / ckpt.CHECKPOINTS / ckpt.tag_of(step)
    folder.mkdir(parents=True)
    torch.save({"module": {"model.w": torch.full((64,), float(step))}}, folder / ckpt.MODEL_STATES)
    ckpt.commit(folder, state=ckpt.TrainState(global_step=step), config={})
    if damaged:
        path = folder / ckpt.MODEL_STATES
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    return folder


def _steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in sorted((run_dir / ckpt.CHECKPOINTS).iterdir())]


def test_damaged_checkpoints_never_push_good_ones_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step, damaged in ((10, False), (20, False), (30, True), (40, True)):
        _checkpoint(tmp_path, step, damaged=damaged)
    (tmp_path / ckpt.CHECKPOINTS / ckpt.tag_of(50)).mkdir()  # a save that never committed
    with caplog.at_level(logging.WARNING, logger="elcrec_dist"):
        ckpt.prune(tmp_path, keep=2)
    assert _steps(tmp_path) == [10, 20]  # the two good ones; the newer damaged ones went
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removing")]
    assert len(removed) == 3 and all(
        "another sha256" in m for m in removed if "00000030" in m or "00000040" in m
    )
    assert any("00000050" in m and "did not finish" in m for m in removed)
    # a new good checkpoint then pushes out the oldest good one, as it should
    _checkpoint(tmp_path, 60)
    ckpt.prune(tmp_path, keep=2)
    assert _steps(tmp_path) == [20, 60]


def test_falling_back_past_a_damaged_checkpoint_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20, damaged=True)
    record = json.loads((tmp_path / "checkpoints/step-00000020" / ckpt.COMMIT_NAME).read_text())
    with caplog.at_level(logging.WARNING, logger="elcrec_dist"):
        found = ckpt.latest_checkpoint(tmp_path)
    assert found is not None and Path(str(found[0])).name == "step-00000010"
    assert record["files"][0]["path"] == ckpt.MODEL_STATES
    [why] = [r.getMessage() for r in caplog.records]
    assert "step-00000020 is not usable: mp_rank_00_model_states.pt has another sha256" in why


def test_a_history_without_a_usable_checkpoint_is_not_fresh(tmp_path: Path) -> None:
    assert ckpt.latest_checkpoint(tmp_path / "new") is None  # nothing there: fresh
    config = load_config(None, ["train.lr=0.001"])
    steps_only = tmp_path / "logged"
    steps_only.mkdir()
    (steps_only / "metrics.jsonl").write_text(
        '{"step": 0, "kmeans/inertia": 1.0}\n{"step": 3, "loss/total": 2.0}\n'
    )
    # no config.yaml: nobody can tell which run made the history
    with pytest.raises(ckpt.CheckpointError, match=r"1 logged training step.*no config\.yaml"):
        _checker(steps_only, config).check_resumable()
    # another run's settings: refused, naming the key
    other = load_config(None, ["train.lr=0.002"])
    (steps_only / "config.yaml").write_text(yaml.safe_dump(other.to_dict()))
    with pytest.raises(ckpt.CheckpointError, match=r"1 logged training step.*train\.lr: 0\.002"):
        _checker(steps_only, config).check_resumable()
    # the same settings: a run killed before its first checkpoint, which may start afresh
    (steps_only / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    _checker(steps_only, config).check_resumable()
    assert ckpt.latest_checkpoint(steps_only) is None
    killed_early = tmp_path / "killed-before-any-step"
    killed_early.mkdir()
    (killed_early / "metrics.jsonl").write_text('{"step": 0, "kmeans/inertia": 1.0}\n{"step": 0')
    assert ckpt.latest_checkpoint(killed_early) is None  # no step trained: still fresh
    _checker(killed_early, config).check_resumable()


def _checker(run_dir: Path, config: ExperimentConfig) -> ckpt.Checkpointer:
    return ckpt.Checkpointer(run_dir, config=config, dataset={"users": 1})


@pytest.fixture(scope="module")
def data(prepared_sets: PreparedSets) -> Path:
    return prepared_sets(DATA)


@pytest.mark.slow
def test_resume_auto_with_only_damaged_checkpoints_refuses(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    damaged = _checkpoint(run_dir, 6, damaged=True)
    metrics = '{"step": 6, "loss/total": 3.0}\n'
    (run_dir / "metrics.jsonl").write_text(metrics)
    proc = train(data, run_dir, resume="auto")
    assert proc.returncode == EXIT_PERMANENT, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "no usable checkpoint, but the run folder has a history" in line
    assert "step-00000006 (mp_rank_00_model_states.pt has another sha256" in line
    assert "Refusing to start afresh" in line
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # no second history
    assert damaged.is_dir() and ckpt.verify(damaged) is None  # left for a person to look at


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_afresh(data: Path, tmp_path: Path) -> None:
    """A pod killed in its first epoch leaves logged steps, config.yaml and no checkpoint; its
    retry (``--resume auto``, the manifests' default) must train, not fail the Job, and the log
    must hold one history, the same as a run that was never killed."""
    whole = tmp_path / "whole"
    assert train(data, whole).returncode == EXIT_OK
    run_dir = tmp_path / "killed"
    first = train(data, run_dir)
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    for name in ("checkpoints",):  # as if killed before its first save
        shutil.rmtree(run_dir / name)
    for name in ("best_model.pt", "results.json"):
        (run_dir / name).unlink()
    again = train(data, run_dir, resume="auto")
    assert again.returncode == EXIT_OK, again.stderr[-3000:]
    assert "a run killed before its first checkpoint; starting afresh" in again.stderr
    losses = logged_losses(run_dir)
    assert losses == logged_losses(whole)  # one history, bit for bit the uninterrupted one
    assert sorted(losses) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
