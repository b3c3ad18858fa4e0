"""Loss terms against deliberately naive, loop-based implementations of the spec ("Losses")."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, TypedDict

import pytest
import torch

from elcrec_dist.batching import TrainBatch
from elcrec_dist.clustering import nearest_centre
from elcrec_dist.config import LossConfig, ModelConfig
from elcrec_dist.distributed import BatchShard
from elcrec_dist.losses import (
    cluster_loss,
    elcrec_terms,
    fuse_intents,
    intent_cl_loss,
    next_item_loss,
    next_item_softmax_loss,
    nt_xent,
    seq_cl_loss,
    weighted_total,
)
from elcrec_dist.model import ELCRec

# The values the library's options take (Literal in its signatures), for parametrized tests.
Pairs = Literal["all", "distinct"]
Fusion = Literal["shift", "concat", "none"]
CentreGradient = Literal["reference", "tangent"]
# Rows to loop over: a 2-d tensor or a list of 1-d ones.
Rows = torch.Tensor | Sequence[torch.Tensor]


class Tolerance(TypedDict):
    rtol: float
    atol: float


TOL: Tolerance = {"rtol": 1e-10, "atol": 1e-10}

# --------------------------------------------------------------------------------------------
# Naive references: Python loops over users, positions, centres; float64 throughout.
# --------------------------------------------------------------------------------------------


def dot(u: torch.Tensor, v: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(u, v, strict=True))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(dot(v, v))


def sq_dist(u: torch.Tensor, v: torch.Tensor) -> float:
    return sum((float(x) - float(y)) ** 2 for x, y in zip(u, v, strict=True))


def real_positions(targets: torch.Tensor) -> list[tuple[int, int]]:
    """(user, position) of every non-padded target, in order."""
    return [
        (b, t)
        for b in range(targets.shape[0])
        for t in range(targets.shape[1])
        if targets[b, t] != 0
    ]


def naive_next_item(
    hidden: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, table: torch.Tensor
) -> float:
    losses = []
    for b, t in real_positions(targets):
        pos = dot(hidden[b, t], table[targets[b, t]])
        neg = dot(hidden[b, t], table[negatives[b, t]])
        losses.append(-math.log(1 / (1 + math.exp(-pos))) - math.log(1 - 1 / (1 + math.exp(-neg))))
    return sum(losses) / len(losses)


def naive_next_item_softmax(
    hidden: torch.Tensor, targets: torch.Tensor, table: torch.Tensor
) -> float:
    """-log of the target's share of exp(h·e_j) over items j = 1..N, mean over real positions."""
    losses = []
    for b, t in real_positions(targets):
        scores = [dot(hidden[b, t], table[j]) for j in range(1, table.shape[0])]
        top = max(scores)
        log_denominator = top + math.log(sum(math.exp(v - top) for v in scores))
        losses.append(log_denominator - scores[int(targets[b, t]) - 1])
    return sum(losses) / len(losses)


def naive_cluster(user_emb: torch.Tensor, centres: torch.Tensor, pairs: str) -> float:
    h = [unit(u) for u in user_emb]
    c = [unit(v) for v in centres]
    k = len(c)
    pull = sum(sq_dist(hi, cj) for hi in h for cj in c) / (len(h) * k)
    if pairs == "all":
        spread = sum(sq_dist(ci, cj) for ci in c for cj in c) / (k * k)
    else:
        spread = sum(sq_dist(c[i], c[j]) for i in range(k) for j in range(k) if i != j) / (
            k * (k - 1)
        )
    return pull - spread


def naive_nearest(x: Rows, centres: Rows) -> list[int]:
    out = []
    for row in x:
        distances = [sq_dist(row, c) for c in centres]
        out.append(distances.index(min(distances)))  # first minimum
    return out


def naive_fuse(view_hidden: torch.Tensor, centres: torch.Tensor, fusion: str) -> torch.Tensor:
    rows = []
    for r in range(view_hidden.shape[0]):
        flat: list[float] = []
        for t in range(view_hidden.shape[1]):
            h = view_hidden[r, t]
            c = centres[naive_nearest([h], centres)[0]]
            if fusion == "shift":
                flat += [float(x) + float(y) for x, y in zip(h, c, strict=True)]
            else:
                flat += [float(x) for x in h] + [float(y) for y in c]
        rows.append(flat)
    return torch.tensor(rows, dtype=torch.float64)


