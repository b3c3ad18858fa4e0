"""``bench/compare_models.py``: per-user metrics, the paired bootstrap, and the entry point."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import compare_models as cm
from elcrec_dist.checkpoint import save_model
from elcrec_dist.config import load_config
from elcrec_dist.evaluation import metric_sums, naive_answer_rank
from elcrec_dist.model import ELCRec

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def test_per_user_values_average_to_the_reported_metrics() -> None:
    ranks = np.array([0, 1, 4, 5, 19, 20, 100, 3])
    names, values = cm.per_user_values(ranks, (5, 20))
    sums = metric_sums(torch.from_numpy(ranks), (5, 20))
    assert names == ["HR@5", "NDCG@5", "HR@20", "NDCG@20", "MRR"]
    for column, name in enumerate(names):
        assert values[:, column].sum() == pytest.approx(sums[name], rel=1e-12)
    # by hand: rank 4 is a hit at 5 with gain 1/log2(6); rank 5 is not
    assert values[2, 1] == pytest.approx(1 / math.log2(6)) and values[3, 1] == 0.0


def test_paired_bootstrap_equals_a_naive_loop() -> None:
    rng = random.Random(3)
    users, metrics, resamples = 37, 3, 25
    first = np.array([[rng.random() for _ in range(metrics)] for _ in range(users)])
    other = np.array([[rng.random() for _ in range(metrics)] for _ in range(users)])
    means_a, means_b = cm.paired_bootstrap(
        first, other, cm.resample_counts(users, resamples, seed=7)
    )
    assert means_a.shape == means_b.shape == (resamples, metrics)
    draws = np.random.default_rng(7)  # resample r = the r-th draw of `users` indices
    for r in range(resamples):
        row = draws.integers(0, users, users).tolist()
        for m in range(metrics):
            assert means_a[r, m] == pytest.approx(sum(first[u][m] for u in row) / users, rel=1e-12)
            assert means_b[r, m] == pytest.approx(sum(other[u][m] for u in row) / users, rel=1e-12)


def test_identical_models_differ_by_exactly_nothing() -> None:
    values = np.random.default_rng(0).random((50, 2)) + 0.1
    result = cm.compare(["a", "b"], values, values.copy(), resamples=40, seed=1)
    for entry in result.values():
        assert entry["relative"] == 0.0 and entry["relative_95"] == [0.0, 0.0]


def test_a_model_without_any_hit_has_no_ratio_instead_of_a_crash() -> None:
    # Small groups (--by-repeat) can leave the other model at 0 in every resample.
    entry = cm.compare(["HR@5"], np.array([[1.0], [0.0]]), np.zeros((2, 1)), resamples=10, seed=0)
    assert entry["HR@5"]["relative"] is None and entry["HR@5"]["relative_95"] is None
    band = entry["HR@5"]["first_95"]
    assert entry["HR@5"]["first"] == 0.5 and isinstance(band, list) and len(band) == 2


def test_against_published_equals_a_naive_loop() -> None:
    """Beside a published figure: the relative difference and its interval over the same
    resamples as a loop computes them; metrics the paper does not publish are left out."""
    rng = random.Random(4)
    users, resamples = 41, 30
    first = np.array([[rng.random(), rng.random()] for _ in range(users)])
    paper = {"HR@5": 0.4, "MRR": 0.55}
    result = cm.against_published(
        ["HR@5", "NDCG@5"], first, paper, resamples=resamples, seed=9
    )
    assert list(result) == ["HR@5"]
    entry = result["HR@5"]
    mean = sum(row[0] for row in first) / users
    assert entry["first"] == pytest.approx(mean, rel=1e-12) and entry["published"] == 0.4
    assert entry["relative"] == pytest.approx(mean / 0.4 - 1, rel=1e-12)
    draws = np.random.default_rng(9)
    ratios = sorted(
        sum(first[u][0] for u in draws.integers(0, users, users).tolist()) / users / 0.4 - 1
        for _ in range(resamples)
    )
    band = entry["relative_95"]
    assert isinstance(band, list)
    low, high = band
    assert low == pytest.approx(float(np.percentile(ratios, 2.5)), rel=1e-12)
    assert high == pytest.approx(float(np.percentile(ratios, 97.5)), rel=1e-12)
    assert ratios[0] <= low < high <= ratios[-1]


@pytest.mark.parametrize("text", ["ours", "=x.pt", "ours=", ""])
def test_bad_model_arguments_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="NAME=CHECKPOINT"):
        cm.parse_model_argument(text)


def _ranks_by_loop(model: ELCRec, sequences, split: str) -> list[int]:
    """The answer rank of each user, one user at a time through ``naive_answer_rank``."""
    cut = 2 if split == "valid" else 1
    ranks = []
    with torch.no_grad():
        for seq in sequences:
            history, answer = [int(x) for x in seq[:-cut]], int(seq[-cut])
            window = torch.zeros(1, model.config.max_len, dtype=torch.int64)
            tail = history[-model.config.max_len:]
            window[0, model.config.max_len - len(tail):] = torch.tensor(tail)
            scores = model.score_all(model(window)[:, -1])[0].tolist()
            ranks.append(naive_answer_rank(scores, answer, history))
    return ranks


def test_ranks_and_the_entry_point_on_two_saved_models(
    tmp_path: Path, small_synthetic: Path
) -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    from elcrec_dist.prepared import load_sequences

    info, _, sequences = load_sequences(str(small_synthetic))
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = ELCRec(config.model, num_items=info.num_items).eval()
        assert cm.user_ranks(
            model, sequences, split="test", batch_size=16
        ).tolist() == _ranks_by_loop(model, sequences, "test")
        paths.append(tmp_path / f"m{seed}.pt")
        save_model(
            paths[-1], state=model.state_dict(), config=config.to_dict(), meta={"seed": seed}
        )

    out = subprocess.run(
        [sys.executable, "-m", "bench.compare_models", "--config", "configs/demo.yaml",
         "--data", str(small_synthetic), "--model", f"one={paths[0]}", "--model", f"two={paths[1]}",
         "--split", "valid", "--resamples", "30", "--published", "beauty",
         "--shared", str(SHARED), "--by-repeat"],
        check=True, cwd=REPO, capture_output=True, text=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    evaluated = []
    for path in paths:
        res = subprocess.run([sys.executable, "launcher/evaluate.py",
                              "--config", "configs/demo.yaml",
                              "--data", str(small_synthetic), "--checkpoint", str(path),
                              "--split", "valid"],
                             check=True, cwd=REPO, capture_output=True, text=True)
        evaluated.append(json.loads(res.stdout.strip().splitlines()[-1]))
    for name, expected in zip(("one", "two"), evaluated, strict=True):
        for metric, value in expected.items():
            assert report["metrics"][name][metric] == pytest.approx(value, abs=1e-12)
    entry = report["comparisons"]["one vs two"]["NDCG@20"]
    assert entry["relative"] == pytest.approx(evaluated[0]["NDCG@20"] / evaluated[1]["NDCG@20"] - 1)
    low, high = entry["relative_95"]
    assert low <= high
    # --by-repeat: the groups are the users whose valid answer is in their history (counted by
    # a loop here) and the rest; their means, weighted by their users, give the overall means.
    repeats = sum(int(seq[-2]) in {int(x) for x in seq[:-2]} for seq in sequences)
    groups = report["by_repeat"]
    assert groups["repeat"]["users"] == repeats
    assert groups["new"]["users"] == len(sequences) - repeats
    for name in ("one", "two"):
        for metric, value in report["metrics"][name].items():
            recombined = sum(
                entry["users"] * entry["metrics"][name][metric]
                for entry in groups.values() if entry["users"]
            ) / len(sequences)
            assert recombined == pytest.approx(value, abs=1e-12)
    # Beside the spec's published Beauty row, read here from its markdown line.
    spec = (SHARED / "docs" / "elcrec-method.md").read_text()
    table = spec[spec.index("## Published numbers"):].splitlines()
    line = next(row for row in table if row.startswith("| Beauty |"))
    paper = dict(zip(("HR@5", "NDCG@5", "HR@20", "NDCG@20"),
                     (float(cell) for cell in line.strip("|").split("|")[1:]), strict=True))
    assert report["published"]["row"] == paper
    beside = report["published"]["one"]
    assert list(beside) == list(paper)
    for metric, value in paper.items():
        assert beside[metric]["relative"] == pytest.approx(
            evaluated[0][metric] / value - 1, rel=1e-9
        )


def test_repeat_answers_and_groups_by_hand() -> None:
    sequences = [np.array(s) for s in ([1, 2, 3, 2, 9], [4, 5, 6, 7, 8], [3, 1, 5, 1, 1])]
    # valid answers: 2 (in [1, 2, 3]), 7 (not in [4, 5, 6]), 1 (in [3, 1, 5]);
    # test answers: 9 (not in [1, 2, 3, 2]), 8 (not), 1 (in [3, 1, 5, 1])
    assert cm.repeat_answers(sequences, "valid").tolist() == [True, False, True]
    assert cm.repeat_answers(sequences, "test").tolist() == [False, False, True]
    names = ["HR@1", "MRR"]
    one = np.array([[1.0, 1.0], [0.0, 0.25], [0.0, 0.5]])
    two = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    groups = cm.by_repeat(names, {"one": one, "two": two}, np.array([True, False, True]), "one",
                          resamples=0, seed=0)
    assert list(groups) == ["repeat", "new"]
    assert groups["repeat"]["users"] == 2 and groups["new"]["users"] == 1
    assert groups["repeat"]["metrics"] == {"one": {"HR@1": 0.5, "MRR": 0.75},
                                           "two": {"HR@1": 1.0, "MRR": 1.0}}
    assert groups["new"]["metrics"]["one"] == {"HR@1": 0.0, "MRR": 0.25}
    pair = groups["repeat"]["comparisons"]["one vs two"]
    assert pair["HR@1"]["relative"] == pytest.approx(0.5 / 1.0 - 1)
    assert pair["MRR"]["relative"] == pytest.approx(0.75 / 1.0 - 1)
    # A group with no users has a count and nothing to average.
    empty = cm.by_repeat(names, {"one": one}, np.zeros(3, dtype=bool), "one", resamples=0, seed=0)
    assert empty["repeat"] == {"users": 0} and empty["new"]["users"] == 3


def test_a_single_model_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.compare_models", "--config", "configs/demo.yaml",
         "--data", str(tmp_path), "--model", "one=x.pt"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 2 and "at least two models" in out.stderr
    # One model beside a published row: a spec that is not there is named, before any model.
    out = subprocess.run(
        [sys.executable, "-m", "bench.compare_models", "--config", "configs/demo.yaml",
         "--data", str(tmp_path), "--model", "one=x.pt", "--published", "yelp",
         "--shared", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 2 and "spec not found" in out.stderr, out.stderr


def test_checkpoint_folders_are_model_sources_only_when_complete(tmp_path: Path) -> None:
    from elcrec_dist import checkpoint as ckpt

    config = load_config(REPO / "configs" / "demo.yaml")
    model = ELCRec(config.model, num_items=30)
    folder = tmp_path / "step-00000007"
    folder.mkdir()
    torch.save(
        {"module": {"model." + k: v for k, v in model.state_dict().items()}},
        folder / ckpt.MODEL_STATES,
    )
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_model_weights(folder)  # no manifest yet
    ckpt.commit(folder, state=ckpt.TrainState(), config={})
    weights = ckpt.load_model_weights(folder)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with open(folder / ckpt.MODEL_STATES, "ab") as handle:  # changed after the commit
        handle.write(b"x")
    with pytest.raises(ckpt.CheckpointError, match="its files changed"):
        ckpt.load_model_weights(folder)
