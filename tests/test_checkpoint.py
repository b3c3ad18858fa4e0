"""``elcrec_dist.checkpoint``: which config changes a resume accepts, checked key by key, and the
dataset fingerprint that keeps a run from resuming on other data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_prepared

from elcrec_dist import checkpoint as ckpt
from elcrec_dist.config import load_config
from elcrec_dist.prepared import DatasetInfo
from elcrec_dist.stream import StreamingDataset


def _config(*overrides: str) -> dict:
    return load_config("configs/demo.yaml", ["data.path=data/x", *overrides]).to_dict()


def test_a_resume_may_change_only_where_how_long_and_how_often() -> None:
    stored = _config()
    allowed = _config("train.epochs=7", "train.patience=3", "train.run_dir=elsewhere",
                      "data.path=moved", "train.log_every=5", "train.checkpoint_every=9",
                      "train.keep_checkpoints=4", "train.deterministic=false", "eval.batch_size=64",
                      "eval.ks=[1,20]", "kmeans.batch_size=8", "name=x")
    assert ckpt.config_changes(stored, allowed) == ckpt.ConfigChanges({}, [], [])
    # tuples (betas, ks) come back from JSON as lists and still compare equal
    assert ckpt.config_changes(json.loads(json.dumps(stored)), stored).changed == {}


@pytest.mark.parametrize(
    ("override", "key", "before", "after"),
    [
        ("train.lr=0.01", "train.lr", 0.002, 0.01),
        ("train.betas=[0.8,0.99]", "train.betas", [0.9, 0.999], [0.8, 0.99]),
        ("model.num_clusters=9", "model.num_clusters", None, 9),
        ("loss.centre_gradient=tangent", "loss.centre_gradient", "reference", "tangent"),
        ("augment.mask_ratio=0.5", "augment.mask_ratio", None, 0.5),
        ("train.seed=2", "train.seed", None, 2),
        ("eval.select_metric=HR@20", "eval.select_metric", "NDCG@20", "HR@20"),
        ("deepspeed.zero_stage=1", "deepspeed.zero_stage", 0, 1),
    ],
)
def test_a_resume_may_not_change_what_the_run_computes(
    override: str, key: str, before, after
) -> None:
    stored = _config()
    changes = ckpt.config_changes(stored, _config(override))
    expected_before = before if before is not None else ckpt._flatten(stored)[key]
    assert changes.changed == {key: (expected_before, after)}
    record = {"config": stored}
    with pytest.raises(ckpt.CheckpointError, match=key.replace(".", r"\.")):
        ckpt.check_resume(
            Path("run/checkpoints/step-00000001"),
            record,
            config=_config(override),
            dataset={},
            world=1,
        )


def test_keys_an_older_checkpoint_lacks_are_reported_not_refused() -> None:
    current = _config("train.lr=0.01")
    stored = _config("train.lr=0.01")
    del stored["train"]["deterministic"], stored["loss"]["centre_gradient"]
    stored["train"]["retired_option"] = 1
    changes = ckpt.config_changes(stored, current)
    assert changes == ckpt.ConfigChanges(
        {}, ["loss.centre_gradient", "train.deterministic"], ["train.retired_option"]
    )
    assert (
        ckpt.check_resume(Path("x"), {"config": stored}, config=current, dataset={}, world=1)
        == changes
    )  # nothing refused


def test_a_key_an_older_checkpoint_lacks_may_not_leave_its_default() -> None:
    """The code that wrote an older checkpoint behaved as a new key's default does: a resume
    that sets the key elsewhere changes what the run computes (a Yelp run started before
    eval.history_items existed, resumed under configs/yelp.yaml's score_zero)."""
    stored = _config()
    del stored["eval"]["history_items"], stored["loss"]["centre_gradient"]
    current = _config("eval.history_items=score_zero")  # centre_gradient stays at its default
    changes = ckpt.config_changes(stored, current)
    assert changes.unrecorded == ["eval.history_items", "loss.centre_gradient"]
    assert list(changes.changed) == ["eval.history_items"]
    before, after = changes.changed["eval.history_items"]
    assert before.startswith(ckpt.UNRECORDED) and "'exclude'" in before and after == "score_zero"
    with pytest.raises(ckpt.CheckpointError,
                       match=r"eval\.history_items: not recorded .* the default 'exclude' in the "
                             r"checkpoint, 'score_zero' now"):
        ckpt.check_resume(Path("x"), {"config": stored}, config=current, dataset={}, world=1)
    # a record without any config says nothing about any key
    assert ckpt.config_changes({}, current).changed == {}
    # a resumable key left out and set elsewhere is still only reported
    del stored["eval"]["tile_items"]
    assert "eval.tile_items" not in ckpt.config_changes(
        stored, _config("eval.history_items=score_zero", "eval.tile_items=7")).changed


def test_newest_record_reads_the_newest_commit_record(tmp_path: Path) -> None:
    root = tmp_path / ckpt.CHECKPOINTS
    for step, lr in ((10, 0.1), (20, 0.2)):
        folder = root / ckpt.tag_of(step)
        folder.mkdir(parents=True)
        ckpt.commit(folder, state=ckpt.TrainState(), config={"train": {"lr": lr}})
    (root / ckpt.tag_of(30)).mkdir()  # a save that never committed
    found = ckpt.newest_record(tmp_path)
    assert (
        found is not None
        and found[0].name == ckpt.tag_of(20)
        and found[1]["config"] == {"train": {"lr": 0.2}}
    )
    assert "dataset" not in found[1]
    assert ckpt.newest_record(tmp_path / "nothing") is None


def _prepared(folder: Path, sequences: list[list[int]], num_items: int = 9) -> DatasetInfo:
    write_prepared(folder, sequences, num_items=num_items, shards=1)
    return StreamingDataset.open(str(folder)).info


def test_the_dataset_fingerprint_follows_the_content_not_the_place(tmp_path: Path) -> None:
    sequences = [[1, 2, 3, 4], [5, 6, 7, 8, 9], [2, 4, 6, 8]]
    first = _prepared(tmp_path / "a", sequences)
    moved = _prepared(tmp_path / "elsewhere", sequences)
    assert first.fingerprint() == moved.fingerprint()
    assert first.fingerprint()["num_interactions"] == 13
    # one item differs
    rebuilt = _prepared(tmp_path / "b", [[1, 2, 3, 4], [5, 6, 7, 8, 9], [2, 4, 6, 9]])
    assert rebuilt.fingerprint()["num_interactions"] == 13
    assert rebuilt.fingerprint()["files_sha256"] != first.fingerprint()["files_sha256"]


def test_a_resume_on_another_dataset_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "run"
    folder = root / ckpt.CHECKPOINTS / ckpt.tag_of(5)
    folder.mkdir(parents=True)
    config = _config()
    recorded = {"num_users": 3, "num_items": 9, "num_interactions": 13, "files_sha256": "aa"}
    ckpt.commit(folder, state=ckpt.TrainState(), config=config, dataset=recorded)
    found = ckpt.newest_record(root)
    assert found is not None and found[1]["dataset"] == recorded
    ckpt.check_resume(*found, config=config, dataset=dict(recorded), world=1)  # the same data: fine
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"another dataset \(num_users: 3 in the checkpoint, 4 now; "
        r"files_sha256: 'aa' in the checkpoint, 'bb' now\)",
    ):
        ckpt.check_resume(
            *found,
            config=config,
            dataset={**recorded, "num_users": 4, "files_sha256": "bb"},
            world=1,
        )
    # a checkpoint from before fingerprints were recorded is not checked
    ckpt.check_resume(
        folder, {"config": config}, config=config, dataset={**recorded, "num_users": 4}, world=1
    )
    # another number of ranks: each rank's shard of the data and of the optimizer state differs
    with pytest.raises(ckpt.CheckpointError, match="written by 1 ranks; this run has 2"):
        ckpt.check_resume(*found, config=config, dataset=dict(recorded), world=2)


def test_a_scheduled_learning_rate_fixes_the_runs_length() -> None:
    # With train.lr_schedule=cosine, train.epochs sets every step's rate: no longer resumable.
    stored = _config("train.lr_schedule=cosine")
    changes = ckpt.config_changes(stored, _config("train.lr_schedule=cosine", "train.epochs=7"))
    assert changes.changed == {"train.epochs": (stored["train"]["epochs"], 7)}
    # the other keys of "how long" stay resumable, and a constant rate keeps epochs resumable
    assert ckpt.config_changes(stored, _config("train.lr_schedule=cosine",
                                               "train.patience=3")).changed == {}
    assert ckpt.config_changes(_config(), _config("train.epochs=7")).changed == {}