def naive_nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    m = len(a)
    z = list(a) + list(b)
    total = 0.0
    for i in range(2 * m):
        positive = i + m if i < m else i - m
        logits = {j: dot(z[i], z[j]) / temperature for j in range(2 * m) if j != i}
        top = max(logits.values())
        log_denominator = top + math.log(sum(math.exp(v - top) for v in logits.values()))
        total += log_denominator - logits[positive]
    return total / (2 * m)


def naive_mean_over_time(hidden: torch.Tensor) -> torch.Tensor:
    t_len = hidden.shape[1]
    zero = hidden.new_zeros(hidden.shape[2:])  # the start of each sum, a tensor as the terms
    return torch.stack(
        [sum((hidden[r, t] for t in range(t_len)), zero) / t_len for r in range(hidden.shape[0])]
    )


def naive_intent_cl(
    view_hidden: torch.Tensor, user_emb: torch.Tensor, centres: torch.Tensor, temperature: float
) -> float:
    b = user_emb.shape[0]
    assigned = naive_nearest([unit(u) for u in user_emb], [unit(c) for c in centres])
    positives = torch.stack([centres[j] for j in assigned])
    pooled = naive_mean_over_time(view_hidden)
    return 0.5 * (
        naive_nt_xent(pooled[:b], positives, temperature)
        + naive_nt_xent(pooled[b:], positives, temperature)
    )


def naive_seq_cl(
    view_hidden: torch.Tensor, centres: torch.Tensor, fusion: str, temperature: float
) -> float:
    fused = naive_fuse(view_hidden, centres, fusion)
    b = fused.shape[0] // 2
    return naive_nt_xent(fused[:b], fused[b:], temperature)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Next-item loss
# --------------------------------------------------------------------------------------------


def test_next_item_matches_loop_and_ignores_padding() -> None:
    g = torch.Generator().manual_seed(1)
    hidden, table = randn(3, 5, 4, seed=1), randn(9, 4, seed=2)
    targets = torch.randint(1, 9, (3, 5), generator=g)
    negatives = torch.randint(1, 9, (3, 5), generator=g)
    targets[0, :2] = 0  # padded positions; their negatives are still drawn and must not count
    targets[2, :4] = 0
    got = next_item_loss(hidden, targets, negatives, table)
    assert got.item() == pytest.approx(
        naive_next_item(hidden, targets, negatives, table), rel=1e-12
    )
    # A changed hidden state at a padded position leaves the loss alone; at a real one it does not.
    moved = hidden.clone()
    moved[0, 0] += 5.0
    assert next_item_loss(moved, targets, negatives, table).item() == pytest.approx(
        got.item(), rel=1e-12
    )
    moved[0, 3] += 5.0
    assert next_item_loss(moved, targets, negatives, table).item() != pytest.approx(
        got.item(), rel=1e-6
    )


def test_next_item_softmax_matches_loop_and_ignores_padding_and_row_0() -> None:
    g = torch.Generator().manual_seed(2)
    hidden, table = randn(3, 5, 4, seed=3), randn(9, 4, seed=4)
    targets = torch.randint(1, 9, (3, 5), generator=g)
    targets[0, :2] = 0
    targets[2, :4] = 0
    got = next_item_softmax_loss(hidden, targets, table)
    assert got.item() == pytest.approx(naive_next_item_softmax(hidden, targets, table), rel=1e-12)
    # Padding: a padded position's state does not count; row 0 (padding) is never a candidate.
    moved, table_moved = hidden.clone(), table.clone()
    moved[2, 0] += 5.0
    table_moved[0] += 50.0
    assert next_item_softmax_loss(moved, targets, table_moved).item() == pytest.approx(
        got.item(), rel=1e-12
    )
    # Every item row is a candidate, so every row but padding gets a gradient: also items that
    # are neither a target nor a negative anywhere (what makes the item exchange dense).
    table_grad = table.clone().requires_grad_()
    next_item_softmax_loss(hidden, targets, table_grad).backward()
    assert table_grad.grad is not None
    row_norms = table_grad.grad.norm(dim=1)
    assert row_norms[0] == 0 and bool((row_norms[1:] > 0).all())


def test_next_item_softmax_shards_sum_to_the_whole_batch() -> None:
    """Under data parallelism each rank returns its share: the mean's numerator over its rows,
    divided by the global count of real positions."""
    g = torch.Generator().manual_seed(5)
    hidden, table = randn(4, 3, 4, seed=6), randn(7, 4, seed=7)
    targets = torch.randint(1, 7, (4, 3), generator=g)
    targets[1, :2] = 0
    whole = next_item_softmax_loss(hidden, targets, table).item()
    count = float((targets > 0).sum())
    parts = [
        next_item_softmax_loss(
            hidden[rows], targets[rows], table,
            BatchShard(world=2, global_sum=lambda _: torch.tensor(count, dtype=torch.float64)),
        ).item()
        for rows in (slice(0, 2), slice(2, 4))
    ]
    assert sum(parts) == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("rows", [1, 2, 3, 7])  # 8 rows would be the whole
