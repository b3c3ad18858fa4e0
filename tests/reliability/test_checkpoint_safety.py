"""A checkpoint runs no code when it is loaded (issue 20, item 1).

DeepSpeed's own reader unpickles with ``weights_only=False``. Anyone who can write the run folder
(a shared volume, a bucket) can replace a checkpoint file with a pickle that runs a command and
re-hash the commit record. The engine's files are read weights-only, with an allowlist of the
three DeepSpeed classes its ZeRO files hold, and a file naming anything else is refused first.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import PreparedSets
from faults import DATA, committed, train

from elcrec_dist import checkpoint as ckpt
from elcrec_dist.config import load_config
from elcrec_dist.rundir import Folder


class _RunsACommand:
    """Unpickling this runs ``touch SENTINEL`` (what a planted checkpoint would do)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.sentinel}",))


def _plant(folder: Path, name: str, sentinel: Path) -> None:
    """Replace ``folder/name`` with a pickle holding the original content and the payload, and
    re-hash the commit record, as someone who can write the run folder would."""
    path = folder / name
    original = torch.load(path, map_location="cpu", weights_only=False)  # our own file: trusted
    original["payload"] = _RunsACommand(sentinel)
    torch.save(original, path)
    record = json.loads((folder / ckpt.COMMIT_NAME).read_text())
    for entry in record["files"]:
        if entry["path"] == name:
            entry["bytes"] = path.stat().st_size
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / ckpt.COMMIT_NAME).write_text(json.dumps(record))
    assert ckpt.verify(folder) is not None  # the hashes no longer tell


@pytest.fixture(scope="module")
def data(prepared_sets: PreparedSets) -> Path:
    return prepared_sets(DATA)


@pytest.mark.slow
def test_a_planted_pickle_in_a_checkpoint_runs_no_code_on_resume(
    data: Path, tmp_path: Path
) -> None:
    run_dir, sentinel = tmp_path / "run", tmp_path / "SENTINEL"
    first = train(data, run_dir, "train.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    [folder] = committed(run_dir)
    _plant(folder, ckpt.MODEL_STATES, sentinel)

    resumed = train(data, run_dir, "train.epochs=2", resume="auto")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert not sentinel.exists(), "the planted pickle ran"
    assert f"{ckpt.MODEL_STATES}: refusing to load it" in resumed.stderr
    assert "posix.system" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert "resumed from" not in resumed.stderr


def test_the_weights_only_reader_refuses_it_too(data: Path, tmp_path: Path) -> None:
    """Defence in depth: were the opcode scan to miss a file, the engine's reader still runs
    nothing (the load itself is weights-only)."""
    folder, sentinel = tmp_path / "step", tmp_path / "SENTINEL"
    folder.mkdir()
    torch.save({"module": {"w": torch.ones(2)}}, folder / ckpt.MODEL_STATES)
    ckpt.commit(folder, state=ckpt.TrainState(), config={})
    _plant(folder, ckpt.MODEL_STATES, sentinel)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load it"):
        ckpt.safe_checkpoint_engine().load(str(folder / ckpt.MODEL_STATES), map_location="cpu")
    with pytest.raises(ckpt.CheckpointError, match=r"posix\.system"):
        ckpt.refuse_unsafe_pickles(Folder(folder), ckpt.verify(folder) or {})
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "engine",
    [
        ["deepspeed.zero_stage=0"],
        ["deepspeed.zero_stage=1"],
        ["deepspeed.zero_stage=2"],
        ["deepspeed.zero_stage=2", "deepspeed.bf16=true"],
    ],
    ids=["zero0", "zero1", "zero2", "zero2-bf16"],
)
def test_what_the_engine_writes_loads_weights_only_and_exactly(
    engine: list[str], tmp_path: Path
) -> None:
    """Every file the engine writes names only allowlisted globals, and an engine restored
    through the weights-only reader holds exactly the saved weights and Adam moments."""
    from elcrec_dist import distributed as dist_utils
    from elcrec_dist.batching import make_train_batch
    from elcrec_dist.trainer.engine import base_optimizer, build_engine, init_model, train_step

    device = dist_utils.init()
    config = load_config(
        None,
        [
            "model.hidden_size=8",
            "model.max_len=6",
            "model.num_clusters=3",
            "train.batch_size=4",
            *engine,
        ],
    )
    seqs = [torch.randint(1, 20, (8,)).numpy() for _ in range(4)]
    saved = build_engine(init_model(config, num_items=20, device=device), config)
    batch = make_train_batch(
        seqs,
        num_items=20,
        max_len=6,
        augment=config.augment,
        generator=torch.Generator().manual_seed(0),
    )
    train_step(saved, batch, config)
    saved.save_checkpoint(str(tmp_path), tag="t", client_state={}, save_latest=False)
    folder = Folder(tmp_path / "t")
    files = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert files and all(ckpt.unsafe_globals(folder, name) == [] for name in files), files

    restored = build_engine(init_model(config, num_items=20, device=device), config)
    restored.load_checkpoint(str(tmp_path), tag="t", load_lr_scheduler_states=False)
    for (name, a), b in zip(
        saved.module.state_dict().items(), restored.module.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    before, after = (base_optimizer(e).state_dict()["state"] for e in (saved, restored))
    assert before.keys() == after.keys() and before
    for key, moments in before.items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[name], after[key][name]), (key, name)


def test_the_planted_payload_does_run_under_a_plain_load(tmp_path: Path) -> None:
    """The control: the same file, unpickled as DeepSpeed's own reader does, runs the command."""
    folder, sentinel = tmp_path / "step", tmp_path / "SENTINEL"
    folder.mkdir()
    torch.save({"module": {"w": torch.ones(2)}}, folder / ckpt.MODEL_STATES)
    ckpt.commit(folder, state=ckpt.TrainState(), config={})
    _plant(folder, ckpt.MODEL_STATES, sentinel)
    torch.load(folder / ckpt.MODEL_STATES, weights_only=False)
    assert sentinel.exists()
