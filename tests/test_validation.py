"""Validation that scales (elcrec_dist.trainer.validation, elcrec_dist.sampled_metrics).

- ``eval.valid_users``: validation ranks exactly a seeded sample of that many users, the same
  at any world size, and equals the dense reference ranking of those users; test ranks everyone;
- sampled-negative metrics: negatives are distinct, unseen, a function of (seed, split, user)
  only, uniform or popularity-shaped as asked; ranks equal a naive loop; the metrics are named
  ``sampled_...`` and leave the full-ranking ones unchanged.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PreparedSets
from launch import deepspeed_command, deepspeed_env

from data_prep.synthetic import SyntheticSpec
from elcrec_dist.config import ConfigError, ExperimentConfig, load_config
from elcrec_dist.evaluation import HistoryItems, evaluate_sums, finalize
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.sampled_metrics import NegativeSampler, sampled_ranks
from elcrec_dist.stream import StreamingDataset
from elcrec_dist.trainer.validation import evaluate_sharded, user_chunks, valid_sample_seed

DEVICE = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(users=900, items=300, intents=4, seed=3)


@pytest.fixture(scope="module")
def dataset(prepared_sets: PreparedSets) -> Path:
    return prepared_sets(SPEC)


def _model(config: ExperimentConfig, num_items: int) -> ELCRec:
    torch.manual_seed(5)
    return ELCRec(config.model, num_items=num_items).eval()


def _config(*overrides: str) -> ExperimentConfig:
    return load_config(None, ["model.num_clusters=4", "eval.batch_size=128", *overrides])


def test_valid_users_is_a_fixed_sample_ranked_like_the_reference(dataset: Path) -> None:
    data = StreamingDataset.open(str(dataset))
    config = _config("eval.valid_users=250")
    chunks = list(user_chunks(data, config, split="valid"))
    ids = np.concatenate([c.user_ids for c in chunks])
    assert len(ids) == 250 and len(set(ids.tolist())) == 250
    # the same users on 2 ranks (each its part) and at the next epoch; another seed, others
    parts = [data.sample_sequences(rank=r, world=2, count=250, seed=valid_sample_seed(1))
             for r in range(2)]
    assert sorted(np.concatenate([p.user_ids for p in parts]).tolist()) == sorted(ids.tolist())
    again = np.concatenate([c.user_ids for c in user_chunks(data, config, split="valid")])
    assert np.array_equal(again, ids)
    other = np.concatenate([c.user_ids for c in user_chunks(data, _config(
        "eval.valid_users=250", "train.seed=2"), split="valid")])
    assert set(other.tolist()) != set(ids.tolist())
    # the metrics are the dense reference's over exactly those users (read independently)
    _, all_ids, sequences = load_sequences(str(dataset))
    by_id = dict(zip(all_ids.tolist(), sequences, strict=True))
    model = _model(config, data.info.num_items)
    chosen = [by_id[u] for u in ids.tolist()]
    sums, n = evaluate_sums(model, chosen, split="valid", ks=config.eval.ks, tile_items=None)
    got = evaluate_sharded(model, data, config, split="valid", device=DEVICE)
    assert got == pytest.approx(finalize(sums, n), abs=1e-12)
    # the test pass ranks every user whatever the sample
    test = evaluate_sharded(model, data, config, split="test", device=DEVICE)
    sums, n = evaluate_sums(model, sequences, split="test", ks=config.eval.ks, tile_items=None)
    assert n == SPEC.users and test == pytest.approx(finalize(sums, n), abs=1e-12)


def test_valid_users_at_least_the_dataset_is_everyone(dataset: Path) -> None:
    data = StreamingDataset.open(str(dataset))
    ids = np.concatenate([c.user_ids for c in user_chunks(data, _config("eval.valid_users=5000"),
                                                          split="valid")])
    assert len(ids) == SPEC.users


def test_valid_users_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"eval\.valid_users must be >= 1"):
        _config("eval.valid_users=0")
    with pytest.raises(ConfigError, match=r"eval\.sampled_distribution"):
        _config("eval.sampled_distribution=zipf")


def _histories(n: int, num_items: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    seqs = [rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(4, 30)), replace=False)
            for _ in range(n)]
    return np.arange(100, 100 + n, dtype=np.int64), seqs


def test_negatives_are_distinct_unseen_and_fixed_per_user() -> None:
    ids, seqs = _histories(200, 150, seed=0)
    sampler = NegativeSampler(num_items=150, negatives=100, distribution="uniform", seed=1)
    drawn = sampler.draw(ids, seqs, "valid")
    assert drawn.shape == (200, 100)
    for row, seq in zip(drawn, seqs, strict=True):
        assert len(set(row.tolist())) == 100  # distinct
        assert not set(row.tolist()) & set(seq.tolist())  # never an item the user had
        assert row.min() >= 1 and row.max() <= 150
    # a user's negatives do not depend on who else is in the batch, nor on the batch order
    alone = sampler.draw(ids[7:8], seqs[7:8], "valid")
    assert np.array_equal(alone[0], drawn[7])
    assert np.array_equal(sampler.draw(ids[::-1], seqs[::-1], "valid")[::-1], drawn)
    # another split or seed draws other negatives
    assert not np.array_equal(sampler.draw(ids, seqs, "test"), drawn)
    reseeded = NegativeSampler(num_items=150, negatives=100, distribution="uniform", seed=2)
    assert not np.array_equal(reseeded.draw(ids, seqs, "valid"), drawn)


def test_negatives_follow_the_distribution() -> None:
    n_items, users = 50, 4000
    ids = np.arange(users, dtype=np.int64)
    empty = [np.zeros(0, dtype=np.int64)] * users  # nothing seen: the draws show the distribution
    uniform = NegativeSampler(num_items=n_items, negatives=1, distribution="uniform", seed=0)
    counts = np.bincount(uniform.draw(ids, empty, "valid").ravel(), minlength=n_items + 1)[1:]
    expected = users / n_items  # 80 per item
    assert ((counts - expected) ** 2 / expected).sum() < 100  # chi-square, 49 dof: p ~ 1e-4
    weights = np.zeros(n_items + 1)
    weights[1:11] = np.arange(1, 11)  # items 1..10 weighted 1..10, the rest never drawn
    popular = NegativeSampler(num_items=n_items, negatives=1, distribution="popularity", seed=0,
                              weights=weights)
    drawn = popular.draw(ids, empty, "valid").ravel()
    assert drawn.max() <= 10
    share = np.bincount(drawn, minlength=11)[1:] / users
    assert np.abs(share - np.arange(1, 11) / 55).max() < 0.02


def test_impossible_draw_names_the_user() -> None:
    sampler = NegativeSampler(num_items=10, negatives=5, distribution="uniform", seed=0)
    with pytest.raises(ValueError, match="user 42"):
        sampler.draw(np.array([42]), [np.arange(1, 8)], "valid")  # 3 unseen items for 5 draws


def test_sampled_ranks_equal_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(-3, 4, (40, 8), generator=gen).float()  # integers: exact, ties happen
    users = torch.randint(-3, 4, (30, 8), generator=gen).float()
    answers = torch.randint(1, 40, (30,), generator=gen)
    negatives = torch.randint(1, 40, (30, 12), generator=gen)
    got = sampled_ranks(users, table, answers, negatives)
    for b in range(30):
        target = float(users[b] @ table[answers[b]])
        naive = sum(float(users[b] @ table[int(j)]) >= target for j in negatives[b])
        assert int(got[b]) == naive


def test_sampled_metrics_are_labelled_and_leave_full_ranking_alone(dataset: Path) -> None:
    data = StreamingDataset.open(str(dataset))
    plain = _config()
    model = _model(plain, data.info.num_items)
    full = evaluate_sharded(model, data, plain, split="valid", device=DEVICE)
    for distribution, short in (("uniform", "uni"), ("popularity", "pop")):
        config = _config("eval.sampled_negatives=100", f"eval.sampled_distribution={distribution}")
        got = evaluate_sharded(model, data, config, split="valid", device=DEVICE)
        sampled = {k: v for k, v in got.items() if k.startswith(f"sampled_{short}100/")}
        assert set(got) == set(full) | set(sampled) and len(sampled) == len(full)
        assert {k: got[k] for k in full} == full
        # 100 negatives instead of 300 items: the answer ranks higher than in the full ranking
        assert sampled[f"sampled_{short}100/HR@10"] >= full["HR@10"]
    # popularity: negatives follow the training inputs' counts (here: by a naive recount)
    _, ids, seqs = load_sequences(str(dataset))
    counts = np.zeros(data.info.num_items + 1)
    for seq in seqs:
        for item in seq[:-3]:
            counts[item] += 1
    sampler = NegativeSampler(num_items=data.info.num_items, negatives=100,
                              distribution="popularity", seed=1, weights=counts)
    drawn = sampler.draw(ids[:5], seqs[:5], "valid")
    assert all(counts[drawn[r]].min() > 0 for r in range(5))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_validate_the_same_sample_with_the_same_metrics(dataset: Path,
                                                                  tmp_path: Path) -> None:
    """The sample, the full ranking and the sampled metrics do not depend on the world size:
    2 ranks (each its part of the sample, sums added over ranks) give the one-process numbers."""
    overrides = ["model.num_clusters=4", "eval.batch_size=128", "eval.valid_users=250",
                 "eval.sampled_negatives=50", "eval.sampled_distribution=popularity"]
    worker = REPO / "tests" / "workers" / "valid_ranks.py"
    cmd, _ = deepspeed_command(worker, "--data", str(dataset), "--out", str(tmp_path), ranks=2)
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=deepspeed_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "metrics.json").read_text())
    config = load_config(None, overrides)
    one = evaluate_sharded(_model(config, SPEC.items), StreamingDataset.open(str(dataset)),
                           config, split="valid", device=DEVICE)
    assert set(two) == set(one) and any(k.startswith("sampled_pop50/") for k in one)
    assert two == pytest.approx(one, abs=1e-12)


def test_validation_and_test_rank_by_the_configs_history_rule(dataset: Path) -> None:
    """``eval.history_items`` reaches the sharded pass the trainer runs: each rule equals the
    dense reference under that rule, and the two differ on data where answers repeat history
    items (the synthetic users revisit items, as Yelp's do)."""
    data = StreamingDataset.open(str(dataset))
    _, _, sequences = load_sequences(str(dataset))
    repeats = sum(int(seq[-1] in set(seq[:-1].tolist())) for seq in sequences)
    assert repeats > 20  # the premise: answers that repeat a history item
    got = {}
    for rule in ("exclude", "score_zero"):
        config = _config(f"eval.history_items={rule}")
        model = _model(config, data.info.num_items)
        got[rule] = evaluate_sharded(model, data, config, split="test", device=DEVICE)
        sums, n = evaluate_sums(model, sequences, split="test", ks=config.eval.ks,
                                tile_items=None, history_items=config.eval.history_items)
        assert got[rule] == pytest.approx(finalize(sums, n), abs=1e-12)
    assert got["exclude"]["HR@20"] != got["score_zero"]["HR@20"]


@pytest.mark.parametrize("rule", ["exclude", "score_zero"])
def test_the_popularity_baseline_ranks_by_the_same_history_rule(rule: HistoryItems) -> None:
    """``popularity_sums`` against a naive loop over the training counts, under each rule."""
    from elcrec_dist.diagnostics import item_counts, popularity_ranking, popularity_sums
    from elcrec_dist.evaluation import metric_sums, naive_answer_rank

    rng = np.random.default_rng(4)
    seqs = [rng.integers(1, 16, size=int(rng.integers(4, 12))) for _ in range(60)]
    counts = item_counts(seqs, num_items=15)
    got = popularity_sums(seqs, popularity_ranking(counts), split="test", ks=(1, 5),
                          history_items=rule)
    ranks = [naive_answer_rank(counts.tolist(), int(s[-1]), s[:-1].tolist(), rule) for s in seqs]
    assert got == pytest.approx(metric_sums(torch.tensor(ranks), (1, 5)), abs=1e-12)