def test_next_item_softmax_in_chunks_matches_the_loop_and_the_whole_gradient(rows: int) -> None:
    """Scored in chunks of ``rows`` positions (8 real positions, 9 items), the loss is the
    naive loop's and both gradients are those of the [P, N] computation, under an upstream
    gradient other than 1 (what the weighted total and DeepSpeed's scaling pass in)."""
    g = torch.Generator().manual_seed(8)
    hidden, table = randn(2, 6, 4, seed=9), randn(10, 4, seed=10)
    targets = torch.randint(1, 10, (2, 6), generator=g)
    targets[0, :3] = 0
    targets[1, :1] = 0
    n = table.shape[0] - 1
    assert int((targets > 0).sum()) == 8
    results: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}
    for name, max_logits in (("whole", None), ("chunks", rows * n)):
        h, e = hidden.clone().requires_grad_(), table.clone().requires_grad_()
        loss = next_item_softmax_loss(h, targets, e, max_logits=max_logits)
        (2.5 * loss).backward()
        assert h.grad is not None and e.grad is not None
        results[name] = (loss.item(), h.grad, e.grad)
    loop = naive_next_item_softmax(hidden, targets, table)
    assert results["chunks"][0] == pytest.approx(loop, rel=1e-12)
    assert results["whole"][0] == pytest.approx(loop, rel=1e-12)
    for whole, chunks in zip(results["whole"][1:], results["chunks"][1:], strict=True):
        torch.testing.assert_close(chunks, whole, rtol=1e-12, atol=1e-14)
    assert results["chunks"][2][0].abs().max() == 0  # row 0, padding, is never a candidate


def saved_sizes(run: Callable[[], torch.Tensor]) -> list[int]:
    """Element counts of every tensor autograd saves for the backward pass of ``run()``."""
    sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run().backward()
    return sizes


def test_next_item_softmax_in_chunks_never_keeps_positions_by_items() -> None:
    """What bounds the memory: with chunks, nothing of P x N elements (or of a chunk's R x N)
    is kept for the backward pass; the whole computation keeps its [P, N] logits."""
    g = torch.Generator().manual_seed(11)
    hidden, table = randn(4, 10, 3, seed=12), randn(51, 3, seed=13)  # P = 40, N = 50, D = 3
    targets = torch.randint(1, 51, (4, 10), generator=g)
    p, n = 40, 50

    def loss(max_logits: int | None) -> Callable[[], torch.Tensor]:
        h, e = hidden.clone().requires_grad_(), table.clone().requires_grad_()
        return lambda: next_item_softmax_loss(h, targets, e, max_logits=max_logits)

    assert max(saved_sizes(loss(None))) >= p * n
    chunked = saved_sizes(loss(4 * n))  # chunks of 4 positions
    assert max(chunked) <= max(n * 3, p * 3) < 4 * n


def test_next_item_softmax_in_chunks_of_a_bfloat16_model() -> None:
    """A bfloat16 model's states and table: the chunks compute in float32 (close to the float64
    loop) and hand back gradients in the parameters' dtype."""
    g = torch.Generator().manual_seed(14)
    hidden, table = randn(2, 5, 4, seed=15), randn(12, 4, seed=16)
    targets = torch.randint(1, 12, (2, 5), generator=g)
    h = hidden.to(torch.bfloat16).requires_grad_()
    e = table.to(torch.bfloat16).requires_grad_()
    loss = next_item_softmax_loss(h, targets, e, max_logits=2 * 11)
    loss.backward()
    loop = naive_next_item_softmax(h.detach().double(), targets, e.detach().double())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loop, rel=1e-5)
    assert h.grad is not None and e.grad is not None
    assert h.grad.dtype == e.grad.dtype == torch.bfloat16


def test_next_item_is_finite_for_large_logits() -> None:
    hidden = torch.full((1, 2, 2), 100.0)
    table = torch.tensor([[0.0, 0.0], [-1.0, -1.0], [1.0, 1.0]])
    targets, negatives = torch.tensor([[1, 1]]), torch.tensor([[2, 2]])
    loss = next_item_loss(hidden, targets, negatives, table)  # logits -200 (pos) and +200 (neg)
    assert loss.item() == pytest.approx(400.0, rel=1e-6)  # -logσ(-200) - logσ(-200) = 2·200


