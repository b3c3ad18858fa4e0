"""bench.gpu_epochs run on the CPU (``--device cpu``): the machinery a GPU session will run once.

The GPU figures themselves need a GPU; this checks that every worker trains and validates for
real, that runs started at once do not disturb each other (same seed, same config: the same
validation curve, bit for bit) and that the summary's arithmetic is the workers' figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu_epochs

TINY = ["model.hidden_size=8", "model.num_heads=2", "model.max_len=6", "model.num_clusters=4",
        "train.batch_size=16", "kmeans.sample_users=60", "kmeans.restarts=1", "kmeans.iterations=3"]


@pytest.mark.slow
def test_workers_alone_and_at_once_train_the_same_model(
    small_synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--config", "configs/demo.yaml", "--data", str(small_synthetic), "--epochs", "2",
            "--modes", "eager", "--concurrent", "2", "--device", "cpu", "--out", str(tmp_path)]
    for override in TINY:
        args += ["--set", override]
    assert gpu_epochs.main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    workers = [line for line in lines if "mode" in line]
    summaries = {line["summary"]: line for line in lines if "summary" in line}
    assert [w["group"] for w in workers] == ["eager x1", "eager x2", "eager x2"]
    assert set(summaries) == {"eager", "eager x2 at once"}
    for w in workers:
        assert len(w["train_epoch_s"]) == len(w["batch_build_s"]) == len(w["valid_ndcg20"]) == 2
        assert all(s > 0 for s in w["train_epoch_s"] + w["eval_s"])
        assert 0 < w["valid_ndcg20"][-1] <= 1
        assert w["device"] == "cpu" and w["gpu_util_pct"] is None
    # deterministic kernels and per-step seeds: each run is the same run, alone or not
    assert workers[0]["valid_ndcg20"] == workers[1]["valid_ndcg20"] == workers[2]["valid_ndcg20"]
    group = summaries["eager x2 at once"]
    second_epochs = [w["train_epoch_s"][1] for w in workers[1:]]
    assert group["train_epoch_s_after_first"] == [round(s, 3) for s in second_epochs]
    want = sum(60 / s for s in second_epochs)
    assert group["epochs_per_min_all_runs"] == pytest.approx(want, abs=0.06)


def test_a_mean_after_the_first_epoch() -> None:
    assert gpu_epochs.after_first([9.0, 1.0, 2.0]) == 1.5
    assert gpu_epochs.after_first([4.0]) == 4.0


def test_bad_counts_are_refused() -> None:
    assert gpu_epochs.main(["--config", "c", "--data", "d", "--epochs", "0"]) == 2
    assert gpu_epochs.main(["--config", "c", "--data", "d", "--concurrent", "-1"]) == 2
