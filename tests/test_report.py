"""The intent report (python -m launcher.intents): per-intent numbers against a naive per-user
loop, the typical-item score by hand, the PCA against numpy's, the files and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_prepared

from data_prep.synthetic import SyntheticSpec
from elcrec_dist.checkpoint import save_model
from elcrec_dist.config import load_config
from elcrec_dist.data import left_pad, train_pairs
from elcrec_dist.model import ELCRec
from elcrec_dist.planted import read_planted
from elcrec_dist.prepared import load_sequences
from elcrec_dist.report import IntentTotals, projection

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_intent_totals_by_hand() -> None:
    totals = IntentTotals(k=3, num_items=5)
    totals.add(np.array([0, 2]), np.array([0.5, 0.25]), [np.array([1, 2, 2]), np.array([5])])
    totals.add(np.array([0]), np.array([1.0]), [np.array([2, 3])])
    assert totals.users.tolist() == [2, 0, 1]
    assert totals.cosine_sum.tolist() == [1.5, 0.0, 0.25]
    intent, item, count = totals.item_counts()
    assert list(zip(intent.tolist(), item.tolist(), count.tolist(), strict=True)) == [
        (0, 1, 1), (0, 2, 3), (0, 3, 1), (2, 5, 1)]


def test_projection_is_the_top_two_principal_axes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([5.0, 2.0, 0.1, 0.1, 0.1])
    users, centres = projection(x, x[:3])
    # the variance along the two axes is the two largest eigenvalues of the covariance
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
    assert np.allclose(users.var(axis=0), eig[:2], rtol=1e-9)
    assert np.allclose(centres, users[:3])


@pytest.mark.slow
def test_report_counts_match_a_naive_assignment(tmp_path: Path) -> None:
    data = write_prepared(tmp_path / "data", SyntheticSpec(users=300, items=80, intents=4, seed=2))
    config = load_config("configs/demo.yaml", ["model.num_clusters=6", f"data.path={data}"])
    torch.manual_seed(3)
    model = ELCRec(config.model, num_items=80).eval()
    save_model(
        tmp_path / "run" / "best_model.pt",
        state=model.state_dict(),
        config=config.to_dict(),
        meta={},
    )
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "launcher.intents", str(tmp_path / "run"),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((out / "intents.json").read_text())

    # naive: each user alone, cosine to every centre, the highest wins (ties: lowest index)
    _, user_ids, sequences = load_sequences(str(data))
    centres = F.normalize(model.cluster_centers.detach(), dim=-1).double()
    users = np.zeros(6, np.int64)
    assigned = []
    with torch.no_grad():
        for seq in sequences:
            hidden = model(left_pad([train_pairs(seq)[0]], model.config.max_len))
            pooled = F.normalize(hidden.mean(dim=1), dim=-1).double()[0]
            best = int(torch.argmax(centres @ pooled))
            users[best] += 1
            assigned.append(best)
    assert [r["users"] for r in got["intents"]] == users.tolist()
    assert got["summary"]["dead"] == [c for c in range(6) if users[c] == 0]
    # the most typical item of the largest intent, by hand: share in the intent x log(lift)
    big = int(np.argmax(users))
    mine = [s for s, a in zip(sequences, assigned, strict=True) if a == big]
    every = np.bincount(np.concatenate(sequences), minlength=81) / sum(len(s) for s in sequences)
    inside = np.bincount(np.concatenate(mine), minlength=81) / sum(len(s) for s in mine)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(inside > 0, inside * np.log(inside / every), -np.inf)
    assert got["intents"][big]["typical_items"][0]["item"] == int(np.argmax(score))
    planted = read_planted(str(data))
    assert planted is not None
    from elcrec_dist.clustering import normalized_mutual_info

    nmi = normalized_mutual_info(planted.for_users(user_ids), np.asarray(assigned))
    assert got["summary"]["recovery"]["nmi"] == pytest.approx(nmi, abs=1e-12)
    for name in ("users_per_intent.png", "projection.png"):
        assert (out / name).read_bytes().startswith(PNG)
    text = (out / "report.md").read_text()
    assert "projection.png" in text and f"NMI {nmi:.3f}" in text
    assert (out / "manifest.json").is_file()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.md").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "launcher.intents", str(tmp_path / "run"),
                           "--output", str(busy)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "keep.md" in proc.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.md"]
