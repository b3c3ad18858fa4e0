"""End-to-end runs of the real entry points: reference evaluation, training under the deepspeed
launcher with 2 ranks, evaluation of the trained checkpoint, error exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PreparedSets
from launch import deepspeed_command

from data_prep.synthetic import SyntheticSpec

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_BEAUTY = {
    "HR@5": 0.0529,
    "NDCG@5": 0.0355,
    "HR@10": 0.0762,
    "NDCG@10": 0.0429,
    "HR@20": 0.1079,
    "NDCG@20": 0.0509,
}


def _run(
    args: list[str], *, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(sys.executable).parent)
    full_env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        **(env or {}),
    }
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def _last_json(stdout: str) -> dict[str, Any]:
    """The last JSON line. Under the deepspeed launcher the launcher's own exit messages follow
    it."""
    return json.loads([line for line in stdout.strip().splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_published_beauty_row(
    beauty_prepared: Path, shared_dir: Path
) -> None:
    proc = _run([sys.executable, "launcher/evaluate.py", "--config", "configs/beauty.yaml",
                 "--data", str(beauty_prepared),
                 "--import-reference", str(shared_dir / "reference" / "ELCRec-Beauty-1.pt")])
    assert proc.returncode == 0, proc.stderr
    metrics = _last_json(proc.stdout)
    assert {k: round(float(metrics[k]), 4) for k in PUBLISHED_BEAUTY} == PUBLISHED_BEAUTY


def test_evaluate_cli_refuses_a_checkpoint_that_does_not_fit(
    beauty_prepared: Path, shared_dir: Path
) -> None:
    proc = _run([sys.executable, "launcher/evaluate.py", "--config", "configs/sports.yaml",
                 "--data", str(beauty_prepared),
                 "--import-reference", str(shared_dir / "reference" / "ELCRec-Beauty-1.pt")])
    assert proc.returncode == 2
    assert "cluster_centers is [256, 64], the config expects [512, 64]" in proc.stderr
    # the missing second layer
    assert "item_encoder.layer.1" in proc.stderr or "blocks.1" in proc.stderr


def test_train_cli_refuses_bad_config_and_missing_data(tmp_path: Path) -> None:
    proc = _run([sys.executable, "launcher/train.py", "--config", "configs/demo.yaml",
                 "--set", "model.num_layerz=2"])
    assert proc.returncode == 2 and "model.num_layerz" in proc.stderr
    proc = _run([sys.executable, "launcher/train.py", "--config", "configs/demo.yaml",
                 "--data", str(tmp_path / "nothing")])
    assert proc.returncode == 2 and "manifest.json" in proc.stderr
    assert not (tmp_path / "nothing").exists()


@pytest.fixture(scope="module")
def default_synthetic(prepared_sets: PreparedSets) -> Path:
    """The quick start's dataset: what ``python -m data_prep.synthetic`` writes by default."""
    return prepared_sets(SyntheticSpec())


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_start_run_learns_and_its_checkpoint_evaluates_the_same(
    default_synthetic: Path, tmp_path: Path
) -> None:
    """The README's main job exactly (demo config, 2 ranks), only the run folder moved."""
    run_dir = tmp_path / "run"
    cmd, _ = deepspeed_command("launcher/train.py", "--config", "configs/demo.yaml",
                               "--data", str(default_synthetic),
                               "--run-dir", str(run_dir), "--set", "train.log_every=1")
    proc = _run(cmd, env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = _last_json(proc.stdout)
    assert final["run_dir"] == str(run_dir)

    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2
    test, popularity = results["test"], results["popularity_test"]
    assert {k: final[k] for k in test} == test
    # The planted walk is learnable: a trained model must clearly beat ranking by popularity.
    assert test["NDCG@20"] > 2 * popularity["NDCG@20"], (test, popularity)
    # Centres recover planted intents better than chance: NMI between the planted intent and
    # the nearest learned centre, against the NMI of the same assignment with the planted
    # labels shuffled over users.
    recovery = results["intent_recovery"]
    assert recovery["intent_nmi"] > max(0.05, 10 * recovery["intent_nmi_chance"]), recovery

    # The run folder holds the resolved config, named loss terms and TensorBoard events.
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (
        resolved["model"]["num_clusters"] == 16
        and resolved["data"]["path"] == str(default_synthetic)
    )
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*logged)
    assert {"loss/next_item", "loss/cluster", "loss/seq_cl", "loss/intent_cl", "loss/total",
            "valid/NDCG@20", "test/NDCG@20", "lr", "train/sequences_per_s",
            "centres/mean_pairwise_cosine", "centres/norm_of_mean",
            "centres/dead_fraction"} <= names
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert {"loss/total", "valid/NDCG@20", "centres/dead_fraction"} <= set(events.Tags()["scalars"])
    assert events.Tags()["histograms"] == ["centres/users_per_centre"]
    # one histogram per epoch over the 16 centres, whose counts add up to every user once
    histograms = events.Histograms("centres/users_per_centre")
    assert [(h.histogram_value.num, h.histogram_value.sum) for h in histograms] == [
        (16, 4000)
    ] * results["epochs_run"]

    # The best checkpoint, evaluated by one process, gives the metrics the 2 ranks computed.
    proc = _run([sys.executable, "launcher/evaluate.py", "--config", "configs/demo.yaml",
                 "--data", str(default_synthetic), "--checkpoint", str(run_dir / "best_model.pt")])
    assert proc.returncode == 0, proc.stderr
    alone = _last_json(proc.stdout)
    for key, value in test.items():
        assert alone[key] == pytest.approx(value, abs=1e-9), key
