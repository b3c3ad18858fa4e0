"""The planted-intent synthetic dataset (data_prep.synthetic): format, structure and CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

import data_prep.writer as writer
from data_prep.benchmark import main as benchmark_main
from data_prep.synthetic import (
    PLANTED_NAME,
    generate,
    main,
    slice_bounds,
)
from elcrec_dist.planted import read_planted
from elcrec_dist.prepared import MANIFEST_NAME, DatasetError, load_sequences

SMALL = ["--users", "500", "--items", "120", "--intents", "4", "--seed", "3"]


def _run(tmp_path: Path, name: str, *args: str) -> tuple[int, Path]:
    out = tmp_path / name
    return main(["--output", str(out), *args]), out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _slice_of(item: int, bounds: np.ndarray) -> int:
    """Intent whose slice holds ``item``: bounds[k] < item <= bounds[k + 1]."""
    for k in range(len(bounds) - 1):
        if bounds[k] < item <= bounds[k + 1]:
            return k
    raise AssertionError(f"item {item} is in no slice")


def _follows_walk(prev: int, nxt: int, bounds: np.ndarray) -> bool:
    """True when ``nxt`` is 1, 2 or 3 places after ``prev`` inside prev's slice (wrapping)."""
    k = _slice_of(prev, bounds)
    if not bounds[k] < nxt <= bounds[k + 1]:
        return False
    size = int(bounds[k + 1] - bounds[k])
    return (nxt - prev) % size in (1, 2, 3)


# ----------------------------------------------------------------------------------------------
# Files and format


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    rc_a, a = _run(tmp_path, "a", *SMALL)
    rc_b, b = _run(tmp_path, "b", *SMALL)
    rc_c, c = _run(tmp_path, "c", *SMALL[:-1], "4")
    assert rc_a == rc_b == rc_c == 0
    files_a = _files(a)
    assert set(files_a) == {
        MANIFEST_NAME,
        PLANTED_NAME,
        "part-00000-of-00002.parquet",
        "part-00001-of-00002.parquet",
    }
    assert files_a == _files(b)
    assert files_a[PLANTED_NAME] != _files(c)[PLANTED_NAME]
    assert files_a["part-00000-of-00002.parquet"] != _files(c)["part-00000-of-00002.parquet"]


def test_manifest_counts_and_round_trip(tmp_path: Path) -> None:
    rc, out = _run(tmp_path, "ds", *SMALL, "--shards", "3", "--noise", "0.2")
    assert rc == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    ids, seqs, intents = generate(500, 120, 4, noise=0.2, seed=3)
    assert manifest["num_users"] == 500
    assert manifest["num_items"] == 120
    assert manifest["num_interactions"] == sum(len(s) for s in seqs)
    assert manifest["max_item_id"] == max(int(s.max()) for s in seqs)
    assert len(manifest["files"]) == 3
    extra = manifest["extra"]
    assert extra["source"] == "synthetic"
    assert (extra["intents"], extra["seed"], extra["noise"]) == (4, 3, 0.2)
    assert extra["planted_intents_file"] == PLANTED_NAME

    info, read_ids, read_seqs = load_sequences(str(out))
    assert info.num_users == 500 and info.num_items == 120
    by_id = dict(zip(read_ids.tolist(), read_seqs, strict=True))
    assert sorted(by_id) == ids.tolist() == list(range(1, 501))
    for uid, seq in zip(ids.tolist(), seqs, strict=True):
        np.testing.assert_array_equal(by_id[uid], seq)

    planted = read_planted(str(out))
    assert planted is not None
    np.testing.assert_array_equal(planted.user_ids, ids)
    np.testing.assert_array_equal(planted.intents, intents)
    np.testing.assert_array_equal(planted.for_users(read_ids), intents[read_ids - 1])
    with pytest.raises(KeyError, match="501"):
        planted.for_users(np.array([1, 501]))
    assert dict(zip(*planted, strict=True))[7] == intents[6]  # also usable as a plain pair