# --------------------------------------------------------------------------------------------
# Cluster loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairs", ["all", "distinct"])
def test_cluster_loss_matches_loop(pairs: Pairs) -> None:
    user_emb, centres = randn(7, 5, seed=3) * 3.0, randn(4, 5, seed=4)
    got = cluster_loss(user_emb, centres, pairs=pairs)
    assert got.item() == pytest.approx(
        naive_cluster(user_emb, centres, pairs), rel=1e-12, abs=1e-12
    )


def naive_cluster_on_raw_rows(user_emb: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The reference run's cluster loss: users normalised in the graph, the centres used as the
    raw parameter rows (unit because ``.data`` was normalised before the step). Loops, float64;
    returned as a tensor so autograd gives the reference gradient."""
    h = torch.nn.functional.normalize(user_emb, dim=-1)
    k = centres.shape[0]
    zero = user_emb.new_zeros(())  # the start of each sum: a tensor, as its terms are
    pull = sum((((h[i] - centres[j]) ** 2).sum() for i in range(len(h)) for j in range(k)), zero)
    spread = sum((((centres[i] - centres[j]) ** 2).sum() for i in range(k) for j in range(k)), zero)
    pull, spread = pull / (len(h) * k), spread / (k * k)
    return pull - spread


def test_centre_gradient_reference_and_tangent() -> None:
    """Same value either way. "reference": the gradient of the loss at the raw unit rows
    (radial part included, as the reference's optimizer saw it); "tangent": that gradient with
    each row's radial part removed, (I - c cᵀ) g."""
    user_emb = randn(6, 5, seed=21) * 2.0
    unit_rows = torch.nn.functional.normalize(randn(4, 5, seed=22), dim=-1)
    raw = unit_rows.clone().requires_grad_(True)
    naive_cluster_on_raw_rows(user_emb, raw).backward()
    assert raw.grad is not None
    expected = raw.grad
    radial = (expected * unit_rows).sum(-1, keepdim=True)  # [k, 1]
    assert radial.abs().min() > 1e-3  # the reference gradient has a radial part to lose

    grads, values = {}, {}
    forms: tuple[CentreGradient, ...] = ("reference", "tangent")
    for form in forms:
        c = unit_rows.clone().requires_grad_(True)
        value = cluster_loss(user_emb, c, pairs="all", centre_gradient=form)
        value.backward()
        assert c.grad is not None
        grads[form], values[form] = c.grad, value.item()
    assert values["reference"] == pytest.approx(values["tangent"], abs=1e-12)
    assert values["reference"] == pytest.approx(
        naive_cluster(user_emb, unit_rows, "all"), abs=1e-12
    )
    assert torch.allclose(grads["reference"], expected, **TOL)
    assert torch.allclose(grads["tangent"], expected - radial * unit_rows, **TOL)

    # Off the sphere the value is still the normalised loss for both forms.
    scaled = unit_rows * torch.tensor([[0.5], [2.0], [1.0], [3.0]], dtype=torch.float64)
    for form in forms:
        assert cluster_loss(
            user_emb, scaled, pairs="all", centre_gradient=form
        ).item() == pytest.approx(values["tangent"], abs=1e-12)
    with pytest.raises(ValueError, match="reference' or 'tangent"):
        cluster_loss(
            user_emb, unit_rows, pairs="all", centre_gradient="sideways"  # type: ignore[arg-type]
        )


def test_cluster_pairs_all_and_distinct_differ_by_diagonal() -> None:
    user_emb, centres = randn(6, 4, seed=5), randn(3, 4, seed=6)
    all_pairs = cluster_loss(user_emb, centres, pairs="all").item()
    distinct = cluster_loss(user_emb, centres, pairs="distinct").item()
    assert all_pairs != pytest.approx(distinct, rel=1e-3)
    with pytest.raises(ValueError, match="2 centres"):
        cluster_loss(user_emb, centres[:1], pairs="distinct")


def rotation_fixing(axis: torch.Tensor, angle: float, seed: int) -> torch.Tensor:
    """A Givens rotation by ``angle`` in a random plane orthogonal to ``axis``: R axis = axis."""
    d = axis.shape[0]
    basis = [unit(axis)]
    for v in randn(2, d, seed=seed):
        for e in basis:  # Gram-Schmidt against the axis and the first plane vector
            v = v - dot(v, e) * e
        basis.append(unit(v))
    u1, u2 = basis[1], basis[2]
    return (
        torch.eye(d, dtype=torch.float64)
        + (math.cos(angle) - 1.0) * (torch.outer(u1, u1) + torch.outer(u2, u2))
        + math.sin(angle) * (torch.outer(u2, u1) - torch.outer(u1, u2))
    )


@pytest.mark.parametrize("pairs", ["all", "distinct"])
def test_cluster_loss_sees_centres_only_through_their_mean(pairs: Pairs) -> None:
    """Spec derivation: on the unit sphere, permuting the centres or rotating them about their
    mean leaves the loss unchanged; this term alone cannot separate individual centres."""
    user_emb = torch.nn.functional.normalize(randn(8, 6, seed=7), dim=-1)
    centres = torch.nn.functional.normalize(randn(5, 6, seed=8), dim=-1)
    base = cluster_loss(user_emb, centres, pairs=pairs)

    permuted = centres[torch.tensor([3, 0, 4, 1, 2])]
    assert cluster_loss(user_emb, permuted, pairs=pairs).item() == pytest.approx(
        base.item(), abs=1e-12
    )

    rotation = rotation_fixing(centres.mean(0), angle=1.1, seed=9)
    assert torch.allclose(rotation @ rotation.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rotation @ centres.mean(0), centres.mean(0), atol=1e-12)
    rotated = centres @ rotation.T  # c_j -> R c_j
    assert (rotated - centres).abs().max() > 0.1  # the centres really moved
    assert cluster_loss(user_emb, rotated, pairs=pairs).item() == pytest.approx(
        base.item(), abs=1e-12
    )

    # A rotation that moves the mean does change the loss (so the checks above can fail).
    moved = centres @ rotation_fixing(randn(6, seed=10), angle=1.1, seed=11).T
    assert cluster_loss(user_emb, moved, pairs=pairs).item() != pytest.approx(base.item(), abs=1e-6)


# --------------------------------------------------------------------------------------------
# Nearest centre and fusion
# --------------------------------------------------------------------------------------------


def test_nearest_centre_matches_loop() -> None:
    x, centres = randn(40, 5, seed=12), randn(7, 5, seed=13) * 2.0
    assert nearest_centre(x, centres).tolist() == naive_nearest(x, centres)


def test_nearest_centre_ties_go_to_lowest_index() -> None:
    centres = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    x = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [3.0, 0.0]])
    # [0,1]: centres 1 and 2 coincide. [0.5,0.5]: 1, 2, 3 all at distance 0.5.
    assert nearest_centre(x, centres).tolist() == [1, 1, 3, 0]


