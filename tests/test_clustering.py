"""k-means, assignment and clustering scores (elcrec_dist.clustering) against hand-made cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from elcrec_dist.clustering import (
    adjusted_rand_index,
    kmeans,
    lloyd_step,
    nearest_centre,
    normalized_mutual_info,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(k: int = 6, per: int = 50, dim: int = 8, spread: float = 0.05, seed: int = 0):
    """k well-separated Gaussian blobs: means far apart (>= ~10) relative to the noise (0.05)."""
    g = _gen(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * 10.0
    labels = torch.arange(k).repeat_interleave(per)
    points = means[labels] + spread * torch.randn(k * per, dim, generator=g, dtype=torch.float64)
    perm = torch.randperm(k * per, generator=g)
    return points[perm], labels[perm], means


def _naive_lloyd_step(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd step by plain loops, with the documented empty-cluster rule."""
    m, k = x.shape[0], centres.shape[0]
    assignments = np.zeros(m, dtype=np.int64)
    distances = np.zeros(m)
    for i in range(m):
        best, best_d = 0, math.inf
        for j in range(k):
            d = sum((x[i, t] - centres[j, t]) ** 2 for t in range(x.shape[1]))
            if d < best_d:  # strict: ties keep the lower index
                best, best_d = j, d
        assignments[i], distances[i] = best, best_d
    new = np.zeros_like(centres)
    empty = []
    for j in range(k):
        members = [x[i] for i in range(m) if assignments[i] == j]
        if members:
            new[j] = np.mean(members, axis=0)
        else:
            empty.append(j)
    # farthest points first, ties to the lower point index
    order = sorted(range(m), key=lambda i: (-distances[i], i))
    for slot, j in enumerate(empty):
        new[j] = x[order[slot]]
    return new, assignments


def _best_permutation_match(found: np.ndarray, planted: np.ndarray) -> bool:
    """True when found labels equal planted labels under one relabelling (a bijection)."""
    mapping: dict[int, int] = {}
    for f, p in zip(found.tolist(), planted.tolist(), strict=True):
        if mapping.setdefault(f, p) != p:
            return False
    return len(set(mapping.values())) == len(mapping)


# ----------------------------------------------------------------------------------------------
# k-means


def test_recovers_planted_blobs() -> None:
    x, labels, means = _blobs()
    result = kmeans(x, 6, iterations=20, restarts=3, generator=_gen(1))
    assert result.centres.shape == (6, 8)
    assert result.assignments.dtype == torch.int64 and result.assignments.shape == (300,)
    assert _best_permutation_match(result.assignments.numpy(), labels.numpy())
    assert normalized_mutual_info(result.assignments, labels) == pytest.approx(1.0, abs=1e-12)
    assert adjusted_rand_index(result.assignments, labels) == pytest.approx(1.0, abs=1e-12)
    # each found centre is within a few noise-widths of exactly one true mean
    dist = torch.cdist(result.centres, means)  # [k, k]
    nearest = dist.argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(6))
    assert float(dist.min(dim=1).values.max()) < 0.1
    # the reported inertia is the sum of squared distances to the assigned centres
    expected = float(((x - result.centres[result.assignments]) ** 2).sum())
    assert result.inertia == pytest.approx(expected, rel=1e-12)
    # the returned assignments are the nearest centres of the returned centres
    assert torch.equal(nearest_centre(x, result.centres), result.assignments)


def test_restarts_keep_lowest_inertia() -> None:
    # Overlapping data and many clusters: runs land in different local minima.
    x = torch.randn(400, 2, generator=_gen(3))
    g = _gen(11)
    singles = [kmeans(x, 12, iterations=3, restarts=1, generator=g) for _ in range(5)]
    best = kmeans(x, 12, iterations=3, restarts=5, generator=_gen(11))
    inertias = [r.inertia for r in singles]
    assert len(set(inertias)) > 1  # the case really has different local minima
    # restarts=5 draws like five consecutive single runs, so it returns the best of them
    winner = singles[int(np.argmin(inertias))]
    assert best.inertia == min(inertias)
    assert torch.equal(best.centres, winner.centres)
    assert torch.equal(best.assignments, winner.assignments)


