"""``launcher/evaluate.py`` with a saved model: it runs on the config its checkpoint holds, and a
config or a dataset that does not fit the checkpoint is refused by name, exit 2, nothing written.

The models are saved here as training saves them (``checkpoint.save_model`` for best_model.pt; a
committed folder with DeepSpeed's module-state file) with random weights; the expected metrics
come from ``evaluate`` on the same model in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_prepared

from elcrec_dist import checkpoint as ckpt
from elcrec_dist.config import ExperimentConfig, load_config
from elcrec_dist.evaluation import evaluate
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences, read_info

REPO = Path(__file__).resolve().parents[1]


def run_evaluate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "launcher/evaluate.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def last_json(stdout: str) -> dict[str, float]:
    return json.loads(stdout.strip().splitlines()[-1])


def no_json(stdout: str) -> bool:
    return not any(line.startswith("{") for line in stdout.splitlines())


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folders`` with its size and modification time."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(small_synthetic: Path) -> tuple[ExperimentConfig, ELCRec]:
    """The demo config on the small set with 4 centres, ks 1/5/10 (selecting on MRR, which every
    ks has), and a model of it."""
    config = load_config(
        REPO / "configs" / "demo.yaml",
        [f"data.path={small_synthetic}", "model.num_clusters=4", "eval.ks=[1, 5, 10]",
         "eval.select_metric=MRR"],
    )
    torch.manual_seed(7)
    model = ELCRec(config.model, num_items=read_info(str(small_synthetic)).num_items)
    with torch.no_grad():  # a spread of ranks rather than near-ties
        model.item_embeddings.weight.normal_(0, 1.0)
    return config, model


@pytest.fixture(scope="module")
def best_model(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config, model = trained
    path = tmp_path_factory.mktemp("run") / "best_model.pt"
    ckpt.save_model(path, state=model.state_dict(), config=config.to_dict(), meta={"epoch": 0})
    return path


def expected(trained, split: str, ks: tuple[int, ...]) -> dict[str, float]:
    config, model = trained
    _, _, seqs = load_sequences(config.data.path)
    return evaluate(model, seqs, split=split, ks=ks)


def assert_metrics(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_a_model_file_evaluates_on_its_own_config(trained, best_model: Path) -> None:
    # neither --config nor --data: the stored config builds the model and names the dataset
    proc = run_evaluate("--checkpoint", str(best_model))
    assert proc.returncode == 0, proc.stderr
    assert_metrics(last_json(proc.stdout), expected(trained, "test", (1, 5, 10)))
    assert 0 < last_json(proc.stdout)["MRR"] < 1
    # --set applies on top of the stored config
    proc = run_evaluate("--checkpoint", str(best_model), "--set", "eval.ks=[2]", "--split", "valid")
    assert proc.returncode == 0, proc.stderr
    assert_metrics(last_json(proc.stdout), expected(trained, "valid", (2,)))


def test_a_committed_checkpoint_folder_evaluates_on_its_recorded_config(
    trained, tmp_path: Path
) -> None:
    config, model = trained
    folder = tmp_path / "checkpoints" / "step-00000007"
    folder.mkdir(parents=True)
    module = {ckpt.OBJECTIVE_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save({"module": module}, folder / ckpt.MODEL_STATES)
    info = read_info(config.data.path)
    ckpt.commit(folder, state=ckpt.TrainState(global_step=7), config=config.to_dict(),
                dataset=info.fingerprint())
    proc = run_evaluate("--checkpoint", str(folder), "--split", "valid")
    assert proc.returncode == 0, proc.stderr
    assert_metrics(last_json(proc.stdout), expected(trained, "valid", (1, 5, 10)))


def test_a_config_that_agrees_on_the_model_may_set_the_evaluation(
    trained, best_model: Path, tmp_path: Path
) -> None:
    config, _ = trained
    tree = config.to_dict()
    tree["eval"]["ks"] = [3]
    given = tmp_path / "same-model.yaml"
    given.write_text(yaml.safe_dump(tree))
    proc = run_evaluate("--config", str(given), "--checkpoint", str(best_model))
    assert proc.returncode == 0, proc.stderr
    assert_metrics(last_json(proc.stdout), expected(trained, "test", (3,)))


def test_a_config_for_another_model_is_refused_by_name(
    best_model: Path, small_synthetic: Path
) -> None:
    before = snapshot(best_model.parent, small_synthetic)
    # configs/demo.yaml has 16 centres, the checkpoint 4: today's raw "size mismatch" becomes
    # a message naming the key with both values
    proc = run_evaluate("--config", "configs/demo.yaml", "--data", str(small_synthetic),
                        "--checkpoint", str(best_model))
    assert proc.returncode == 2, proc.stderr
    named = "model.num_clusters: 4 in the checkpoint, 16 from --config configs/demo.yaml"
    assert named in proc.stderr
    assert "size mismatch" not in proc.stderr and "Traceback" not in proc.stderr
    assert no_json(proc.stdout)
    # an override that changes the model is refused the same way
    proc = run_evaluate("--checkpoint", str(best_model), "--set", "model.num_layers=2",
                        "--set", "model.hidden_size=32")
    assert proc.returncode == 2, proc.stderr
    assert "model.num_layers: 1 in the checkpoint, 2 from --set" in proc.stderr
    assert "model.hidden_size: 64 in the checkpoint, 32 from --set" in proc.stderr
    assert no_json(proc.stdout)
    assert snapshot(best_model.parent, small_synthetic) == before


def test_a_dataset_with_another_catalogue_is_refused(best_model: Path, tmp_path: Path) -> None:
    other = write_prepared(tmp_path / "other", [[1, 2, 3, 4], [5, 6, 7, 41, 2]], num_items=41)
    before = snapshot(best_model.parent, other)
    proc = run_evaluate("--checkpoint", str(best_model), "--data", str(other))
    assert proc.returncode == 2, proc.stderr
    assert "scores a catalogue of 40 items (item table of 41 rows)" in proc.stderr
    assert f"the dataset {other} has 41 items" in proc.stderr
    assert "Traceback" not in proc.stderr and no_json(proc.stdout)
    assert snapshot(best_model.parent, other) == before


def test_a_published_state_dict_needs_a_config_and_a_missing_checkpoint_is_named(
    tmp_path: Path,
) -> None:
    proc = run_evaluate("--import-reference", str(tmp_path / "ELCRec-Beauty-1.pt"))
    assert proc.returncode == 2
    assert "--import-reference needs --config" in proc.stderr and no_json(proc.stdout)
    proc = run_evaluate("--checkpoint", str(tmp_path / "nope.pt"))
    assert proc.returncode == 2
    assert "nope.pt" in proc.stderr and "no such checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
