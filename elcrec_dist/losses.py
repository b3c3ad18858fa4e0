"""Named loss terms of ELCRec (spec: "Losses", items 1, 2, 4, 5, 6).

Every term is a pure function of tensors; ``elcrec_terms`` runs the encoder and returns the terms
by name, and ``weighted_total`` is the one place the configured weights are applied.

Shapes: B users, T = max_len positions, D hidden size, k centres, N items (ids 1..N, 0 = padding),
M rows of a contrastive batch, F features per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from elcrec_dist.config import LossConfig
from elcrec_dist.model import ELCRec

TERMS = ("next_item", "seq_cl", "intent_cl", "cluster")


@dataclass(frozen=True)
class TrainBatch:
    """One training batch of B users.

    inputs:    [B, T] int64, left-padded newest items of ``seq[:-3]``;
    targets:   [B, T] int64, the next item at every position (0 where the input is padding);
    negatives: [B, T] int64, one item per position the user never interacted with;
    views:     [2B, T] int64, two augmented views of every input (rows 0..B-1 view 1, B..2B-1
               view 2), from ``elcrec_dist.augment.two_views``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    negatives: torch.Tensor
    views: torch.Tensor


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def next_item_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    item_table: torch.Tensor,
) -> torch.Tensor:
    """Binary cross-entropy of the next item against one negative, at every non-padded position.

    hidden [B, T, D]; targets, negatives [B, T] (target 0 = padding position, ignored);
    item_table [N + 1, D]. Returns the mean over non-padded positions of
    ``-log σ(h·e_pos) - log(1 - σ(h·e_neg))`` (0 if there is none).
    """
    _check(
        targets.shape == hidden.shape[:2] and negatives.shape == targets.shape,
        f"next_item_loss: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)} and "
        f"negatives {tuple(negatives.shape)} must share [B, T]",
    )
    pos_logits = (hidden * item_table[targets]).sum(-1)  # [B, T]
    neg_logits = (hidden * item_table[negatives]).sum(-1)  # [B, T]
    # log(1 - σ(x)) = logσ(-x): stable where the reference's log(σ + 1e-24) saturates.
    per_position = -(F.logsigmoid(pos_logits) + F.logsigmoid(-neg_logits))  # [B, T]
    real = (targets > 0).to(per_position.dtype)
    return (per_position * real).sum() / real.sum().clamp(min=1.0)


def cluster_loss(
    user_emb: torch.Tensor,
    centres: torch.Tensor,
    *,
    pairs: Literal["all", "distinct"],
) -> torch.Tensor:
    """``mean_{i,j} ||ĥ_i − ĉ_j||² − mean_{pairs} ||ĉ_i − ĉ_j||²`` on L2-normalised rows.

    user_emb [B, D] (un-normalised mean-pooled embeddings); centres [k, D]. ``pairs="all"``
    averages the centre term over all k² pairs, diagonal included (reference run);
    ``"distinct"`` over the k(k−1) pairs i ≠ j (the paper's equation).

    Computed without any [B, k] or [B, k, D] tensor, through
    ``mean_{i,j} ||x_i − y_j||² = mean_i ||x_i||² + mean_j ||y_j||² − 2 x̄·ȳ``.
    The squared norms are kept (not assumed 1) so a zero row, which F.normalize leaves at 0,
    is handled exactly.
    """
    _check(
        user_emb.dim() == 2 and centres.dim() == 2 and user_emb.shape[1] == centres.shape[1],
        f"cluster_loss: expected user_emb [B, D] and centres [k, D], got "
        f"{tuple(user_emb.shape)} and {tuple(centres.shape)}",
    )
    k = centres.shape[0]
    h = F.normalize(user_emb, dim=-1)  # [B, D]
    c = F.normalize(centres, dim=-1)  # [k, D]
    h_sq = h.pow(2).sum(-1).mean()
    c_sq = c.pow(2).sum(-1).mean()
    h_mean, c_mean = h.mean(0), c.mean(0)  # [D], [D]
    pull = h_sq + c_sq - 2.0 * (h_mean @ c_mean)
    spread_all = 2.0 * c_sq - 2.0 * (c_mean @ c_mean)  # mean over all k² pairs
    if pairs == "all":
        spread = spread_all
    elif pairs == "distinct":
        _check(k >= 2, "cluster_loss: pairs='distinct' needs at least 2 centres")
        spread = spread_all * (k / (k - 1))  # the diagonal pairs contribute 0
    else:
        raise ValueError(f"cluster_loss: pairs must be 'all' or 'distinct', got {pairs!r}")
    return pull - spread


