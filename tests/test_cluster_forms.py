"""The alternative cluster losses (issue 6, "beyond the paper") against naive loops, their
sharded form, and the property that sets them apart from the published loss."""

from __future__ import annotations

import math

import pytest
import torch
from test_losses import naive_nearest, naive_nt_xent, randn, rotation_fixing, sq_dist, unit

from elcrec_dist.batching import TrainBatch
from elcrec_dist.config import ConfigError, LossConfig, ModelConfig, config_from_dict
from elcrec_dist.distributed import BatchShard
from elcrec_dist.losses import (
    assigned_uniform_cluster_loss,
    balanced_assignment,
    balanced_uniform_cluster_loss,
    cluster_loss,
    elcrec_terms,
    fuse_intents,
    seq_cl_loss,
)
from elcrec_dist.model import ELCRec


def naive_uniformity(centres: torch.Tensor) -> float:
    cs = [unit(c) for c in centres]
    k = len(cs)
    total = sum(
        math.exp(-2.0 * sq_dist(cs[i], cs[j])) for i in range(k) for j in range(k) if i != j
    )
    return math.log(total / (k * (k - 1)))


def naive_assigned_uniform(user_emb: torch.Tensor, centres: torch.Tensor) -> float:
    cs = [unit(c) for c in centres]
    pull = 0.0
    for u in user_emb:
        h = unit(u)
        pull += min(sq_dist(h, c) for c in cs)  # the nearest centre's squared distance
    return pull / len(user_emb) + naive_uniformity(centres)


def naive_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> list[list[float]]:
    """SwAV's Sinkhorn-Knopp written out with lists: rows = users, columns = centres."""
    b, k = scores.shape
    top = max(float(x) for x in scores.flatten())
    q = [[math.exp((float(scores[i, j]) - top) / epsilon) for j in range(k)] for i in range(b)]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for j in range(k):  # every centre's mass 1/k
            col = sum(q[i][j] for i in range(b))
            for i in range(b):
                q[i][j] /= col * k
        for i in range(b):  # every user's mass 1/B
            row = sum(q[i])
            q[i] = [x / (row * b) for x in q[i]]
    return [[x * b for x in row] for row in q]


def naive_balanced_uniform(user_emb: torch.Tensor, centres: torch.Tensor) -> float:
    hs, cs = [unit(u) for u in user_emb], [unit(c) for c in centres]
    scores = torch.tensor([[float(h @ c) for c in cs] for h in hs], dtype=torch.float64)
    q = naive_sinkhorn(scores, 0.05, 3)
    pull = sum(q[i][j] * sq_dist(h, c) for i, h in enumerate(hs) for j, c in enumerate(cs))
    return pull / len(hs) + naive_uniformity(centres)


def naive_pull_and_uniformity(
    user_emb: torch.Tensor, centres: torch.Tensor, q: list[list[float]]
) -> float:
    """Both alternatives with the assignment q [B][k] given and the centres used as they are (no
    normalisation): at unit rows, the function whose gradient the reference form passes on."""
    hs, cs = [unit(u) for u in user_emb], list(centres)
    pull = sum(q[i][j] * sq_dist(h, c) for i, h in enumerate(hs) for j, c in enumerate(cs))
    k = len(cs)
    total = sum(
        math.exp(-2.0 * sq_dist(cs[i], cs[j])) for i in range(k) for j in range(k) if i != j
    )
    return pull / len(hs) + math.log(total / (k * (k - 1)))


def naive_assignment(form: str, user_emb: torch.Tensor, centres: torch.Tensor) -> list[list[float]]:
    hs, cs = [unit(u) for u in user_emb], [unit(c) for c in centres]
    if form == "balanced_uniform":
        scores = torch.tensor([[float(h @ c) for c in cs] for h in hs], dtype=torch.float64)
        return naive_sinkhorn(scores, 0.05, 3)
    nearest = naive_nearest(hs, cs)
    return [[1.0 if j == a else 0.0 for j in range(len(cs))] for a in nearest]


def simulated_shards(x: torch.Tensor, c: torch.Tensor, loss, world: int) -> torch.Tensor:
    """Sum of every simulated rank's contribution. Each rank's ``gather`` returns what every rank
    would pass, with its own rows live: the one tensor these losses gather is the batch's
    L2-normalised embeddings (balanced_uniform's assignment)."""
    parts = list(x.chunk(world))
    total = torch.zeros((), dtype=x.dtype)
    offset = 0
    for r, mine in enumerate(parts):
        def gather(t: torch.Tensor, r: int = r) -> torch.Tensor:
            return torch.cat(
                [
                    t if i == r else torch.nn.functional.normalize(p, dim=-1).detach()
                    for i, p in enumerate(parts)
                ]
            )

        shard = BatchShard(world=world, offset=offset, global_rows=x.shape[0], gather=gather)
        total = total + loss(mine, c, shard=shard)
        offset += mine.shape[0]
    return total