def test_sidecar_is_written_before_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    original = writer.commit_manifest

    def checking_commit(fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any]) -> None:
        seen.append(fs.exists(f"{root}/{PLANTED_NAME}"))
        original(fs, root, manifest)

    monkeypatch.setattr(writer, "commit_manifest", checking_commit)
    rc, _ = _run(tmp_path, "ds", *SMALL)
    assert rc == 0
    assert seen == [True]


def test_read_planted_checks_the_sidecar(tmp_path: Path) -> None:
    rc, out = _run(tmp_path, "ds", *SMALL)
    assert rc == 0
    sidecar = out / PLANTED_NAME
    sidecar.write_bytes(sidecar.read_bytes()[:-1] + b"\0")
    with pytest.raises(DatasetError, match="sha256"):
        read_planted(str(out))
    sidecar.unlink()
    with pytest.raises(DatasetError, match="missing"):
        read_planted(str(out))
    with pytest.raises(DatasetError, match="no manifest"):
        read_planted(str(tmp_path / "nowhere"))


def test_read_planted_is_none_for_other_datasets(tmp_path: Path) -> None:
    bench = tmp_path / "bench.txt"
    bench.write_text("1 1 2 3 4\n2 2 3 4 5\n")
    assert benchmark_main(["--input", str(bench), "--output", str(tmp_path / "b")]) == 0
    assert read_planted(str(tmp_path / "b")) is None


# ----------------------------------------------------------------------------------------------
# Generated structure


def test_ids_and_lengths_in_range() -> None:
    ids, seqs, intents = generate(2000, 300, 6, min_len=5, max_len=17, noise=0.3, seed=1)
    assert ids.dtype == np.int64 and ids.tolist() == list(range(1, 2001))
    assert intents.dtype == np.int32 and set(intents.tolist()) == set(range(6))
    lengths = np.array([len(s) for s in seqs])
    assert lengths.min() == 5 and lengths.max() == 17  # both ends reached with 2000 users
    flat = np.concatenate(seqs)
    assert flat.dtype == np.int32
    assert flat.min() >= 1 and flat.max() <= 300


def test_slices_partition_the_catalogue() -> None:
    bounds = slice_bounds(10, 3)
    assert bounds.tolist() == [0, 3, 6, 10]  # intents own 1-3, 4-6, 7-10
    sizes = np.diff(slice_bounds(600, 7))
    assert sizes.sum() == 600 and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.4])
def test_items_lie_in_the_planted_slice(noise: float) -> None:
    items, intents_k = 600, 8
    _, seqs, intents = generate(4000, items, intents_k, noise=noise, seed=2)
    bounds = slice_bounds(items, intents_k)
    inside = total = 0
    expected = 0.0
    for seq, k in zip(seqs, intents.tolist(), strict=True):
        lo, hi = bounds[k], bounds[k + 1]
        inside += int(((seq > lo) & (seq <= hi)).sum())
        total += len(seq)
        # a noise item can land in the user's own slice too: P = (1 - noise) + noise * size / N
        expected += len(seq) * ((1 - noise) + noise * (hi - lo) / items)
    share, expected_share = inside / total, expected / total
    if noise == 0.0:
        assert share == 1.0
    else:
        # ~96k tokens: the binomial standard error is below 0.002
        assert share == pytest.approx(expected_share, abs=0.01)


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_next_item_follows_the_walk(noise: float) -> None:
    items, k = 600, 8
    _, seqs, _ = generate(1500, items, k, noise=noise, seed=5)
    bounds = slice_bounds(items, k)
    follow = pairs = 0
    step_counts = {1: 0, 2: 0, 3: 0}
    for seq in seqs:
        for prev, nxt in zip(seq[:-1].tolist(), seq[1:].tolist(), strict=True):
            pairs += 1
            if _follows_walk(prev, nxt, bounds):
                follow += 1
                kk = _slice_of(prev, bounds)
                step_counts[(nxt - prev) % int(bounds[kk + 1] - bounds[kk])] += 1
    if noise == 0.0:
        assert follow == pairs
        # steps are uniform over 1, 2, 3: no preferred transition
        for count in step_counts.values():
            assert count / pairs == pytest.approx(1 / 3, abs=0.02)
    else:
        # both items of a pair come from the walk with probability (1 - noise)^2; a noise item
        # follows the rule by chance with probability ~3/N, negligible here
        assert follow / pairs == pytest.approx((1 - noise) ** 2, abs=0.02)


