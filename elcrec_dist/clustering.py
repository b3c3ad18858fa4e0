"""k-means in plain torch, plus the scores used to compare clusterings.

Spec: ``shared/docs/elcrec-method.md``, "Centres: start and keep-up": the centres start from
k-means (the reference run used faiss, 20 iterations, 5 restarts) on L2-normalised mean-pooled
embeddings of the untrained model. faiss is not a dependency here; this module does the same job
on whatever device ``x`` lives on.

- Seeding is k-means++ (D² sampling, Arthur & Vassilvitskii 2007), one candidate per centre.
- Lloyd iterations stop early once no assignment changes.
- An empty cluster is re-seeded to the point farthest from its assigned centre (farthest first,
  ties to the lower point index), so no centre ever becomes 0/0 = NaN.
- Restarts keep the run with the lowest inertia (ties: the earliest run). ``restarts=R`` draws
  from the generator exactly as R consecutive ``restarts=1`` calls do.
- All [M, k] distance work is chunked (``CHUNK_ELEMENTS`` per chunk), so memory stays bounded at
  M ~ 1e6, k ~ 1024. Centre sums use a one-hot matmul rather than ``index_add_``, which keeps the
  result deterministic on CUDA as well (no atomics).

Shapes: M points, D dimensions, k clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22  # ~16 MiB of float32 per temporary [rows, k] or [rows, D] block


@dataclass(frozen=True)
class KMeansResult:
    centres: Tensor  # [k, D], dtype of the computation (float32 or float64)
    assignments: Tensor  # [M] int64, nearest centre of each point under ``centres``
    inertia: float  # sum over points of the squared distance to their assigned centre


# ----------------------------------------------------------------------------------------------
# Distances


def _rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, width))


def _nearest(x: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centre by squared Euclidean distance: x [M, D], centres [k, D] -> ([M] int64, [M]).

    Uses ||x||² - 2 x·c + ||c||² per chunk of rows (clamped at 0: the expansion can go slightly
    negative in floating point). Ties go to the lower centre index.
    """
    m = x.shape[0]
    k = centres.shape[0]
    c_sq = (centres * centres).sum(dim=1)  # [k]
    index = torch.empty(m, dtype=torch.int64, device=x.device)
    dist = torch.empty(m, dtype=x.dtype, device=x.device)
    step = _rows_per_chunk(max(k, x.shape[1]))
    for start in range(0, m, step):
        chunk = x[start : start + step]  # [r, D]
        d = (chunk * chunk).sum(dim=1, keepdim=True) - 2.0 * (chunk @ centres.T) + c_sq  # [r, k]
        d.clamp_(min=0.0)
        values, idx = d.min(dim=1)
        index[start : start + step] = idx
        dist[start : start + step] = values
    return index, dist


def _sq_dist_to_point(x: Tensor, x_sq: Tensor, point: Tensor) -> Tensor:
    """Squared distance of every row of x [M, D] to one point [D] -> [M].

    ``x_sq`` [M] holds the squared row norms. One matrix-vector product, no [M, D] temporary.
    """
    d = x_sq - 2.0 * (x @ point) + (point * point).sum()
    return d.clamp_(min=0.0)


def _inertia(x: Tensor, centres: Tensor, assignments: Tensor) -> float:
    """Exact sum of squared distances to the assigned centres, accumulated in float64."""
    total = 0.0
    step = _rows_per_chunk(x.shape[1])
    for start in range(0, x.shape[0], step):
        diff = (x[start : start + step] - centres[assignments[start : start + step]]).double()
        total += float((diff * diff).sum())
    return total


# ----------------------------------------------------------------------------------------------
# Seeding and Lloyd