def nearest_centre(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre in squared Euclidean distance; ties go to the lowest index.

    x [M, D], centres [k, D] -> [M] int64. ``||x||²`` is the same for every centre of a row, so
    ``||c||² − 2 x·c`` orders centres exactly as the distance does.
    """
    _check(
        x.dim() == 2 and centres.dim() == 2 and x.shape[1] == centres.shape[1],
        f"nearest_centre: expected x [M, D] and centres [k, D], got "
        f"{tuple(x.shape)} and {tuple(centres.shape)}",
    )
    with torch.no_grad():
        scores = centres.pow(2).sum(-1)[None, :] - 2.0 * (x @ centres.T)  # [M, k]
        return scores.argmin(dim=1)  # argmin returns the first minimum


def fuse_intents(
    view_hidden: torch.Tensor,
    centres: torch.Tensor,
    fusion: Literal["shift", "concat"],
) -> torch.Tensor:
    """Fuse each time step with its nearest centre and flatten over time (spec item 4).

    view_hidden [R, T, D] (un-normalised hidden states); centres [k, D] (the raw parameter rows,
    so the fused centre receives gradient). ``shift``: ``h_t + c(h_t)`` -> [R, T·D];
    ``concat``: ``[h_t; c(h_t)]`` per time step -> [R, T·2D].
    """
    r, t, d = view_hidden.shape
    assigned = centres[nearest_centre(view_hidden.reshape(r * t, d), centres)].view(r, t, d)
    if fusion == "shift":
        fused = view_hidden + assigned
    elif fusion == "concat":
        fused = torch.cat([view_hidden, assigned], dim=-1)
    else:
        raise ValueError(f"fuse_intents: fusion must be 'shift' or 'concat', got {fusion!r}")
    return fused.reshape(r, -1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent (InfoNCE) with raw dot products and in-batch negatives.

    a, b [M, F]. Row i of ``a`` has positive ``b_i`` and negatives ``b_j``, ``a_j`` (j ≠ i);
    rows of ``b`` likewise. Returns the cross-entropy over the 2M − 1 candidates of each row,
    averaged over the 2M rows. A pure function of its inputs: a distributed caller gathers
    ``a`` and ``b`` across ranks first.
    """
    _check(
        a.dim() == 2 and a.shape == b.shape,
        f"nt_xent: a and b must both be [M, F], got {tuple(a.shape)} and {tuple(b.shape)}",
    )
    m = a.shape[0]
    z = torch.cat([a, b], dim=0)  # [2M, F]
    logits = (z @ z.T) / temperature  # [2M, 2M]
    self_pair = torch.eye(2 * m, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))  # a row is never its own candidate
    positive = torch.arange(2 * m, device=z.device).roll(m)  # a_i <-> b_i
    return F.cross_entropy(logits, positive)


def _halves(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(views.shape[0] % 2 == 0, f"views must have 2B rows, got {views.shape[0]}")
    half = views.shape[0] // 2
    return views[:half], views[half:]


def seq_cl_loss(
    view_hidden: torch.Tensor,
    centres: torch.Tensor,
    *,
    fusion: Literal["shift", "concat"],
    temperature: float,
) -> torch.Tensor:
    """Sequence contrastive loss with intent fusion (spec item 4).

    view_hidden [2B, T, D] (rows 0..B-1 view 1, B..2B-1 view 2); centres [k, D].
    """
    view_1, view_2 = _halves(fuse_intents(view_hidden, centres, fusion))  # [B, T·D'] each
    return nt_xent(view_1, view_2, temperature=temperature)


def intent_cl_loss(
    view_hidden: torch.Tensor,
    user_emb: torch.Tensor,
    centres: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """Intent contrastive loss (spec item 5).

    view_hidden [2B, T, D]; user_emb [B, D], the un-augmented mean-pooled embeddings;
    centres [k, D]. User i's positive is the raw centre row nearest (after L2-normalising both)
    to its embedding, so gradient reaches that row. NT-Xent of each mean-pooled view against the
    assigned centres, averaged over the two views.
    """
    _check(
        view_hidden.shape[0] == 2 * user_emb.shape[0],
        f"intent_cl_loss: view_hidden has {view_hidden.shape[0]} rows, expected 2 x "
        f"{user_emb.shape[0]} users",
    )
    assignment = nearest_centre(F.normalize(user_emb, dim=-1), F.normalize(centres, dim=-1))
    positives = centres[assignment]  # [B, D]
    view_1, view_2 = _halves(ELCRec.pooled(view_hidden))  # [B, D] each
    return 0.5 * (
        nt_xent(view_1, positives, temperature=temperature)
        + nt_xent(view_2, positives, temperature=temperature)
    )


def elcrec_terms(model: ELCRec, batch: TrainBatch, config: LossConfig) -> dict[str, torch.Tensor]:
    """Every loss term with a non-zero weight, by name (``next_item`` always).

    One encoder pass over ``batch.inputs`` serves the next-item and cluster terms (and the
    intent assignment); one pass over the 2B ``batch.views`` serves both contrastive terms (the
    reference run encoded the views twice; same semantics, half the work). The views pass is
    skipped when both contrastive weights are 0.
    """
    b, t = batch.inputs.shape
    _check(
        batch.targets.shape == (b, t) and batch.negatives.shape == (b, t),
        f"TrainBatch: targets {tuple(batch.targets.shape)} and negatives "
        f"{tuple(batch.negatives.shape)} must match inputs [B, T] = [{b}, {t}]",
    )
    centres = model.cluster_centers
    hidden = model(batch.inputs)  # [B, T, D]
    terms = {
        "next_item": next_item_loss(
            hidden, batch.targets, batch.negatives, model.item_embeddings.weight
        )
    }
    user_emb = model.pooled(hidden)  # [B, D]
    if config.cluster_weight > 0:
        terms["cluster"] = cluster_loss(user_emb, centres, pairs=config.cluster_pairs)
    if config.seq_cl_weight > 0 or config.intent_cl_weight > 0:
        _check(
            batch.views.shape == (2 * b, t),
            f"TrainBatch: views {tuple(batch.views.shape)} must be [2B, T] = [{2 * b}, {t}]",
        )
        view_hidden = model(batch.views)  # [2B, T, D]
        if config.seq_cl_weight > 0:
            terms["seq_cl"] = seq_cl_loss(
                view_hidden, centres, fusion=config.fusion, temperature=config.temperature
            )
        if config.intent_cl_weight > 0:
            terms["intent_cl"] = intent_cl_loss(
                view_hidden, user_emb, centres, temperature=config.temperature
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
