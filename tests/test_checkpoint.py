"""``elcrec_dist.checkpoint``: which config changes a resume accepts, checked key by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elcrec_dist import checkpoint as ckpt
from elcrec_dist.config import load_config


def _config(*overrides: str) -> dict:
    return load_config("configs/demo.yaml", ["data.path=data/x", *overrides]).to_dict()


def test_a_resume_may_change_only_where_how_long_and_how_often() -> None:
    stored = _config()
    allowed = _config("train.epochs=7", "train.patience=3", "train.run_dir=elsewhere", "data.path=moved",
                      "train.log_every=5", "train.checkpoint_every=9", "train.keep_checkpoints=4",
                      "train.deterministic=false", "eval.batch_size=64", "eval.ks=[1,20]", "kmeans.batch_size=8", "name=x")
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
def test_a_resume_may_not_change_what_the_run_computes(override: str, key: str, before, after) -> None:
    stored = _config()
    changes = ckpt.config_changes(stored, _config(override))
    expected_before = before if before is not None else ckpt._flatten(stored)[key]
    assert changes.changed == {key: (expected_before, after)}
    with pytest.raises(ckpt.CheckpointError, match=key.replace(".", r"\.")):
        ckpt.refuse_changed_config(Path("run/checkpoints/step-00000001"), changes)


def test_keys_an_older_checkpoint_lacks_are_reported_not_refused() -> None:
    current = _config("train.lr=0.01")
    stored = _config("train.lr=0.01")
    del stored["train"]["deterministic"], stored["loss"]["centre_gradient"]
    stored["train"]["retired_option"] = 1
    changes = ckpt.config_changes(stored, current)
    assert changes == ckpt.ConfigChanges({}, ["loss.centre_gradient", "train.deterministic"], ["train.retired_option"])
    ckpt.refuse_changed_config(Path("x"), changes)  # nothing to refuse


def test_newest_recorded_config_reads_the_newest_commit_record(tmp_path: Path) -> None:
    root = tmp_path / ckpt.CHECKPOINTS
    for step, lr in ((10, 0.1), (20, 0.2)):
        folder = root / ckpt.tag_of(step)
        folder.mkdir(parents=True)
        ckpt.commit(folder, state=ckpt.TrainState(), config={"train": {"lr": lr}})
    (root / ckpt.tag_of(30)).mkdir()  # a save that never committed
    found = ckpt.newest_recorded_config(tmp_path)
    assert found is not None and found[0].name == ckpt.tag_of(20) and found[1] == {"train": {"lr": 0.2}}
    assert ckpt.newest_recorded_config(tmp_path / "nothing") is None
