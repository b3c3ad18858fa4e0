"""Model export (python -m launcher.export): what each file holds, loading with pickle switched
off, each graph against the PyTorch model (on Beauty users with the published weights), and
the refusals."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_prepared

from data_prep.synthetic import SyntheticSpec
from elcrec_dist.checkpoint import save_model
from elcrec_dist.config import load_config
from elcrec_dist.data import eval_batch
from elcrec_dist.evaluation import top_k_items, user_vectors
from elcrec_dist.export import Export
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.reference import load_reference

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def export(run: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher.export", str(run), "--output", str(out),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def run_folder(path: Path, model: ELCRec, config_sets: list[str]) -> Path:
    config = load_config("configs/demo.yaml", config_sets)
    save_model(path / "best_model.pt", state=model.state_dict(), config=config.to_dict(), meta={})
    return path


@pytest.fixture(scope="module")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ELCRec]:
    """An export of a seeded untrained model on a 200-user synthetic set: (data, export, model)."""
    root = tmp_path_factory.mktemp("export")
    data = write_prepared(root / "data", SyntheticSpec(users=200, items=90, intents=4, seed=1))
    config = load_config("configs/demo.yaml", ["model.num_clusters=5"])
    torch.manual_seed(5)
    model = ELCRec(config.model, num_items=90).eval()
    run = run_folder(root / "run", model, ["model.num_clusters=5", f"data.path={data}"])
    proc = export(run, root / "out", "--k", "7")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, root / "out", model


def test_export_loads_without_pickle_and_holds_the_model(small_export: tuple[Path, Path, ELCRec],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data, out, model = small_export

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading an export unpickled something")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    exported = Export.open(str(out))
    loaded = exported.model()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert exported.config.model.num_clusters == 5
    _, _, sequences = load_sequences(str(data))
    batch = eval_batch(sequences, "test", model.config.max_len)
    with torch.no_grad():
        want = user_vectors(model, batch.inputs)
        top = top_k_items(want, model.item_embeddings.weight, batch.history, k=7)
    for kind in ("onnx", "pt2"):
        (vectors,) = exported.runner(f"user_encoder.{kind}")(batch.inputs.numpy())
        assert np.abs(vectors - want.numpy()).max() < 1e-5, kind
        items, scores = exported.runner(f"topk_scorer.{kind}")(want.numpy(), batch.history.numpy())
        assert np.array_equal(items, top.items.numpy()), kind  # float32 ties are absent here
        assert np.abs(scores - top.scores.numpy()).max() < 1e-5, kind
    manifest = exported.manifest
    assert manifest["checks"]["user_encoder.onnx"]["user_vector_max_abs_diff"] < 1e-5
    assert manifest["checks"]["topk_scorer.pt2"]["items_identical_rows"] == 1.0


def test_item_and_intent_tables_carry_original_ids_and_vectors(
    small_export: tuple[Path, Path, ELCRec],
) -> None:
    _, out, model = small_export
    items = pq.read_table(out / "items.parquet")
    assert items["item"].to_pylist() == list(range(1, 91))  # a synthetic set: ids are originals
    assert items["item_id"].to_pylist() == list(range(1, 91))
    table = np.asarray(items["vector"].to_pylist(), dtype=np.float32)
    assert np.array_equal(table, model.item_embeddings.weight[1:].detach().numpy())
    intents = pq.read_table(out / "intents.parquet")
    assert intents["intent"].to_pylist() == list(range(5))
    centres = np.asarray(intents["vector"].to_pylist(), dtype=np.float32)
    assert np.array_equal(centres, model.cluster_centers.detach().numpy())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "elcrec-export" and manifest["format_version"] == 1
    assert manifest["config"]["model"]["num_clusters"] == 5 and manifest["k"] == 7


def test_export_refuses_a_busy_folder_and_another_catalogue(small_export: tuple[Path, Path, ELCRec],
                                                            tmp_path: Path) -> None:
    data, _, model = small_export
    run = run_folder(tmp_path / "run", model, ["model.num_clusters=5", f"data.path={data}"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "other.bin").write_bytes(b"x")
    proc = export(run, busy)
    assert proc.returncode == 2 and "other.bin" in proc.stderr
    assert [p.name for p in busy.iterdir()] == ["other.bin"]
    other = write_prepared(tmp_path / "other", SyntheticSpec(users=60, items=40, intents=4))
    proc = export(run, tmp_path / "never", "--data", str(other))
    assert proc.returncode == 2 and "40 items" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_exports_score_beauty_users_like_the_published_model(
    beauty_prepared: Path, shared_dir: Path, tmp_path: Path
) -> None:
    """The published Beauty weights exported; 2,048 Beauty test users through every graph.
    Tolerance: user vectors within 1e-4 (absolute; they are of norm ~10), scores within 1e-3,
    and the top-20 lists equal for at least 99 % of users (a last-bit difference may swap two
    near-tied items)."""
    config = load_config("configs/beauty.yaml")
    info, _, sequences = load_sequences(str(beauty_prepared))
    model = ELCRec(config.model, num_items=info.num_items)
    load_reference(str(shared_dir / "reference" / "ELCRec-Beauty-1.pt"), model)
    model.eval()
    run = tmp_path / "run"
    save_model(run / "best_model.pt", state=model.state_dict(),
               config={**config.to_dict(), "data": {"path": str(beauty_prepared)}}, meta={})
    proc = export(run, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exported = Export.open(str(tmp_path / "out"))
    batch = eval_batch(sequences[:2048], "test", model.config.max_len)
    with torch.no_grad():
        want = user_vectors(model, batch.inputs)
        top = top_k_items(want, model.item_embeddings.weight, batch.history, k=20)
    for kind in ("onnx", "pt2"):
        (vectors,) = exported.runner(f"user_encoder.{kind}")(batch.inputs.numpy())
        assert np.abs(vectors - want.numpy()).max() < 1e-4, kind
        items, scores = exported.runner(f"topk_scorer.{kind}")(vectors, batch.history.numpy())
        assert np.abs(scores - top.scores.numpy()).max() < 1e-3, kind
        assert np.mean(np.all(items == top.items.numpy(), axis=1)) >= 0.99, kind