def test_deterministic_for_same_seed_and_seeds_differ() -> None:
    x = torch.randn(500, 4, generator=_gen(5))
    a = kmeans(x, 10, iterations=10, restarts=2, generator=_gen(7))
    b = kmeans(x, 10, iterations=10, restarts=2, generator=_gen(7))
    assert torch.equal(a.centres, b.centres)
    assert torch.equal(a.assignments, b.assignments)
    assert a.inertia == b.inertia
    others = [kmeans(x, 10, iterations=10, restarts=1, generator=_gen(s)) for s in range(8, 12)]
    assert any(not torch.equal(o.centres, a.centres) for o in others)


def test_duplicated_points_fewer_distinct_than_k() -> None:
    # 3 distinct points, each repeated 10 times, 5 clusters: two clusters must stay duplicates.
    distinct = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    x = distinct.repeat(10, 1)
    result = kmeans(x, 5, iterations=10, restarts=2, generator=_gen(0))
    assert torch.isfinite(result.centres).all()
    assert result.inertia == 0.0
    assert ((result.assignments >= 0) & (result.assignments < 5)).all()
    found = {tuple(c) for c in result.centres.tolist()}
    assert found == {tuple(p) for p in distinct.tolist()}  # every centre sits on a data point


def test_empty_cluster_reseeded_to_farthest_point() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]], dtype=torch.float64)
    # centre 2 is far from every point, so it gets nothing
    centres = torch.tensor([[0.5], [10.0], [1000.0]], dtype=torch.float64)
    new, assignments = lloyd_step(x, centres)
    assert assignments.tolist() == [0, 0, 0, 1, 1]
    # distances to assigned centres: 0.25, 0.25, 2.25, 0, 1 -> farthest is x=2.0
    assert new[:, 0].tolist() == [1.0, 10.5, 2.0]


def test_lloyd_step_matches_naive_loop() -> None:
    g = _gen(21)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    centres = torch.randn(7, 3, generator=g, dtype=torch.float64)
    centres[6] = 100.0  # one empty cluster, to exercise the re-seed rule too
    new, assignments = lloyd_step(x, centres)
    naive_new, naive_assign = _naive_lloyd_step(x.numpy(), centres.numpy())
    assert assignments.tolist() == naive_assign.tolist()
    np.testing.assert_allclose(new.numpy(), naive_new, rtol=0, atol=1e-12)


def test_chunked_assignment_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    import elcrec_dist.clustering as clustering

    g = _gen(4)
    x = torch.randn(1000, 5, generator=g, dtype=torch.float64)
    centres = torch.randn(9, 5, generator=g, dtype=torch.float64)
    whole = torch.cdist(x, centres).argmin(dim=1)
    monkeypatch.setattr(clustering, "CHUNK_ELEMENTS", 37)  # many ragged chunks
    monkeypatch.setattr(clustering, "NEAREST_CHUNK_ELEMENTS", 37)
    assert torch.equal(nearest_centre(x, centres), whole)
    small = kmeans(x, 9, iterations=5, restarts=1, generator=_gen(2))
    monkeypatch.setattr(clustering, "CHUNK_ELEMENTS", 1 << 22)
    large = kmeans(x, 9, iterations=5, restarts=1, generator=_gen(2))
    assert torch.equal(small.assignments, large.assignments)
    torch.testing.assert_close(small.centres, large.centres, rtol=0, atol=1e-12)


