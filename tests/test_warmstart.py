"""Daily retraining (``--init-from``, elcrec_dist.trainer.warmstart) on a two-day build.

- every item both days hold keeps its day-1 row exactly, new items keep the fresh row the
  model would have started with, every other tensor (encoder, positions, padding, centres)
  carries over; items are matched through the id maps by original id (checked here by a
  plain dict over the two item_map.parquet files);
- the real entry point warm-starts (its log records the counts) and trains;
- bad input exits 2 before the run folder exists: a model whose shape differs from the config,
  a build without id maps, a source that is not a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import PreparedSets

from bench.two_day import TwoDays, write_two_days
from data_prep.synthetic import SyntheticSpec
from elcrec_dist.checkpoint import save_model
from elcrec_dist.config import ExperimentConfig, load_config
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import read_info
from elcrec_dist.trainer.engine import init_model
from elcrec_dist.trainer.warmstart import WarmStartError, warm_start

REPO = Path(__file__).resolve().parents[1]
BASE = ["model.num_clusters=4", "kmeans.sample_users=200", "train.batch_size=64"]


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> TwoDays:
    return write_two_days(tmp_path_factory.mktemp("two_days"), interactions=40_000, users=2000,
                          items=400, seed=3)


def _config(data: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [*BASE, f"data.path={data}", *extra])


@pytest.fixture(scope="module")
def day1_run(days: TwoDays, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A day-1 run folder: best_model.pt of a (seeded, untrained) day-1 model and its config."""
    run = tmp_path_factory.mktemp("run-day1")
    config = _config(days.day1, "train.seed=7")
    torch.manual_seed(11)
    model = ELCRec(config.model, num_items=read_info(str(days.day1)).num_items)
    with torch.no_grad():  # centres unlike a fresh model's, so carrying them over shows
        model.cluster_centers.copy_(torch.nn.functional.normalize(torch.randn(4, 64), dim=-1))
    save_model(run / "best_model.pt", state=model.state_dict(), config=config.to_dict(),
               meta={"epoch": 3})
    return run


def _originals(build: Path) -> dict[str, int]:
    """original item id -> item id, read with pyarrow from the build's item map."""
    table = pq.read_table(build / "item_map.parquet")
    return dict(zip(table.column("item").to_pylist(), table.column("item_id").to_pylist(),
                    strict=True))


def test_warm_start_keeps_every_surviving_items_vector_exactly(
    days: TwoDays, day1_run: Path
) -> None:
    config = _config(days.day2, f"train.init_from={day1_run}")
    info = read_info(str(days.day2))
    device = torch.device("cpu")
    fresh = init_model(config, num_items=info.num_items, device=device).state_dict()
    model = init_model(config, num_items=info.num_items, device=device)
    figures = warm_start(model, config, info, str(days.day2))
    old = torch.load(day1_run / "best_model.pt", weights_only=True)["model"]
    new = model.state_dict()
    day1, day2 = _originals(days.day1), _originals(days.day2)
    both = set(day1) & set(day2)
    assert len(both) > 0 and set(day2) - set(day1) and set(day1) - set(day2)
    for original, new_id in day2.items():
        row = new["item_embeddings.weight"][new_id]
        if original in day1:
            assert torch.equal(row, old["item_embeddings.weight"][day1[original]]), original
        else:  # a new item: the row the model was initialised with
            assert torch.equal(row, fresh["item_embeddings.weight"][new_id]), original
    assert torch.equal(new["item_embeddings.weight"][0], old["item_embeddings.weight"][0])
    for name, tensor in new.items():
        if name != "item_embeddings.weight":
            assert torch.equal(tensor, old[name]), name
    assert figures == {"warm_start/items_kept": float(len(both)),
                       "warm_start/items_new": float(len(set(day2) - set(day1))),
                       "warm_start/items_dropped": float(len(set(day1) - set(day2)))}


def _train(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "launcher" / "train.py"), "--config",
           str(REPO / "configs" / "demo.yaml"), *[a for o in BASE for a in ("--set", o)], *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_entry_point_warm_starts_and_trains(
    days: TwoDays, day1_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = _train("--data", str(days.day2), "--run-dir", str(run), "--init-from", str(day1_run),
                  "--set", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    carried = {k: v for m in logged for k, v in m.items() if k.startswith("warm_start/")}
    day1, day2 = _originals(days.day1), _originals(days.day2)
    assert carried["warm_start/items_kept"] == len(set(day1) & set(day2))
    assert not any(k.startswith("kmeans/") for m in logged for k in m)  # centres carried over
    stored = load_config(run / "config.yaml")
    assert stored.train.init_from == str(day1_run)


def test_a_model_of_another_shape_exits_2_before_the_run_folder(days: TwoDays, day1_run: Path,
                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _train("--data", str(days.day2), "--run-dir", str(run), "--init-from", str(day1_run),
                  "--set", "model.hidden_size=32")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.hidden_size: 64 in" in proc.stderr and "32 now" in proc.stderr
    assert not run.exists()


def test_a_build_without_id_maps_exits_2(prepared_sets: PreparedSets, day1_run: Path,
                                         tmp_path: Path) -> None:
    plain = prepared_sets(SyntheticSpec(users=300, items=80, intents=4, seed=2))  # no id maps
    run = tmp_path / "run"
    proc = _train("--data", str(plain), "--run-dir", str(run), "--init-from", str(day1_run))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "has no id maps" in proc.stderr and str(plain) in proc.stderr
    assert not run.exists()


def test_a_source_that_is_not_a_model_is_refused(days: TwoDays, tmp_path: Path) -> None:
    config = _config(days.day2, f"train.init_from={tmp_path}")  # a folder without best_model.pt
    info = read_info(str(days.day2))
    model = init_model(config, num_items=info.num_items, device=torch.device("cpu"))
    with pytest.raises(WarmStartError, match="no model file"):
        warm_start(model, config, info, str(days.day2))
    (tmp_path / "best_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WarmStartError, match="not a readable model file"):
        warm_start(model, config, info, str(days.day2))