def _uniform(generator: torch.Generator) -> float:
    """One draw from U[0, 1) on the generator's own device (x may live elsewhere)."""
    return float(torch.rand((), generator=generator, device=generator.device, dtype=torch.float64))


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centre is a point drawn with probability ∝ D(x)².

    Exactly k uniform draws per call, whatever the data: when every point already coincides with
    a centre (D² all zero, e.g. fewer distinct points than k), the draw picks a point uniformly.
    D² comes from the ||x||² - 2x·c + ||c||² expansion (one matvec per centre instead of an [M, D]
    temporary); its rounding residue on exact duplicates is ~1e-7 of the spread, so a duplicate is
    practically never drawn while a distinct point is left.
    """
    m = x.shape[0]
    chosen = torch.empty(k, dtype=torch.int64)
    x_sq = (x * x).sum(dim=1)  # [M]
    first = min(int(_uniform(generator) * m), m - 1)
    chosen[0] = first
    min_d2 = _sq_dist_to_point(x, x_sq, x[first])  # [M]
    for j in range(1, k):
        u = _uniform(generator)
        cumulative = torch.cumsum(min_d2.double(), dim=0)  # [M]
        total = float(cumulative[-1])
        if total > 0.0:
            target = torch.tensor([u * total], dtype=torch.float64, device=x.device)
            # First index whose running sum exceeds the target: zero-weight points are never hit.
            pick = int(torch.searchsorted(cumulative, target, right=True)[0])
            pick = min(pick, m - 1)
        else:
            pick = min(int(u * m), m - 1)
        chosen[j] = pick
        torch.minimum(min_d2, _sq_dist_to_point(x, x_sq, x[pick]), out=min_d2)
    return x[chosen.to(x.device)].clone()


def _update(x: Tensor, assignments: Tensor, distances: Tensor, k: int) -> Tensor:
    """New centres [k, D] = cluster means; empty clusters take the farthest points.

    ``distances`` [M] are the squared distances of the points to the centres they were assigned
    to. The i-th empty cluster (in index order) gets the i-th farthest point (stable sort: ties
    go to the lower point index). The donor clusters keep their means; the next assignment moves
    the point.
    """
    m, d = x.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    step = _rows_per_chunk(max(k, d))
    for start in range(0, m, step):
        idx = assignments[start : start + step]
        one_hot = torch.zeros(idx.shape[0], k, dtype=x.dtype, device=x.device)
        one_hot[torch.arange(idx.shape[0], device=x.device), idx] = 1.0
        sums += (one_hot.T @ x[start : start + step]).double()
    counts = torch.bincount(assignments, minlength=k)  # [k]
    centres = (sums / counts.clamp(min=1).unsqueeze(1).double()).to(x.dtype)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() > 0:
        order = torch.sort(distances, descending=True, stable=True).indices
        # k <= M guarantees enough donors (M - non-empty clusters >= number of empty ones).
        centres[empty] = x[order[: empty.numel()]]
    return centres


def _check_points(x: Tensor, name: str = "x") -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, D], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no dimensions (shape {tuple(x.shape)})")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half/bfloat16/int inputs: distances need float32 at least
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def lloyd_step(x: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """One Lloyd iteration: assign x [M, D] to ``centres`` [k, D], then recompute the means.

    Returns (new centres [k, D], the assignments [M] used to compute them). Empty clusters are
    re-seeded as described in the module docstring.
    """
    x = _check_points(x)
    centres = _check_points(centres, "centres").to(x.dtype)
    if centres.shape[1] != x.shape[1]:
        raise ValueError(f"centres have {centres.shape[1]} dimensions, x has {x.shape[1]}")
    assignments, distances = _nearest(x, centres)
    return _update(x, assignments, distances, centres.shape[0]), assignments


def _single_run(x: Tensor, k: int, iterations: int, generator: torch.Generator) -> KMeansResult:
    centres = _kmeans_plus_plus(x, k, generator)
    assignments, distances = _nearest(x, centres)
    for _ in range(iterations):
        centres = _update(x, assignments, distances, k)
        new_assignments, distances = _nearest(x, centres)
        changed = not torch.equal(new_assignments, assignments)
        assignments = new_assignments
        if not changed:
            break
    return KMeansResult(
        centres=centres, assignments=assignments, inertia=_inertia(x, centres, assignments)
    )


def kmeans(
    x: Tensor, k: int, *, iterations: int, restarts: int, generator: torch.Generator
) -> KMeansResult:
    """k-means of the rows of x [M, D] into k clusters; the best of ``restarts`` runs.

    Deterministic for a given generator state (and device). Raises ValueError when M < k.
    """
    x = _check_points(x)
    m = x.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if m < k:
        raise ValueError(f"k-means needs at least k points: got M={m} points for k={k} clusters")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    best: KMeansResult | None = None
    for _ in range(restarts):
        result = _single_run(x, k, iterations, generator)
        if best is None or result.inertia < best.inertia:
            best = result
    assert best is not None
    return best


NEAREST_CHUNK_ELEMENTS = 1 << 24  # [rows, k] scores per chunk of ``nearest_centre`` (64 MiB fp32)


def nearest_centre(x: Tensor, centres: Tensor) -> Tensor:
    """The nearest centre of each row (squared Euclidean distance; ties to the lowest index).

    x [M, D], centres [k, D] -> [M] int64, no gradient. This is the one assignment rule of the
    project: intent fusion, the intent-CL positives, the centre statistics and the diagnostics
    all call it. ``||x||²`` is the same for every centre of a row, so ``||c||² − 2 x·c`` orders
    centres exactly as the distance does. Rows are scored in chunks of at most
    ``NEAREST_CHUNK_ELEMENTS`` scores (a training step's [2B·T, k] fits in one), so memory
    stays bounded for millions of users. (Lloyd's iterations above keep their own expansion
    because they need each point's distance, not only the argmin.)
    """
    if x.dim() != 2 or centres.dim() != 2 or x.shape[1] != centres.shape[1]:
        raise ValueError(
            f"nearest_centre: x [M, D] and centres [k, D] must share D (dimensions), got "
            f"{tuple(x.shape)} and {tuple(centres.shape)}"
        )
    if centres.shape[0] == 0:
        raise ValueError("nearest_centre: no centres to assign to")
    with torch.no_grad():
        c_sq = centres.pow(2).sum(-1)[None, :]  # [1, k]
        rows = max(1, NEAREST_CHUNK_ELEMENTS // centres.shape[0])
        if x.shape[0] <= rows:
            return (c_sq - 2.0 * (x @ centres.T)).argmin(dim=1)  # argmin: the first minimum
        return torch.cat([
            (c_sq - 2.0 * (x[start : start + rows] @ centres.T)).argmin(dim=1)
            for start in range(0, x.shape[0], rows)
        ])


# ----------------------------------------------------------------------------------------------
# Comparing clusterings


def _labels(values: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {array.shape}")
    return array


def _contingency(labels_a: np.ndarray | Tensor, labels_b: np.ndarray | Tensor) -> np.ndarray:
    """Counts n_ij of points with label i in ``a`` and j in ``b``: -> [|A|, |B|] float64."""
    a = _labels(labels_a)
    b = _labels(labels_b)
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError("labelings are empty")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    ia = ia.reshape(-1)
    ib = ib.reshape(-1)
    rows, cols = int(ia.max()) + 1, int(ib.max()) + 1
    flat = np.bincount(ia * cols + ib, minlength=rows * cols)
    return flat.reshape(rows, cols).astype(np.float64)


def _entropy(counts: np.ndarray, n: float) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_a: np.ndarray | Tensor, labels_b: np.ndarray | Tensor) -> float:
    """NMI = I(A; B) / ((H(A) + H(B)) / 2), natural log (the base cancels).

    Label values are arbitrary (only the partition matters). Two labelings that both put every
    point in one cluster score 1.0 (0/0 resolved as "identical partitions").
    """
    table = _contingency(labels_a, labels_b)
    n = float(table.sum())
    h_a = _entropy(table.sum(axis=1), n)
    h_b = _entropy(table.sum(axis=0), n)
    if h_a + h_b == 0.0:
        return 1.0
    nz = table > 0
    p_ab = table[nz] / n
    outer = np.outer(table.sum(axis=1), table.sum(axis=0))[nz] / (n * n)
    mi = float((p_ab * np.log(p_ab / outer)).sum())
    return float(min(1.0, max(0.0, mi / ((h_a + h_b) / 2.0))))


def adjusted_rand_index(labels_a: np.ndarray | Tensor, labels_b: np.ndarray | Tensor) -> float:
    """Hubert-Arabie adjusted Rand index: (index - expected) / (max - expected).

    index = Σ_ij C(n_ij, 2), a = Σ_i C(a_i, 2), b = Σ_j C(b_j, 2), expected = a·b / C(n, 2),
    max = (a + b) / 2. The denominator is 0 only when both labelings are the same trivial
    partition (one cluster, or all singletons); that scores 1.0. Float64 throughout, so counts
    up to ~1e7 points do not overflow.
    """
    table = _contingency(labels_a, labels_b)
    n = float(table.sum())

    def pairs(v: np.ndarray | float) -> np.ndarray | float:
        return v * (v - 1.0) / 2.0

    total_pairs = float(pairs(n))
    index = float(np.sum(pairs(table)))
    sum_a = float(np.sum(pairs(table.sum(axis=1))))
    sum_b = float(np.sum(pairs(table.sum(axis=0))))
    if total_pairs == 0.0:
        return 1.0  # a single point: nothing to disagree on
    expected = sum_a * sum_b / total_pairs
    maximum = (sum_a + sum_b) / 2.0
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))