@pytest.mark.parametrize(("fusion", "width"), [("shift", 3 * 4), ("concat", 3 * 8)])
def test_fuse_intents_shapes_and_values(fusion: Fusion, width: int) -> None:
    view_hidden, centres = randn(6, 3, 4, seed=14), randn(5, 4, seed=15)
    fused = fuse_intents(view_hidden, centres, fusion)
    assert fused.shape == (6, width)
    torch.testing.assert_close(fused, naive_fuse(view_hidden, centres, fusion), **TOL)


def test_fuse_concat_layout_by_hand() -> None:
    view_hidden = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # one row, T = 2, D = 2
    centres = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # step 0 is nearest centre 1, step 1 nearest centre 0
    assert fuse_intents(view_hidden, centres, "concat").tolist() == [[1, 0, 1, 1, 0, 3, 0, 2]]
    assert fuse_intents(view_hidden, centres, "shift").tolist() == [[2, 1, 0, 5]]


# --------------------------------------------------------------------------------------------
# NT-Xent and the two contrastive terms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_nt_xent_matches_loop(temperature: float) -> None:
    a, b = randn(5, 3, seed=16), randn(5, 3, seed=17)
    got = nt_xent(a, b, temperature=temperature)
    assert got.item() == pytest.approx(naive_nt_xent(a, b, temperature), rel=1e-12)


