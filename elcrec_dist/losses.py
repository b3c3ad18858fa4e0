"""Named loss terms of ELCRec (spec: "Losses", items 1, 2, 4, 5, 6).

Every term is a pure function of tensors; ``elcrec_terms`` runs the encoder and returns the terms
by name, and ``weighted_total`` is the one place the configured weights are applied.

Shapes: B users, T = max_len positions, D hidden size, k centres, N items (ids 1..N, 0 = padding),
M rows of a contrastive batch, F features per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from elcrec_dist.batching import TrainBatch
from elcrec_dist.clustering import nearest_centre
from elcrec_dist.config import LossConfig
from elcrec_dist.distributed import LOCAL, BatchShard
from elcrec_dist.model import ELCRec

TERMS = ("next_item", "seq_cl", "intent_cl", "cluster")




def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def next_item_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    item_table: torch.Tensor,
    shard: BatchShard = LOCAL,
) -> torch.Tensor:
    """Binary cross-entropy of the next item against one negative, at every non-padded position.

    hidden [B, T, D]; targets, negatives [B, T] (target 0 = padding position, ignored);
    item_table [N + 1, D]. Returns the mean over non-padded positions (of the global batch;
    this rank's share of the sum) of ``-log σ(h·e_pos) - log(1 - σ(h·e_neg))`` (0 if none).
    """
    _check(
        targets.shape == hidden.shape[:2] and negatives.shape == targets.shape,
        f"next_item_loss: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)} and "
        f"negatives {tuple(negatives.shape)} must share [B, T]",
    )
    # One lookup for both: its backward is one scatter into the item table's gradient.
    rows = F.embedding(torch.stack([targets, negatives]), item_table)  # [2, B, T, D]
    pos_logits, neg_logits = (hidden * rows).sum(-1)  # [B, T] each
    # log(1 - σ(x)) = logσ(-x): stable where the reference's log(σ + 1e-24) saturates.
    per_position = -(F.logsigmoid(pos_logits) + F.logsigmoid(-neg_logits))  # [B, T]
    real = (targets > 0).to(per_position.dtype)
    count = shard.global_sum(real.sum().detach())
    return (per_position * real).sum() / count.clamp(min=1.0)


def next_item_softmax_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_table: torch.Tensor,
    shard: BatchShard = LOCAL,
    *,
    max_logits: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the next item over the whole catalogue, at every non-padded position
    (``loss.next_item: softmax``, beyond the paper).

    hidden [B, T, D]; targets [B, T] (0 = padding position, ignored); item_table [N + 1, D]
    (row 0, padding, is never a candidate). Returns the mean over non-padded positions (of the
    global batch; this rank's share of the sum) of ``-log softmax_j(h·e_j)[target]`` over the
    items j = 1..N (0 if none). Only the P non-padded positions are scored: [P, N] logits at
    once, or, where ``P·N > max_logits``, chunks of ``max(1, max_logits // N)`` positions whose
    logits are recomputed in the backward pass (``chunked_softmax_cross_entropy``).
    """
    _check(
        targets.shape == hidden.shape[:2],
        f"next_item_softmax_loss: hidden {tuple(hidden.shape)} and targets "
        f"{tuple(targets.shape)} must share [B, T]",
    )
    real = targets > 0  # [B, T]
    states, labels = hidden[real], targets[real] - 1  # [P, D], [P]
    candidates = item_table[1:]  # [N, D]
    n = candidates.shape[0]
    if max_logits is None or states.shape[0] * n <= max_logits:
        total = F.cross_entropy(states @ candidates.T, labels, reduction="sum")  # [P, N] logits
    else:
        total = chunked_softmax_cross_entropy(states, candidates, labels, max(1, max_logits // n))
    count = shard.global_sum(real.sum().to(hidden.dtype).detach())
    return total / count.clamp(min=1.0)


def chunked_softmax_cross_entropy(
    states: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, rows: int
) -> torch.Tensor:
    """``sum_p -log softmax(states[p] @ candidates.T)[labels[p]]`` with at most ``rows`` x N
    logits alive at a time, forward and backward.

    states [P, D]; candidates [N, D]; labels [P] in 0..N-1. The forward keeps only each row's
    log-sum-exp [P]; the backward recomputes a chunk's logits, turns them into
    ``softmax − one_hot`` and accumulates both gradients, so autograd never saves a [P, N]
    tensor. Computed in float32 at least (a bfloat16 model's logits are promoted).
    """
    _check(rows >= 1, f"chunked_softmax_cross_entropy: rows must be >= 1, got {rows}")
    _check(
        states.dim() == 2 and candidates.dim() == 2 and states.shape[1] == candidates.shape[1]
        and labels.shape == states.shape[:1],
        f"chunked_softmax_cross_entropy: expected states [P, D], candidates [N, D] and labels "
        f"[P], got {tuple(states.shape)}, {tuple(candidates.shape)} and {tuple(labels.shape)}",
    )
    total: torch.Tensor = _ChunkedSoftmaxCrossEntropy.apply(states, candidates, labels, rows)
    return total


class _ChunkedSoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        states: torch.Tensor,
        candidates: torch.Tensor,
        labels: torch.Tensor,
        rows: int,
    ) -> torch.Tensor:
        dtype = torch.promote_types(states.dtype, torch.float32)
        h, e = states.to(dtype), candidates.to(dtype)
        lse = torch.empty(h.shape[0], dtype=dtype, device=h.device)  # [P]
        for start in range(0, h.shape[0], rows):
            logits = h[start:start + rows] @ e.T  # [R, N], the one buffer of the chunk
            top = logits.amax(dim=1)  # [R]
            lse[start:start + rows] = logits.sub_(top[:, None]).exp_().sum(dim=1).log_().add_(top)
            del logits
        picked = (h * e[labels]).sum(-1)  # [P], the target's logit
        ctx.save_for_backward(states, candidates, labels, lse)
        ctx.rows = rows  # type: ignore[attr-defined]
        return (lse - picked).sum()

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        states, candidates, labels, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        rows: int = ctx.rows  # type: ignore[attr-defined]
        dtype = lse.dtype
        h, e = states.to(dtype), candidates.to(dtype)
        grad_h = torch.empty_like(h)  # [P, D]
        grad_e = torch.zeros_like(e)  # [N, D]
        for start in range(0, h.shape[0], rows):
            chunk = h[start:start + rows]  # [R, D]
            probs = (chunk @ e.T).sub_(lse[start:start + rows, None]).exp_()  # [R, N] softmax
            probs[torch.arange(chunk.shape[0], device=h.device), labels[start:start + rows]] -= 1.0
            probs.mul_(grad_total.to(dtype))
            torch.mm(probs, e, out=grad_h[start:start + rows])
            grad_e.addmm_(probs.T, chunk)
            del probs
        return grad_h.to(states.dtype), grad_e.to(candidates.dtype), None, None


def cluster_loss(
    user_emb: torch.Tensor,
    centres: torch.Tensor,
    *,
    pairs: Literal["all", "distinct"],
    centre_gradient: Literal["reference", "tangent"] = "reference",
    shard: BatchShard = LOCAL,
) -> torch.Tensor:
    """``mean_{i,j} ||ĥ_i − ĉ_j||² − mean_{pairs} ||ĉ_i − ĉ_j||²`` on L2-normalised rows.

    user_emb [B, D] (un-normalised mean-pooled embeddings); centres [k, D]. ``pairs="all"``
    averages the centre term over all k² pairs, diagonal included (reference run);
    ``"distinct"`` over the k(k−1) pairs i ≠ j (the paper's equation).

    Computed without any [B, k] or [B, k, D] tensor, through
    ``mean_{i,j} ||x_i − y_j||² = mean_i ||x_i||² + mean_j ||y_j||² − 2 x̄·ȳ``.
    The squared norms are kept (not assumed 1) so a zero row, which F.normalize leaves at 0,
    is handled exactly. Under a ``shard`` the user term is summed over local users and divided
    by B_global, and the centre term (identical on every rank) is divided by the world size.
    """
    _check(
        user_emb.dim() == 2 and centres.dim() == 2 and user_emb.shape[1] == centres.shape[1],
        f"cluster_loss: expected user_emb [B, D] and centres [k, D], got "
        f"{tuple(user_emb.shape)} and {tuple(centres.shape)}",
    )
    k = centres.shape[0]
    h = F.normalize(user_emb, dim=-1)  # [B, D]
    c = normalize_centres(centres, centre_gradient)  # [k, D]
    b_global = shard.rows(h.shape[0])
    c_sq = c.pow(2).sum(-1).mean()
    c_mean = c.mean(0)  # [D]
    # mean_j ||ĥ_i − ĉ_j||² = ||ĥ_i||² + mean_j ||ĉ_j||² − 2 ĥ_i·c̄, summed over local users
    pull = (h.pow(2).sum(-1) + c_sq - 2.0 * (h @ c_mean)).sum() / b_global
    spread_all = 2.0 * c_sq - 2.0 * (c_mean @ c_mean)  # mean over all k² pairs
    if pairs == "all":
        spread = spread_all
    elif pairs == "distinct":
        _check(k >= 2, "cluster_loss: pairs='distinct' needs at least 2 centres")
        spread = spread_all * (k / (k - 1))  # the diagonal pairs contribute 0
    else:
        raise ValueError(f"cluster_loss: pairs must be 'all' or 'distinct', got {pairs!r}")
    return pull - spread / shard.world


def normalize_centres(
    centres: torch.Tensor, gradient: Literal["reference", "tangent"]
) -> torch.Tensor:
    """Centres [k, D] scaled to unit rows. ``"tangent"``: through ``F.normalize`` (the gradient
    loses its radial part). ``"reference"``: divided by their detached norms, so the value is
    the same but the gradient is the raw rows' one over the norm (at unit rows, exactly the
    gradient of the reference run, which normalised ``.data`` in place before the step)."""
    if gradient == "tangent":
        return F.normalize(centres, dim=-1)
    if gradient == "reference":
        return centres / centres.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    raise ValueError(
        f"normalize_centres: gradient must be 'reference' or 'tangent', got {gradient!r}"
    )


def assign_users(
    user_emb: torch.Tensor, centres: torch.Tensor, *, normalize_centres: bool = True
) -> torch.Tensor:
    """Each user's intent: the centre nearest to its L2-normalised embedding (no gradient).

    user_emb [B, D], centres [k, D] -> [B] int64. The centres are normalised too unless
    ``normalize_centres`` is False.
    """
    c = F.normalize(centres, dim=-1) if normalize_centres else centres
    return nearest_centre(F.normalize(user_emb, dim=-1), c)


CentreGradient = Literal["reference", "tangent"]
# The pull of an alternative cluster loss: (ĥ [B, D], ĉ [k, D], shard) -> the sum over this
# rank's users of each user's squared distance to its own centre(s) (a scalar).
Pull = Callable[[torch.Tensor, torch.Tensor, BatchShard], torch.Tensor]


def _pull_plus_uniformity(
    name: str,
    user_emb: torch.Tensor,
    centres: torch.Tensor,
    *,
    pull: Pull,
    centre_gradient: CentreGradient,
    shard: BatchShard,
) -> torch.Tensor:
    """``(1/B) Σ_i pull_i + log mean_{i≠j} exp(−2 ||ĉ_i − ĉ_j||²)`` on L2-normalised rows: the
    body both alternative cluster losses share; they differ only in whom a user is pulled to.

    The second term is the uniformity loss of Wang & Isola (2020) over distinct centre pairs:
    it spreads individual centres apart, where the published spread term sees only their mean.
    user_emb [B, D], centres [k, D] (k >= 2). Under a ``shard`` the pull is summed over local
    users and divided by B_global and the centre term (identical on every rank) is divided by
    the world size. ``centre_gradient`` as in ``cluster_loss``.
    """
    _check(
        user_emb.dim() == 2 and centres.dim() == 2 and user_emb.shape[1] == centres.shape[1],
        f"{name}: expected user_emb [B, D] and centres [k, D], got "
        f"{tuple(user_emb.shape)} and {tuple(centres.shape)}",
    )
    _check(centres.shape[0] >= 2, f"{name}: needs at least 2 centres")
    h = F.normalize(user_emb, dim=-1)  # [B, D]
    c = normalize_centres(centres, centre_gradient)  # [k, D]
    return pull(h, c, shard) / shard.rows(h.shape[0]) + uniformity(c) / shard.world


def _pull_to_nearest(h: torch.Tensor, c: torch.Tensor, shard: BatchShard) -> torch.Tensor:
    """Σ_i ||ĥ_i − ĉ_{a(i)}||², a(i) the nearest centre (gradient to the chosen rows)."""
    assigned = c[nearest_centre(h.detach(), c.detach())]  # [B, D]
    return (h - assigned).pow(2).sum(-1).sum()


def _pull_balanced(h: torch.Tensor, c: torch.Tensor, shard: BatchShard) -> torch.Tensor:
    """Σ_i Σ_j Q_ij ||ĥ_i − ĉ_j||², Q the balanced assignment of the *global* batch."""
    everyone = shard.gather(h.detach())  # [B_global, D]
    q = balanced_assignment(everyone @ c.detach().T)  # [B_global, k]
    mine = q[shard.offset : shard.offset + h.shape[0]].to(h.dtype)  # [B, k]
    # sum_j Q_ij ||h_i − c_j||² = ||h_i||² Σ_j Q_ij + Σ_j Q_ij ||c_j||² − 2 h_i·(Q c)_i
    per_user = (
        h.pow(2).sum(-1) * mine.sum(-1) + mine @ c.pow(2).sum(-1) - 2.0 * (h * (mine @ c)).sum(-1)
    )
    return per_user.sum()


def assigned_uniform_cluster_loss(
    user_emb: torch.Tensor,
    centres: torch.Tensor,
    *,
    centre_gradient: CentreGradient = "reference",
    shard: BatchShard = LOCAL,
) -> torch.Tensor:
    """An alternative cluster loss (ours, ``loss.cluster_form: assigned_uniform``).

    ``mean_i ||ĥ_i − ĉ_{a(i)}||² + uniformity``, a(i) the nearest centre of user i: the k-means
    objective, each user pulled to its own centre and that centre to its users (the published
    loss pulls every user to the mean of all centres). See ``_pull_plus_uniformity``.
    """
    return _pull_plus_uniformity(
        "assigned_uniform_cluster_loss", user_emb, centres,
        pull=_pull_to_nearest, centre_gradient=centre_gradient, shard=shard,
    )


def balanced_assignment(
    scores: torch.Tensor, *, epsilon: float = 0.05, iterations: int = 3
) -> torch.Tensor:
    """Soft assignment of B users to k centres with equal shares (Sinkhorn-Knopp, as in SwAV).

    scores [B, k] (cosine similarities) -> Q [B, k], float64, no gradient: rows sum to 1 (each
    user's assignment) and, as ``iterations`` grows, every column sums to B/k (every centre
    gets an equal share of the batch). ``epsilon`` is the entropic regularisation.
    """
    with torch.no_grad():
        q = torch.exp((scores.double() - scores.max().double()) / epsilon).T  # [k, B]
        q /= q.sum()
        k, b = q.shape
        for _ in range(iterations):
            q /= q.sum(dim=1, keepdim=True) * k  # every centre's mass 1/k
            q /= q.sum(dim=0, keepdim=True) * b  # every user's mass 1/B
        return (q * b).T


def balanced_uniform_cluster_loss(
    user_emb: torch.Tensor,
    centres: torch.Tensor,
    *,
    centre_gradient: CentreGradient = "reference",
    shard: BatchShard = LOCAL,
) -> torch.Tensor:
    """An alternative cluster loss (ours, ``loss.cluster_form: balanced_uniform``).

    ``(1/B) sum_i sum_j Q_ij ||ĥ_i − ĉ_j||² + uniformity``, with Q the balanced soft assignment
    of the *global* batch (``balanced_assignment`` of ĥ·ĉ, no gradient). Like
    ``assigned_uniform`` each user is pulled to its own centres, but the equal-share constraint
    keeps one centre from capturing every user (the hard nearest assignment lets it).
    """
    return _pull_plus_uniformity(
        "balanced_uniform_cluster_loss", user_emb, centres,
        pull=_pull_balanced, centre_gradient=centre_gradient, shard=shard,
    )


def _published(
    user_emb: torch.Tensor, centres: torch.Tensor, config: LossConfig, shard: BatchShard
) -> torch.Tensor:
    return cluster_loss(
        user_emb, centres, pairs=config.cluster_pairs,
        centre_gradient=config.centre_gradient, shard=shard,
    )


def _assigned_uniform(
    user_emb: torch.Tensor, centres: torch.Tensor, config: LossConfig, shard: BatchShard
) -> torch.Tensor:
    return assigned_uniform_cluster_loss(
        user_emb, centres, centre_gradient=config.centre_gradient, shard=shard
    )


def _balanced_uniform(
    user_emb: torch.Tensor, centres: torch.Tensor, config: LossConfig, shard: BatchShard
) -> torch.Tensor:
    return balanced_uniform_cluster_loss(
        user_emb, centres, centre_gradient=config.centre_gradient, shard=shard
    )


# ``loss.cluster_form`` -> the cluster term: (user_emb [B, D], centres [k, D], loss config,
# shard) -> this rank's contribution. Config validation accepts exactly these names.
ClusterTerm = Callable[[torch.Tensor, torch.Tensor, LossConfig, BatchShard], torch.Tensor]
CLUSTER_FORMS: dict[str, ClusterTerm] = {
    "published": _published,
    "assigned_uniform": _assigned_uniform,
    "balanced_uniform": _balanced_uniform,
}


def uniformity(c: torch.Tensor) -> torch.Tensor:
    """``log mean_{i≠j} exp(−2 ||c_i − c_j||²)`` over distinct rows of c [k, D] (Wang & Isola,
    2020)."""
    k = c.shape[0]
    sq = c.pow(2).sum(-1)
    pair_sq = (sq[:, None] + sq[None, :] - 2.0 * (c @ c.T)).clamp(min=0.0)  # [k, k]
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=c.device)
    return torch.logsumexp(-2.0 * pair_sq[off_diagonal], dim=0) - math.log(k * (k - 1))


def fuse_intents(
    view_hidden: torch.Tensor,
    centres: torch.Tensor,
    fusion: Literal["shift", "concat", "none"],
) -> torch.Tensor:
    """Fuse each time step with its nearest centre and flatten over time (spec item 4).

    view_hidden [R, T, D] (un-normalised hidden states); centres [k, D] (the raw parameter rows,
    so the fused centre receives gradient). ``shift``: ``h_t + c(h_t)`` -> [R, T·D];
    ``concat``: ``[h_t; c(h_t)]`` per time step -> [R, T·2D]; ``none``: no fusion, the
    flattened states [R, T·D] (ICLRec's sequence CL).
    """
    r, t, d = view_hidden.shape
    if fusion == "none":
        return view_hidden.reshape(r, -1)
    assigned = centres[nearest_centre(view_hidden.reshape(r * t, d), centres)].view(r, t, d)
    if fusion == "shift":
        fused = view_hidden + assigned
    elif fusion == "concat":
        fused = torch.cat([view_hidden, assigned], dim=-1)
    else:
        raise ValueError(
            f"fuse_intents: fusion must be 'shift', 'concat' or 'none', got {fusion!r}"
        )
    return fused.reshape(r, -1)


class _Gram(torch.autograd.Function):
    """``z @ z.T`` whose backward is one product, ``(G + G.T) @ z``, where autograd would run
    two (``G @ z`` for the left factor, ``G.T @ z`` for the right) and add them. The same
    gradient up to float rounding; in NT-Xent's backward that product, [2M, 2M] x [2M, F], is
    the largest of the step (F = T x D = 3200 features on Beauty)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return z @ z.T

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return (grad + grad.T) @ z


def nt_xent(
    a: torch.Tensor, b: torch.Tensor, *, temperature: float, rows: slice | None = None
) -> torch.Tensor:
    """Symmetric NT-Xent (InfoNCE) with raw dot products and in-batch negatives.

    a, b [M, F]. Row i of ``a`` has positive ``b_i`` and negatives ``b_j``, ``a_j`` (j ≠ i);
    rows of ``b`` likewise. Returns the cross-entropy over the 2M − 1 candidates of each row,
    averaged over the 2M rows. With ``rows`` (a range of i), only the queries ``a_i`` and
    ``b_i`` of those rows are scored and their cross-entropies are summed and divided by 2M:
    a rank's share of the mean, whose sum over disjoint ranges is the full loss.
    """
    _check(
        a.dim() == 2 and a.shape == b.shape,
        f"nt_xent: a and b must both be [M, F], got {tuple(a.shape)} and {tuple(b.shape)}",
    )
    m = a.shape[0]
    z = torch.cat([a, b], dim=0)  # [2M, F]
    if rows is None:  # every query: the symmetric [2M, 2M] similarity matrix
        index = torch.arange(2 * m, device=z.device)
        logits = _Gram.apply(z) / temperature  # [2M, 2M]
        logits.diagonal().fill_(float("-inf"))  # never itself
    else:
        local = torch.arange(m, device=z.device)[rows]
        index = torch.cat([local, local + m])  # the queries a_i and b_i of this range
        logits = (z[index] @ z.T) / temperature  # [R, 2M]
        logits[torch.arange(len(index), device=z.device), index] = float("-inf")  # never itself
    positive = (index + m) % (2 * m)  # a_i <-> b_i
    return F.cross_entropy(logits, positive, reduction="sum") / (2 * m)


def _halves(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(views.shape[0] % 2 == 0, f"views must have 2B rows, got {views.shape[0]}")
    # split, not two slices: its backward concatenates the halves' gradients where each
    # slice's would write into a zero-filled tensor of the whole
    first, second = views.split(views.shape[0] // 2)
    return first, second


def seq_cl_loss(
    view_hidden: torch.Tensor,
    centres: torch.Tensor,
    *,
    fusion: Literal["shift", "concat", "none"],
    temperature: float,
    shard: BatchShard = LOCAL,
) -> torch.Tensor:
    """Sequence contrastive loss with intent fusion (spec item 4).

    view_hidden [2B, T, D] (rows 0..B-1 view 1, B..2B-1 view 2); centres [k, D].
    """
    view_1, view_2 = _halves(fuse_intents(view_hidden, centres, fusion))  # [B, T·D'] each
    return _sharded_nt_xent(view_1, view_2, temperature=temperature, shard=shard)


def _sharded_nt_xent(
    a: torch.Tensor, b: torch.Tensor, *, temperature: float, shard: BatchShard
) -> torch.Tensor:
    """This rank's contribution to NT-Xent over the global batch (or its local share)."""
    local_rows = a.shape[0]
    if shard.world == 1 and shard.global_rows in (None, local_rows):
        return nt_xent(a, b, temperature=temperature)
    if shard.local_negatives:
        weight = local_rows / shard.rows(local_rows)
        return nt_xent(a, b, temperature=temperature) * weight
    # Global negatives: gather every rank's rows (with gradient), score only this rank's
    # queries. Each rank adds ``rows``/2M_global; the contributions sum to the global mean.
    all_a, all_b = shard.gather(a), shard.gather(b)
    mine = slice(shard.offset, shard.offset + local_rows)
    return nt_xent(all_a, all_b, temperature=temperature, rows=mine)


def intent_cl_loss(
    view_hidden: torch.Tensor,
    user_emb: torch.Tensor,
    centres: torch.Tensor,
    *,
    temperature: float,
    shard: BatchShard = LOCAL,
    normalize_centres: bool = True,
) -> torch.Tensor:
    """Intent contrastive loss (spec item 5).

    view_hidden [2B, T, D]; user_emb [B, D], the un-augmented mean-pooled embeddings;
    centres [k, D]. User i's positive is the raw centre row nearest (after L2-normalising both)
    to its embedding, so gradient reaches that row. NT-Xent of each mean-pooled view against the
    assigned centres, averaged over the two views. ``normalize_centres=False`` assigns to the
    centres as they are (k-means centroids of normalised embeddings: the rule k-means itself
    used, for the ``epoch_kmeans`` intents).
    """
    _check(
        view_hidden.shape[0] == 2 * user_emb.shape[0],
        f"intent_cl_loss: view_hidden has {view_hidden.shape[0]} rows, expected 2 x "
        f"{user_emb.shape[0]} users",
    )
    assignment = assign_users(user_emb, centres, normalize_centres=normalize_centres)
    positives = centres[assignment]  # [B, D]
    view_1, view_2 = _halves(ELCRec.pooled(view_hidden))  # [B, D] each
    return 0.5 * (
        _sharded_nt_xent(view_1, positives, temperature=temperature, shard=shard)
        + _sharded_nt_xent(view_2, positives, temperature=temperature, shard=shard)
    )


def elcrec_terms(
    model: ELCRec,
    batch: TrainBatch,
    config: LossConfig,
    shard: BatchShard = LOCAL,
    *,
    record: dict[str, torch.Tensor] | None = None,
    normalised_centres: bool = True,
) -> dict[str, torch.Tensor]:
    """Every loss term with a non-zero weight, by name (``next_item`` always): this rank's
    contributions under ``shard`` (see ``BatchShard``), the terms themselves in a world of one.
    If ``record`` is given, ``record["assignment"]`` receives each user's nearest centre [B]
    (for centre statistics; no gradient). ``normalised_centres``: users are assigned to the
    L2-normalised centres (learned intents); False assigns to the centres as they are (the
    k-means centroids of ``model.intents: epoch_kmeans``, by the rule k-means itself used).

    One encoder pass over the B inputs and the 2B augmented views together (3B rows) serves
    every term: the input rows the next-item and cluster terms (and the intent assignment), the
    view rows both contrastive terms. The reference run encoded the views twice, in separate
    calls; rows do not interact in the encoder, so the numbers are the same for less work.
    Views are left out when both contrastive weights are 0.
    """
    b, t = batch.inputs.shape
    _check(
        batch.targets.shape == (b, t) and batch.negatives.shape == (b, t),
        f"TrainBatch: targets {tuple(batch.targets.shape)} and negatives "
        f"{tuple(batch.negatives.shape)} must match inputs [B, T] = [{b}, {t}]",
    )
    centres = model.cluster_centers
    with_views = config.seq_cl_weight > 0 or config.intent_cl_weight > 0
    if with_views:
        _check(
            batch.views.shape == (2 * b, t),
            f"TrainBatch: views {tuple(batch.views.shape)} must be [2B, T] = [{2 * b}, {t}]",
        )
        encoded = model(torch.cat([batch.inputs, batch.views]))  # [3B, T, D]
        hidden, view_hidden = encoded.split([b, 2 * b])  # [B, T, D], [2B, T, D]
    else:
        hidden = model(batch.inputs)  # [B, T, D]
    table = model.item_embeddings.weight
    terms = {
        "next_item": next_item_softmax_loss(
            hidden, batch.targets, table, shard, max_logits=config.softmax_max_logits
        )
        if config.next_item == "softmax"
        else next_item_loss(hidden, batch.targets, batch.negatives, table, shard)
    }
    user_emb = model.pooled(hidden)  # [B, D]
    if record is not None:
        record["assignment"] = assign_users(
            user_emb.detach(), centres.detach(), normalize_centres=normalised_centres
        )
    if config.cluster_weight > 0:
        terms["cluster"] = CLUSTER_FORMS[config.cluster_form](user_emb, centres, config, shard)
    if with_views:
        if config.seq_cl_weight > 0:
            terms["seq_cl"] = seq_cl_loss(
                view_hidden, centres, fusion=config.fusion, temperature=config.seq_cl_tau,
                shard=shard,
            )
        if config.intent_cl_weight > 0:
            terms["intent_cl"] = intent_cl_loss(
                view_hidden, user_emb, centres, temperature=config.temperature, shard=shard,
                normalize_centres=normalised_centres,
            )
    return terms


def weighted_total(terms: dict[str, torch.Tensor], config: LossConfig) -> torch.Tensor:
    """The one place weights are applied (spec item 6):
    ``next_item + seq_cl_weight·seq_cl + intent_cl_weight·intent_cl + cluster_weight·cluster``.

    A term whose weight is 0 is left out even if present (so a NaN in it cannot leak in); a term
    with a non-zero weight must be present.
    """
    weights = {
        "seq_cl": config.seq_cl_weight,
        "intent_cl": config.intent_cl_weight,
        "cluster": config.cluster_weight,
    }
    unknown = sorted(set(terms) - set(TERMS))
    _check(not unknown, f"weighted_total: unknown term(s) {unknown} (known: {list(TERMS)})")
    missing = [
        name for name in ("next_item", *weights) if name not in terms and weights.get(name, 1)
    ]
    _check(not missing, f"weighted_total: term(s) {missing} have non-zero weight but are missing")
    total = terms["next_item"]
    for name, weight in weights.items():
        if weight != 0:
            total = total + weight * terms[name]
    return total