def test_assigned_uniform_matches_loop() -> None:
    user_emb, centres = randn(9, 5, seed=1), randn(4, 5, seed=2)
    got = assigned_uniform_cluster_loss(user_emb, centres)
    assert got.item() == pytest.approx(naive_assigned_uniform(user_emb, centres), rel=1e-12)


def test_balanced_assignment_matches_loop_and_balances() -> None:
    scores = (
        torch.nn.functional.normalize(randn(12, 5, seed=3), dim=-1)
        @ torch.nn.functional.normalize(randn(4, 5, seed=4), dim=-1).T
    )
    got = balanced_assignment(scores, epsilon=0.05, iterations=3)
    want = torch.tensor(naive_sinkhorn(scores, 0.05, 3), dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # rows: exact
    assert torch.allclose(got.sum(1), torch.ones(12, dtype=torch.float64), atol=1e-12)
    many = balanced_assignment(scores, epsilon=0.05, iterations=500)
    # equal shares
    assert torch.allclose(many.sum(0), torch.full((4,), 12 / 4, dtype=torch.float64), atol=1e-6)
    hard = scores.argmax(1)
    assert torch.bincount(hard, minlength=4).max() > 3  # the plain nearest assignment is unbalanced


def test_balanced_uniform_matches_loop() -> None:
    user_emb, centres = randn(10, 5, seed=5), randn(4, 5, seed=6)
    got = balanced_uniform_cluster_loss(user_emb, centres)
    assert got.item() == pytest.approx(naive_balanced_uniform(user_emb, centres), rel=1e-9)


@pytest.mark.parametrize("loss", [assigned_uniform_cluster_loss, balanced_uniform_cluster_loss])
def test_rank_contributions_sum_to_the_global_loss_and_gradient(loss) -> None:
    user_emb, centres = randn(12, 5, seed=7), randn(4, 5, seed=8)
    x1, c1 = user_emb.clone().requires_grad_(), centres.clone().requires_grad_()
    whole = loss(x1, c1)
    whole.backward()
    x2, c2 = user_emb.clone().requires_grad_(), centres.clone().requires_grad_()
    split = simulated_shards(x2, c2, loss, world=3)
    split.backward()
    assert split.item() == pytest.approx(whole.item(), rel=1e-12)
    assert x1.grad is not None and x2.grad is not None
    assert c1.grad is not None and c2.grad is not None
    assert torch.allclose(x2.grad, x1.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(c2.grad, c1.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", [assigned_uniform_cluster_loss, balanced_uniform_cluster_loss])
def test_alternatives_see_individual_centres_where_the_published_loss_sees_their_mean(loss) -> None:
    """Rotating the centres about their mean leaves the published loss unchanged (the spec's
    derivation) but changes the alternatives, and their gradient differs between centres."""
    user_emb = torch.nn.functional.normalize(randn(8, 6, seed=9), dim=-1)
    centres = torch.nn.functional.normalize(randn(5, 6, seed=10), dim=-1)
    rotated = centres @ rotation_fixing(centres.mean(0), angle=1.1, seed=11).T
    assert cluster_loss(user_emb, rotated, pairs="all").item() == pytest.approx(
        cluster_loss(user_emb, centres, pairs="all").item(), abs=1e-12
    )
    assert abs(loss(user_emb, rotated).item() - loss(user_emb, centres).item()) > 1e-3


@pytest.mark.parametrize("form", ["assigned_uniform", "balanced_uniform"])
def test_alternatives_take_the_configured_centre_gradient(form: str) -> None:
    """As for the published loss: "reference" passes the gradient of the loss at the raw unit rows
    (radial part included; central differences of a loop with the assignment held fixed, as the
    losses hold it), "tangent" that gradient less each row's radial part. Same value either way."""
    loss = {
        "assigned_uniform": assigned_uniform_cluster_loss,
        "balanced_uniform": balanced_uniform_cluster_loss,
    }[form]
    user_emb = randn(10, 5, seed=31) * 2.0
    unit_rows = torch.nn.functional.normalize(randn(4, 5, seed=32), dim=-1)
    q = naive_assignment(form, user_emb, unit_rows)
    eps = 1e-6
    expected = torch.zeros_like(unit_rows)
    for j in range(unit_rows.shape[0]):
        for d in range(unit_rows.shape[1]):
            step = torch.zeros_like(unit_rows)
            step[j, d] = eps
            expected[j, d] = (
                naive_pull_and_uniformity(user_emb, unit_rows + step, q)
                - naive_pull_and_uniformity(user_emb, unit_rows - step, q)
            ) / (2 * eps)
    radial = (expected * unit_rows).sum(-1, keepdim=True)  # [k, 1]
    assert radial.abs().min() > 1e-3  # there is a radial part to keep or lose

    grads, values = {}, {}
    for gradient in ("reference", "tangent"):
        c = unit_rows.clone().requires_grad_(True)
        value = loss(user_emb, c, centre_gradient=gradient)
        value.backward()
        assert c.grad is not None
        grads[gradient], values[gradient] = c.grad, value.item()
    assert values["reference"] == pytest.approx(values["tangent"], abs=1e-12)
    assert values["reference"] == pytest.approx(
        naive_pull_and_uniformity(user_emb, unit_rows, q), rel=1e-9
    )
    assert torch.allclose(grads["reference"], expected, rtol=1e-6, atol=1e-8)
    assert torch.allclose(grads["tangent"], expected - radial * unit_rows, rtol=1e-6, atol=1e-8)

    # elcrec_terms passes loss.centre_gradient on to the alternative it selects.
    torch.manual_seed(0)
    model = ELCRec(
        ModelConfig(num_layers=1, hidden_size=8, num_heads=2, max_len=5, num_clusters=3),
        num_items=12,
    ).double()
    model.eval()
    g = torch.Generator().manual_seed(1)
    batch = TrainBatch(
        torch.randint(0, 13, (4, 5), generator=g),
        torch.randint(1, 13, (4, 5), generator=g),
        torch.randint(1, 13, (4, 5), generator=g),
        torch.randint(0, 13, (8, 5), generator=g),
    )
    with torch.no_grad():
        model.cluster_centers.copy_(torch.nn.functional.normalize(model.cluster_centers, dim=-1))
    via_terms = {}
    for gradient in ("reference", "tangent"):
        model.zero_grad()
        config = LossConfig(
            cluster_form=form, centre_gradient=gradient,  # type: ignore[arg-type]
            seq_cl_weight=0.0, intent_cl_weight=0.0,
        )
        elcrec_terms(model, batch, config)["cluster"].backward()
        assert model.cluster_centers.grad is not None
        via_terms[gradient] = model.cluster_centers.grad.clone()
    c = model.cluster_centers.detach()
    radial_terms = (via_terms["reference"] * c).sum(-1, keepdim=True)
    assert radial_terms.abs().max() > 1e-6
    assert torch.allclose(
        via_terms["tangent"], via_terms["reference"] - radial_terms * c, rtol=1e-9, atol=1e-12
    )


def test_fusion_none_contrasts_the_flattened_views() -> None:
    view_hidden, centres = randn(6, 3, 4, seed=12), randn(3, 4, seed=13)
    flat = fuse_intents(view_hidden, centres, "none")
    assert torch.equal(flat, view_hidden.reshape(6, 12))
    got = seq_cl_loss(view_hidden, centres, fusion="none", temperature=1.0)
    assert got.item() == pytest.approx(
        naive_nt_xent(view_hidden[:3].reshape(3, 12), view_hidden[3:].reshape(3, 12), 1.0),
        rel=1e-12,
    )


@pytest.mark.parametrize("form", ["assigned_uniform", "balanced_uniform"])
def test_elcrec_terms_use_the_configured_cluster_form(form: str) -> None:
    torch.manual_seed(0)
    model = ELCRec(
        ModelConfig(num_layers=1, hidden_size=8, num_heads=2, max_len=5, num_clusters=3),
        num_items=12,
    ).double()
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 13, (4, 5), generator=g)
    batch = TrainBatch(
        inputs,
        torch.randint(1, 13, (4, 5), generator=g),
        torch.randint(1, 13, (4, 5), generator=g),
        torch.randint(0, 13, (8, 5), generator=g),
    )
    model.eval()
    terms = elcrec_terms(model, batch, LossConfig(cluster_form=form))  # type: ignore[arg-type]
    direct = {
        "assigned_uniform": assigned_uniform_cluster_loss,
        "balanced_uniform": balanced_uniform_cluster_loss,
    }[form]
    want = direct(model.pooled(model(inputs)), model.cluster_centers)
    assert terms["cluster"].item() == pytest.approx(want.item(), rel=1e-12)


def test_config_rules_for_the_new_options() -> None:
    with pytest.raises(ConfigError, match=r"model\.intents=epoch_kmeans.*loss\.cluster_weight"):
        config_from_dict({"model": {"intents": "epoch_kmeans"}, "loss": {"cluster_weight": 1.0}})
    with pytest.raises(
        ConfigError, match=r"cluster_form=balanced_uniform needs model\.num_clusters >= 2"
    ):
        config_from_dict(
            {"model": {"num_clusters": 1}, "loss": {"cluster_form": "balanced_uniform"}}
        )
    with pytest.raises(ConfigError, match=r"loss\.cluster_form"):
        config_from_dict({"loss": {"cluster_form": "soft"}})
    assert config_from_dict({"loss": {"fusion": "none"}}).loss.fusion == "none"