def naive_nt_xent_grad(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """d NT-Xent / d [a; b], by the chain rule written out per row (loops, float64):
    row i adds ``(Σ_{j≠i} P_ij z_j − z_p(i)) / τ`` to z_i and ``(P_ij − [j = p(i)]) z_i / τ``
    to every other z_j, all over 2M (P_i = softmax over j ≠ i of z_i·z_j / τ)."""
    m = len(a)
    z = [[float(x) for x in row] for row in list(a) + list(b)]
    width = len(z[0])
    grad = [[0.0] * width for _ in range(2 * m)]
    for i in range(2 * m):
        positive = i + m if i < m else i - m
        logits = {j: sum(x * y for x, y in zip(z[i], z[j], strict=True)) / temperature
                  for j in range(2 * m) if j != i}
        top = max(logits.values())
        denominator = sum(math.exp(v - top) for v in logits.values())
        for j, value in logits.items():
            weight = (math.exp(value - top) / denominator - (j == positive)) / temperature
            for f in range(width):
                grad[i][f] += weight * z[j][f] / (2 * m)
                grad[j][f] += weight * z[i][f] / (2 * m)
    return torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_nt_xent_gradient_matches_the_chain_rule(temperature: float) -> None:
    """The full-batch path's own backward (one product for the symmetric similarity matrix)
    against the gradient written out by hand."""
    a, b = randn(4, 3, seed=31), randn(4, 3, seed=32)
    a.requires_grad_(True)
    b.requires_grad_(True)
    nt_xent(a, b, temperature=temperature).backward()
    assert a.grad is not None and b.grad is not None
    want = naive_nt_xent_grad(a.detach(), b.detach(), temperature)
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), want, **TOL)


def test_nt_xent_by_hand_2x2() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    # rows (positive; other candidates) with τ = 1:
    #   a0: a0·b0 = 1; a0·a1 = 0, a0·b1 = 0  -> log(e + 2) - 1
    #   a1: a1·b1 = 0; a1·a0 = 0, a1·b0 = 1  -> log(e + 2)
    #   b0: b0·a0 = 1; b0·b1 = 0, b0·a1 = 1  -> log(2e + 1) - 1
    #   b1: b1·a1 = 0; b1·b0 = 0, b1·a0 = 0  -> log 3
    e = math.e
    expected = (2 * math.log(e + 2) - 1 + math.log(2 * e + 1) - 1 + math.log(3)) / 4
    assert nt_xent(a, b, temperature=1.0).item() == pytest.approx(expected, rel=1e-12)
    # τ scales every logit: τ = 0.5 equals τ = 1 with inputs scaled by √2.
    assert nt_xent(a, b, temperature=0.5).item() == pytest.approx(
        nt_xent(a * math.sqrt(2), b * math.sqrt(2), temperature=1.0).item(), rel=1e-12
    )


@pytest.mark.parametrize("fusion", ["shift", "concat"])
def test_seq_cl_is_nt_xent_of_fused_views(fusion: Fusion) -> None:
    view_hidden, centres = randn(8, 3, 4, seed=18), randn(3, 4, seed=19)
    got = seq_cl_loss(view_hidden, centres, fusion=fusion, temperature=1.0)
    assert got.item() == pytest.approx(naive_seq_cl(view_hidden, centres, fusion, 1.0), rel=1e-12)


def test_intent_cl_matches_loop_and_trains_only_assigned_centres() -> None:
    view_hidden, user_emb = randn(10, 3, 4, seed=20), randn(5, 4, seed=21)
    centres = randn(6, 4, seed=22).requires_grad_()
    got = intent_cl_loss(view_hidden, user_emb, centres, temperature=1.0)
    assert got.item() == pytest.approx(
        naive_intent_cl(view_hidden, user_emb, centres.detach(), 1.0), rel=1e-12
    )
    got.backward()
    assert centres.grad is not None
    assigned = set(naive_nearest([unit(u) for u in user_emb], [unit(c) for c in centres.detach()]))
    assert 1 <= len(assigned) < 6  # the check below is not vacuous
    with_grad = {i for i in range(6) if centres.grad[i].abs().sum() > 0}
    assert with_grad == assigned


# --------------------------------------------------------------------------------------------
# elcrec_terms on a tiny real model, and the weights
# --------------------------------------------------------------------------------------------

NUM_ITEMS = 12


def tiny_model() -> ELCRec:
    torch.manual_seed(0)
    config = ModelConfig(num_layers=1, hidden_size=8, num_heads=2, max_len=6, num_clusters=3)
    return ELCRec(config, num_items=NUM_ITEMS).double().eval()