def test_item_popularity_is_flat_without_noise() -> None:
    _, seqs, _ = generate(4000, 600, 8, noise=0.0, seed=0)
    bounds = slice_bounds(600, 8)
    counts = np.bincount(np.concatenate(seqs), minlength=601)[1:].astype(float)
    for k in range(8):
        within = counts[bounds[k] : bounds[k + 1]]
        # ~ 500 users x 24 items / 75 items = 160 per item: Poisson-like spread, no hot items
        assert within.max() / within.mean() < 1.5


def _rank(scores: np.ndarray, answer: int, history: np.ndarray) -> int:
    """0-based pessimistic rank with history excluded (the answer stays a candidate)."""
    scores = scores.astype(float).copy()
    scores[0] = -math.inf
    for item in set(history.tolist()) - {answer}:
        scores[item] = -math.inf
    return int((scores >= scores[answer]).sum()) - 1


def _ndcg20(rank: int) -> float:
    return 1.0 / math.log2(rank + 2) if rank < 20 else 0.0


def test_popularity_scores_low_and_the_walk_scores_high() -> None:
    items, k = 600, 8
    _, seqs, _ = generate(4000, items, k, seed=0)
    bounds = slice_bounds(items, k)
    popularity = np.zeros(items + 1)
    for seq in seqs:
        np.add.at(popularity, seq[:-1], 1.0)  # test inputs only: the answers stay unseen
    pop_ndcg, walk_ndcg = [], []
    for seq in seqs:
        history, answer = seq[:-1], int(seq[-1])
        pop_ndcg.append(_ndcg20(_rank(popularity, answer, history)))
        # "predict the walk": the three successors of the last item, in order, then popularity
        last = int(history[-1])
        kk = _slice_of(last, bounds)
        size = int(bounds[kk + 1] - bounds[kk])
        scores = popularity / popularity.max()
        for bonus, step in zip((4.0, 3.0, 2.0), (1, 2, 3), strict=True):
            scores[bounds[kk] + 1 + (last - bounds[kk] - 1 + step) % size] = bonus
        walk_ndcg.append(_ndcg20(_rank(scores, answer, history)))
    # measured: popularity ~0.012, walk ~0.59 (the answer is a walk successor ~81% of the time)
    assert np.mean(pop_ndcg) < 0.05
    assert np.mean(walk_ndcg) > 0.45


# ----------------------------------------------------------------------------------------------
# Command line errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--users", "0"], "--users"),
        (["--intents", "0"], "--intents"),
        (["--items", "20", "--intents", "8"], "--items 20 is too few"),
        (["--min-len", "3"], "--min-len must be >= 4"),
        (["--min-len", "10", "--max-len", "9"], "--max-len 9 is below --min-len 10"),
        (["--noise", "1.5"], "--noise"),
        (["--noise", "nan"], "--noise"),
        (["--seed", "-1"], "--seed"),
        (["--shards", "0"], "--shards"),
    ],
)
def test_bad_arguments_fail_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    rc, out = _run(tmp_path, "ds", *args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_unparsable_argument_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, "ds", "--users", "many")
    assert exc.value.code == 2
    assert "--users" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_existing_dataset_is_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = _run(tmp_path, "ds", *SMALL)
    assert rc == 0
    before = _files(out)
    rc, _ = _run(tmp_path, "ds", *SMALL[:-1], "9")
    assert rc == 2
    assert "already holds a prepared dataset" in capsys.readouterr().err
    assert _files(out) == before  # the sidecar too: it is written only after the refusal check
