"""Unit tests of the training loop's pieces: batches, negatives, epochs, the engine step."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_prepared

from elcrec_dist.batching import make_train_batch, sample_negatives
from elcrec_dist.config import ConfigError, ExperimentConfig, load_config
from elcrec_dist.losses import elcrec_terms, weighted_total
from elcrec_dist.model import ELCRec
from elcrec_dist.stream import StreamingDataset
from elcrec_dist.trainer.engine import deepspeed_config, step_seed
from elcrec_dist.trainer.intents import centre_stats, init_centres


def test_train_batch_inputs_and_targets_by_hand() -> None:
    cfg = load_config(None, ["model.max_len=4"])
    seqs = [np.array([5, 6, 7, 8, 9, 10]), np.array([1, 2, 3, 4])]
    batch = make_train_batch(
        seqs,
        num_items=10,
        max_len=4,
        augment=cfg.augment,
        generator=torch.Generator().manual_seed(0),
    )
    # user 0: input seq[:-3] = [5, 6, 7], targets seq[1:-2] = [6, 7, 8]; left-padded to 4
    # user 1: input [1], target [2]
    assert batch.inputs.tolist() == [[0, 5, 6, 7], [0, 0, 0, 1]]
    assert batch.targets.tolist() == [[0, 6, 7, 8], [0, 0, 0, 2]]
    assert batch.views.shape == (4, 4)
    assert (batch.negatives == 0).tolist() == (batch.targets == 0).tolist()


def test_negatives_avoid_the_whole_sequence() -> None:
    gen = torch.Generator().manual_seed(3)
    # a user who has seen items 1..8 of 10: negatives can only be 9 or 10
    seqs = [np.arange(1, 9), np.array([2, 3, 4, 5])]
    targets = torch.tensor([[0, 2, 3, 4], [0, 0, 3, 4]])
    counts = np.zeros(11)
    for _ in range(200):
        neg = sample_negatives(targets, seqs, 10, gen)
        assert set(neg[0, 1:].tolist()) <= {9, 10}
        assert not set(neg[1, 2:].tolist()) & {2, 3, 4, 5}
        assert neg[0, 0] == 0 and neg[1, :2].tolist() == [0, 0]
        np.add.at(counts, neg[1, 2:].numpy(), 1)
    # user 1 draws uniformly from the 6 unseen items {1, 6, 7, 8, 9, 10}: 400 draws, ~66 each
    unseen = counts[[1, 6, 7, 8, 9, 10]]
    assert counts[[2, 3, 4, 5]].sum() == 0
    assert unseen.min() > 35 and unseen.max() < 100


def test_negatives_equal_a_naive_membership_loop() -> None:
    """The same draws as a loop that checks each draw against a Python set of the user's items:
    rows of different lengths, repeated items, padding positions, several resampling rounds."""
    num_items = 30
    rng = np.random.default_rng(7)
    seqs = [rng.integers(1, num_items + 1, size=int(rng.integers(4, 26))) for _ in range(40)]
    targets = torch.from_numpy(rng.integers(0, num_items + 1, size=(40, 12)))

    def naive(generator: torch.Generator) -> torch.Tensor:
        negatives = torch.randint(1, num_items + 1, targets.shape, generator=generator)
        for _ in range(100):
            clash = torch.tensor([
                [bool(targets[r, c] > 0) and int(negatives[r, c]) in set(seqs[r].tolist())
                 for c in range(targets.shape[1])]
                for r in range(targets.shape[0])
            ])
            if not clash.any():
                break
            fresh = torch.randint(1, num_items + 1, targets.shape, generator=generator)
            negatives = torch.where(clash, fresh, negatives)
        return torch.where(targets > 0, negatives, torch.zeros_like(negatives))

    for seed in range(5):
        got = sample_negatives(targets, seqs, num_items, torch.Generator().manual_seed(seed))
        assert torch.equal(got, naive(torch.Generator().manual_seed(seed)))


def test_deepspeed_config_carries_the_batch_triplet_and_refuses_uneven_splits() -> None:
    cfg = load_config(None, ["train.batch_size=256", "deepspeed.zero_stage=1"])
    ds = deepspeed_config(cfg, 2)
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (256, 128, 1)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ValueError, match="divisible"):
        deepspeed_config(cfg, 3)


def _tiny_config(extra: Sequence[str] = ()) -> ExperimentConfig:
    return load_config(None, [
        "model.hidden_size=8", "model.num_heads=2", "model.max_len=6", "model.num_clusters=3",
        "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "train.batch_size=4",
        "kmeans.sample_users=8", "kmeans.restarts=2", "kmeans.iterations=5", *extra,
    ])


def _tiny_data(n: int = 8, items: int = 20, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.choice(np.arange(1, items + 1), size=rng.integers(4, 10), replace=False)
        for _ in range(n)
    ]


def _stream(tmp_path: Path, seqs: list[np.ndarray], items: int = 20) -> StreamingDataset:
    """``seqs`` (user ids 1..U) written as a one-file prepared dataset and opened for streaming."""
    folder = write_prepared(tmp_path / "data", seqs, num_items=items, shards=1)
    return StreamingDataset.open(str(folder))


def test_init_centres_are_unit_normalised_kmeans_centres_of_the_sample(tmp_path: Path) -> None:
    cfg = _tiny_config()
    seqs = _tiny_data()
    torch.manual_seed(0)
    model = ELCRec(cfg.model, num_items=20)
    init_centres(model, _stream(tmp_path, seqs), cfg)  # sample_users=8: every user
    centres = model.cluster_centers.detach()
    assert torch.allclose(centres.norm(dim=1), torch.ones(3), atol=1e-6)
    # Independently: every centre is the normalised mean of the normalised embeddings nearest to it
    from elcrec_dist.embed import pooled_embeddings

    emb = F.normalize(pooled_embeddings(model, seqs, batch_size=3), dim=-1)
    nearest = ((emb[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    for j in range(3):
        members = emb[nearest == j]
        if len(members):
            assert torch.allclose(F.normalize(members.mean(0), dim=0), centres[j], atol=1e-4)


def test_engine_step_equals_plain_adam_then_projection() -> None:
    """One DeepSpeed step (world of one) == torch Adam on the same loss, then centres normalised."""
    from elcrec_dist import distributed as dist_utils
    from elcrec_dist.trainer.engine import GRAD_NORM, build_engine, train_step

    dist_utils.init()
    cfg = _tiny_config()
    seqs = _tiny_data(4)
    torch.manual_seed(0)
    model = ELCRec(cfg.model, num_items=20)
    reference = copy.deepcopy(model)
    batch = make_train_batch(
        seqs,
        num_items=20,
        max_len=6,
        augment=cfg.augment,
        generator=torch.Generator().manual_seed(1),
    )

    engine = build_engine(model, cfg)
    logged = train_step(engine, batch, cfg)

    opt = torch.optim.Adam(reference.parameters(), lr=cfg.train.lr, betas=cfg.train.betas, eps=1e-8)
    terms = elcrec_terms(reference, batch, cfg.loss)
    loss = weighted_total(terms, cfg.loss)
    loss.backward()
    opt.step()
    with torch.no_grad():
        reference.cluster_centers.copy_(F.normalize(reference.cluster_centers, dim=-1))

    assert logged["loss/total"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert set(logged) == {
        "loss/next_item",
        "loss/cluster",
        "loss/seq_cl",
        "loss/intent_cl",
        "loss/total",
        GRAD_NORM,
    }
    # the gradient norm before the update: by hand over the reference's gradients
    squares = sum(
        float(p.grad.double().square().sum()) for p in reference.parameters() if p.grad is not None
    )
    assert logged[GRAD_NORM] == pytest.approx(squares**0.5, rel=1e-5)
    for (name, ours), theirs in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.allclose(ours, theirs, atol=1e-6), name
    assert torch.allclose(model.cluster_centers.norm(dim=1), torch.ones(3), atol=1e-6)


def test_zero_bucket_sizes_reach_the_engine_and_leave_the_step_unchanged() -> None:
    """deepspeed.reduce/allgather_bucket_size and overlap_comm are passed to ZeRO; buckets of a few
    elements (every parameter split over many collectives) give the step of the default buckets."""
    from elcrec_dist import distributed as dist_utils
    from elcrec_dist.trainer.engine import build_engine, train_step

    dist_utils.init()
    seqs = _tiny_data(4)
    states = []
    for extra in (
        [],
        [
            "deepspeed.reduce_bucket_size=7",
            "deepspeed.allgather_bucket_size=10",
            "deepspeed.overlap_comm=true",
        ],
    ):
        cfg = _tiny_config(["deepspeed.zero_stage=1", *extra])
        ds = deepspeed_config(cfg, 1)["zero_optimization"]
        torch.manual_seed(0)
        model = ELCRec(cfg.model, num_items=20)
        batch = make_train_batch(
            seqs,
            num_items=20,
            max_len=6,
            augment=cfg.augment,
            generator=torch.Generator().manual_seed(1),
        )
        engine = build_engine(model, cfg)
        assert (
            engine.zero_reduce_bucket_size(),
            engine.zero_allgather_bucket_size(),
            engine.zero_overlap_comm(),
        ) == (ds["reduce_bucket_size"], ds["allgather_bucket_size"], ds["overlap_comm"])
        for _ in range(2):
            train_step(engine, batch, cfg)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert (
        ds["reduce_bucket_size"] == 7
        and ds["allgather_bucket_size"] == 10
        and ds["overlap_comm"] is True
    )
    for name, value in states[0].items():
        assert torch.allclose(value, states[1][name], atol=1e-7), name
    with pytest.raises(ConfigError, match="reduce_bucket_size"):
        load_config(None, ["deepspeed.reduce_bucket_size=0"])
    with pytest.raises(
        ConfigError, match="allgather_bucket_size must be a positive even number, got 11"
    ):
        load_config(None, ["deepspeed.allgather_bucket_size=11"])


def test_step_seed_depends_on_seed_rank_and_step_only() -> None:
    assert step_seed(1, 0, 5) == step_seed(1, 0, 5)
    assert (
        len({step_seed(1, 0, 5), step_seed(2, 0, 5), step_seed(1, 1, 5), step_seed(1, 0, 6)}) == 4
    )
    assert 0 <= step_seed(1, 0, 5) < 2**63


def test_centre_stats_by_hand() -> None:
    # two orthogonal unit centres and their opposite-free copy: cos(0,1) = 0, cos(0,2) = 1,
    # cos(1,2) = 0
    centres = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    stats = centre_stats(centres, torch.tensor([5.0, 0.0, 1.0]))
    assert stats["centres/mean_pairwise_cosine"] == pytest.approx((0 + 1 + 0) * 2 / 6)
    # normalised: (1,0), (0,1), (1,0) -> mean (2/3, 1/3), norm sqrt(5)/3
    assert stats["centres/norm_of_mean"] == pytest.approx(5**0.5 / 3)
    assert stats["centres/dead_fraction"] == pytest.approx(1 / 3)
    assert stats["centres/largest_share"] == pytest.approx(5 / 6)
    assert centre_stats(centres, torch.zeros(3))["centres/largest_share"] == 0.0
    # rows (1,0), (0,1), (1,0): CᵀC = diag(2, 1), shares 2/3 and 1/3
    assert stats["centres/effective_rank"] == pytest.approx(
        math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    )
    assert stats["centres/opposed_pair_fraction"] == 0.0


def test_centre_stats_see_centres_folded_onto_two_opposite_groups() -> None:
    # (1,0), (-1,0), (0,1) by hand: CᵀC = diag(2, 1); the pair (0, 1) is opposed (2 of 6 ordered
    # pairs)
    folded = centre_stats(torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0]]), torch.ones(3))
    assert folded["centres/effective_rank"] == pytest.approx(
        math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    )
    assert folded["centres/opposed_pair_fraction"] == pytest.approx(2 / 6)
    # 3 of 4 centres on +e1, one on -e1: a healthy-looking mean cosine (0), effective rank 1
    line = centre_stats(
        torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]), torch.ones(4)
    )
    assert line["centres/mean_pairwise_cosine"] == pytest.approx((6 * 1 - 6 * 1) / 12)
    assert line["centres/effective_rank"] == pytest.approx(1.0)
    assert line["centres/opposed_pair_fraction"] == pytest.approx(6 / 12)
    # an orthonormal set: every direction equally used
    assert centre_stats(torch.eye(4), torch.ones(4))["centres/effective_rank"] == pytest.approx(4.0)


def test_deterministic_kernels_make_a_training_step_repeatable_at_two_threads() -> None:
    """``train.deterministic``: the same step gives bitwise the same gradients every time with two
    intra-op threads. Without deterministic kernels the item-embedding and centre gradients
    (backward of gathered rows) differ in the last bits from one repeat to the next at this size."""
    from elcrec_dist.batching import TrainBatch
    from elcrec_dist.config import LossConfig, ModelConfig
    from elcrec_dist.trainer.engine import use_deterministic_kernels

    def gradients() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = ELCRec(
            ModelConfig(num_layers=1, hidden_size=64, num_heads=2, max_len=50, num_clusters=16),
            num_items=600,
        )
        g = torch.Generator().manual_seed(1)
        batch = TrainBatch(
            torch.randint(0, 601, (128, 50), generator=g),
            torch.randint(1, 601, (128, 50), generator=g),
            torch.randint(1, 601, (128, 50), generator=g),
            torch.randint(0, 601, (256, 50), generator=g),
        )
        torch.manual_seed(5)  # dropout
        loss_config = LossConfig(fusion="shift")
        weighted_total(elcrec_terms(model, batch, loss_config), loss_config).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        use_deterministic_kernels(torch.device("cpu"), True)
        assert torch.are_deterministic_algorithms_enabled()
        first = gradients()
        assert {"item_embeddings.weight", "cluster_centers"} <= set(first)
        for _ in range(6):
            again = gradients()
            assert [n for n in first if not torch.equal(first[n], again[n])] == []
    finally:
        use_deterministic_kernels(torch.device("cpu"), False)
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()