def tiny_batch() -> TrainBatch:
    g = torch.Generator().manual_seed(23)
    inputs = torch.randint(1, NUM_ITEMS + 1, (4, 6), generator=g)
    inputs[0, :3] = 0
    inputs[2, :5] = 0
    targets = torch.randint(1, NUM_ITEMS + 1, (4, 6), generator=g).masked_fill(inputs == 0, 0)
    negatives = torch.randint(1, NUM_ITEMS + 1, (4, 6), generator=g)
    views = torch.randint(0, NUM_ITEMS + 1, (8, 6), generator=g)
    views[:, -1] = torch.randint(1, NUM_ITEMS + 1, (8,), generator=g)  # newest item is real
    return TrainBatch(inputs=inputs, targets=targets, negatives=negatives, views=views)


def count_forwards(model: ELCRec) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize(("fusion", "pairs"), [("shift", "all"), ("concat", "distinct")])
def test_elcrec_terms_equal_the_naive_composition(fusion: Fusion, pairs: Pairs) -> None:
    model, batch = tiny_model(), tiny_batch()
    config = LossConfig(fusion=fusion, cluster_pairs=pairs, cluster_weight=10.0)
    calls = count_forwards(model)
    terms = elcrec_terms(model, batch, config)
    assert calls == [12]  # one pass over the B inputs and the 2B views together

    with torch.no_grad():
        hidden, view_hidden = model(batch.inputs), model(batch.views)
    table, centres = model.item_embeddings.weight.detach(), model.cluster_centers.detach()
    user_emb = naive_mean_over_time(hidden)
    expected = {
        "next_item": naive_next_item(hidden, batch.targets, batch.negatives, table),
        "cluster": naive_cluster(user_emb, centres, pairs),
        "seq_cl": naive_seq_cl(view_hidden, centres, fusion, 1.0),
        "intent_cl": naive_intent_cl(view_hidden, user_emb, centres, 1.0),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-10), name

    total = weighted_total(terms, config)
    want = (
        expected["next_item"]
        + 0.1 * expected["seq_cl"]
        + 0.1 * expected["intent_cl"]
        + 10.0 * expected["cluster"]
    )
    assert total.item() == pytest.approx(want, rel=1e-10)
    total.backward()
    assert model.cluster_centers.grad is not None and model.cluster_centers.grad.abs().sum() > 0


@pytest.mark.parametrize(("seq_tau", "want_seq_tau"), [(None, 0.5), (7.0, 7.0)])
def test_seq_cl_temperature_applies_to_the_sequence_term_only(
    seq_tau: float | None, want_seq_tau: float
) -> None:
    """``loss.seq_cl_temperature`` (beyond the paper) divides the sequence-CL logits only; unset,
    the sequence term uses ``loss.temperature`` like the intent term."""
    model, batch = tiny_model(), tiny_batch()
    config = LossConfig(temperature=0.5, seq_cl_temperature=seq_tau)
    terms = elcrec_terms(model, batch, config)
    with torch.no_grad():
        hidden, view_hidden = model(batch.inputs), model(batch.views)
    centres = model.cluster_centers.detach()
    user_emb = naive_mean_over_time(hidden)
    want_seq = naive_seq_cl(view_hidden, centres, "shift", want_seq_tau)
    assert terms["seq_cl"].item() == pytest.approx(want_seq, rel=1e-10)
    want_intent = naive_intent_cl(view_hidden, user_emb, centres, 0.5)
    assert terms["intent_cl"].item() == pytest.approx(want_intent, rel=1e-10)


def test_elcrec_terms_use_the_configured_next_item_form() -> None:
    model, batch = tiny_model(), tiny_batch()
    terms = elcrec_terms(model, batch, LossConfig(next_item="softmax"))
    with torch.no_grad():
        hidden = model(batch.inputs)
    table = model.item_embeddings.weight.detach()
    want = naive_next_item_softmax(hidden, batch.targets, table)
    assert terms["next_item"].item() == pytest.approx(want, rel=1e-10)
    assert terms["next_item"].item() != pytest.approx(
        naive_next_item(hidden, batch.targets, batch.negatives, table), rel=1e-3
    )


def test_elcrec_terms_pass_the_softmax_chunk_budget() -> None:
    """``loss.softmax_max_logits`` reaches the term: one position per chunk gives the loop's
    value and the whole computation's gradient on every parameter."""
    grads = {}
    for budget in (2**26, 1):
        model, batch = tiny_model(), tiny_batch()
        config = LossConfig(next_item="softmax", softmax_max_logits=budget)
        term = elcrec_terms(model, batch, config)["next_item"]
        term.backward()
        grads[budget] = {name: p.grad.clone() for name, p in model.named_parameters()
                         if p.grad is not None}
        with torch.no_grad():  # an eval-mode model: no dropout
            hidden = model(batch.inputs)
        table = model.item_embeddings.weight.detach()
        want = naive_next_item_softmax(hidden, batch.targets, table)
        assert term.item() == pytest.approx(want, rel=1e-10)
    assert grads[1].keys() == grads[2**26].keys() and "item_embeddings.weight" in grads[1]
    for name, whole in grads[2**26].items():
        torch.testing.assert_close(grads[1][name], whole, rtol=1e-10, atol=1e-12)