def test_fewer_points_than_clusters_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"M=3 .*k=4"):
        kmeans(torch.zeros(3, 2), 4, iterations=5, restarts=1, generator=_gen(0))


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.zeros(5), 2, iterations=5, restarts=1, generator=_gen(0))
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((5, 2), float("nan")), 2, iterations=5, restarts=1, generator=_gen(0))
    with pytest.raises(ValueError, match="restarts"):
        kmeans(torch.zeros(5, 2), 2, iterations=5, restarts=0, generator=_gen(0))
    with pytest.raises(ValueError, match="dimensions"):
        nearest_centre(torch.zeros(5, 2), torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------------
# NMI and ARI


def test_identical_and_relabelled_labelings_score_one() -> None:
    a = np.array([0, 0, 1, 1, 2, 2, 2])
    b = np.array([7, 7, -1, -1, 3, 3, 3])  # same partition, other names
    assert normalized_mutual_info(a, a) == pytest.approx(1.0)
    assert normalized_mutual_info(a, b) == pytest.approx(1.0)
    assert adjusted_rand_index(a, b) == pytest.approx(1.0)
    assert normalized_mutual_info(torch.tensor(a), torch.tensor(b)) == pytest.approx(1.0)


def test_independent_labelings_score_about_zero() -> None:
    # Every combination of a 2-label and a 3-label variable appears equally often (20 times), so
    # the joint is exactly the product of the marginals and MI = 0. ARI's expectation is taken over
    # random permutations, so this perfectly balanced table scores slightly below 0:
    # index = 6·C(20,2) = 1140, expected = 2·C(60,2)·3·C(40,2)/C(120,2) = 1160.2 -> ARI = -0.011.
    a, b = zip(*itertools.product(range(2), range(3)), strict=True)
    a_arr = np.array(a * 20)
    b_arr = np.array(b * 20)
    assert normalized_mutual_info(a_arr, b_arr) == pytest.approx(0.0, abs=1e-12)
    assert abs(adjusted_rand_index(a_arr, b_arr)) < 0.02
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 20_000), rng.integers(0, 5, 20_000)
    assert normalized_mutual_info(x, y) < 0.005
    assert abs(adjusted_rand_index(x, y)) < 0.005


def test_small_contingency_table_by_hand() -> None:
    # a = [0,0,0,1,1,1], b = [0,0,1,1,2,2]. Contingency (rows a, cols b):
    #        b=0 b=1 b=2
    #   a=0   2   1   0      row sums 3, 3
    #   a=1   0   1   2      col sums 2, 2, 2;  n = 6
    # H(a) = ln 2;  H(b) = ln 3
    # I = Σ p_ij ln(p_ij / (p_i p_j)): cells 2/6 -> (1/3) ln((1/3)/(1/2·1/3)) = (1/3) ln 2, twice;
    #     cells 1/6 -> (1/6) ln((1/6)/(1/6)) = 0, twice.   I = (2/3) ln 2
    # NMI = I / ((H(a)+H(b))/2) = (4/3) ln 2 / (ln 2 + ln 3)
    # ARI: index = C(2,2)+C(2,2) = 2; sum_a = 2·C(3,2) = 6; sum_b = 3·C(2,2) = 3; C(6,2) = 15
    #      expected = 6·3/15 = 1.2; max = (6+3)/2 = 4.5; ARI = (2-1.2)/(4.5-1.2) = 0.8/3.3
    a = np.array([0, 0, 0, 1, 1, 1])
    b = np.array([0, 0, 1, 1, 2, 2])
    nmi = (4.0 / 3.0) * math.log(2) / (math.log(2) + math.log(3))
    assert normalized_mutual_info(a, b) == pytest.approx(nmi, rel=1e-12)
    assert normalized_mutual_info(b, a) == pytest.approx(nmi, rel=1e-12)
    assert adjusted_rand_index(a, b) == pytest.approx(0.8 / 3.3, rel=1e-12)
    assert adjusted_rand_index(b, a) == pytest.approx(0.8 / 3.3, rel=1e-12)


def test_score_edge_cases() -> None:
    one = np.zeros(5, dtype=int)
    assert normalized_mutual_info(one, one) == 1.0
    assert adjusted_rand_index(one, one) == 1.0
    singletons = np.arange(5)
    assert adjusted_rand_index(singletons, singletons) == 1.0
    assert normalized_mutual_info(one, singletons) == 0.0
    with pytest.raises(ValueError, match="length"):
        normalized_mutual_info(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        adjusted_rand_index(np.zeros(0), np.zeros(0))