def test_zero_weights_omit_terms_and_the_views_pass() -> None:
    model, batch = tiny_model(), tiny_batch()
    calls = count_forwards(model)

    terms = elcrec_terms(
        model, batch, LossConfig(seq_cl_weight=0.0, intent_cl_weight=0.0, cluster_weight=0.0)
    )
    assert set(terms) == {"next_item"} and calls == [4]

    calls.clear()
    terms = elcrec_terms(model, batch, LossConfig(seq_cl_weight=0.0, cluster_weight=0.0))
    # one pass: B inputs + 2B views
    assert set(terms) == {"next_item", "intent_cl"} and calls == [12]

    calls.clear()
    terms = elcrec_terms(model, batch, LossConfig(intent_cl_weight=0.0))
    # one pass: B inputs + 2B views
    assert set(terms) == {"next_item", "seq_cl", "cluster"} and calls == [12]


def test_weighted_total_applies_the_weights() -> None:
    terms = {
        "next_item": torch.tensor(1.0),
        "seq_cl": torch.tensor(2.0),
        "intent_cl": torch.tensor(3.0),
        "cluster": torch.tensor(4.0),
    }
    config = LossConfig(seq_cl_weight=0.5, intent_cl_weight=0.25, cluster_weight=2.0)
    assert weighted_total(terms, config).item() == pytest.approx(1.0 + 1.0 + 0.75 + 8.0)

    # A zero-weight term is left out, even a non-finite one; a weighted one must be present.
    config = LossConfig(seq_cl_weight=0.0, intent_cl_weight=0.1, cluster_weight=1.0)
    assert weighted_total(
        {**terms, "seq_cl": torch.tensor(math.nan)}, config
    ).item() == pytest.approx(1.0 + 0.3 + 4.0)
    without = {name: v for name, v in terms.items() if name != "intent_cl"}
    with pytest.raises(ValueError, match="intent_cl"):
        weighted_total(without, config)
    with pytest.raises(ValueError, match="unknown"):
        weighted_total({**terms, "typo": torch.tensor(0.0)}, config)


def test_dropout_matches_the_bernoulli_distribution() -> None:
    from elcrec_dist.model import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.ones(200_000)
    out = drop(x)
    kept = out != 0
    # kept values are scaled by 1/(1-p); the keep rate is 1-p within 5 standard errors
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))
    assert abs(kept.float().mean().item() - 0.7) < 5 * (0.7 * 0.3 / 200_000) ** 0.5
    assert torch.equal(drop.eval()(x), x)


def test_dropout_at_one_half_draws_independent_fair_bits() -> None:
    """The p = 0.5 path (one random bit per element): kept values are doubled; the keep rate,
    and the rate at which two neighbouring elements (bits of one byte) or the same element in
    two calls are both kept, are 1/2 and 1/4 within 5 standard errors; reseeding torch's
    generator draws the same mask again."""
    from elcrec_dist.model import Dropout

    n = 400_000
    drop = Dropout(0.5).train()
    x = torch.ones(n)
    torch.manual_seed(1)
    first, second = drop(x), drop(x)
    kept, kept_again = first != 0, second != 0
    assert torch.equal(first[kept], torch.full_like(first[kept], 2.0))
    assert abs(kept.float().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    both_rate = (0.25 * 0.75 / (n // 2)) ** 0.5
    neighbours = (kept[0::2] & kept[1::2]).float().mean().item()
    assert abs(neighbours - 0.25) < 5 * both_rate
    assert abs((kept & kept_again).float().mean().item() - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5
    torch.manual_seed(1)
    assert torch.equal(drop(x), first)


def test_last_only_forward_equals_the_full_forward() -> None:
    torch.manual_seed(0)
    for layers in (1, 3):
        model = ELCRec(
            ModelConfig(num_layers=layers, hidden_size=8, num_heads=2, max_len=7, num_clusters=3),
            num_items=30,
        ).eval()
        items = torch.tensor([[0, 0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 0, 9]])
        full = model(items)
        last = model(items, last_only=True)
        assert last.shape == (3, 1, 8)
        assert torch.allclose(last, full[:, -1:], atol=1e-6)
