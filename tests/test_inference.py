"""Batch inference (launcher/infer.py): the exported top-K against evaluate.py and a naive
ranking, 2 processes against 1, original ids through the id maps, s3://, and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import write_prepared
from launch import deepspeed_command, deepspeed_env
from test_prep_reference import build, events_csv

from data_prep.synthetic import SyntheticSpec
from elcrec_dist.checkpoint import CheckpointError, save_model
from elcrec_dist.config import load_config
from elcrec_dist.data import left_pad
from elcrec_dist.evaluation import metric_sums
from elcrec_dist.inference import load_trained, read_recommendations
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 planted-intent users, 120 items, in 2 files of many row groups (work units)."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    spec = SyntheticSpec(users=600, items=120, intents=4, seed=3)
    return write_prepared(out, spec, shards=2, rows_per_group=64)


@pytest.fixture(scope="module")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real training run (one process) on ``dataset``: a run folder as users get it."""
    run_dir = tmp_path_factory.mktemp("runs") / "small"
    sets = ["train.epochs=3", "model.num_clusters=6", "kmeans.sample_users=300",
            "train.batch_size=64", "eval.batch_size=128", "train.log_every=5"]
    args = ["launcher/train.py", "--config", "configs/demo.yaml", "--data", str(dataset),
            "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    last_json(run(*args))
    return run_dir


def ranks_from_top_k(rows: list[dict], answers: dict[int, int], k: int) -> torch.Tensor:
    """Each user's pessimistic 0-based rank of its answer from its exported top-K alone: the
    other listed items scoring >= the answer; k (a miss) when the answer is not listed. An
    answer tied with the last listed item could rank lower than the list shows: refused."""
    ranks = []
    for row in rows:
        answer = answers[row["user"]]
        if answer not in row["items"]:
            ranks.append(k)
            continue
        score = row["scores"][row["items"].index(answer)]
        assert row["items"][-1] == answer or row["scores"][-1] < score, "tie at the cut"
        ranks.append(sum(1 for i, s in zip(row["items"], row["scores"], strict=True)
                         if i != answer and s >= score))
    return torch.tensor(ranks)


def test_top_20_of_the_test_split_gives_evaluate_py_metrics_exactly(
    trained_run: Path, dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "recs"
    last_json(run("launcher/infer.py", str(trained_run), "--data", str(dataset),
                  "--output", str(out), "--split", "test", "--k", "20"))
    expected = last_json(run("launcher/evaluate.py", "--config", str(trained_run / "config.yaml"),
                             "--data", str(dataset),
                             "--checkpoint", str(trained_run / "best_model.pt"), "--split", "test"))
    _, user_ids, sequences = load_sequences(str(dataset))
    answers = {int(u): int(s[-1]) for u, s in zip(user_ids, sequences, strict=True)}
    assert sum(int(s[-1]) in s[:-1] for s in sequences) > 0  # repeats do occur: the rule matters
    rows = read_recommendations(str(out)).to_pylist()
    assert [r["user"] for r in rows] == user_ids.tolist()  # one row per user, manifest order
    ranks = ranks_from_top_k(rows, answers, 20)
    # summed like evaluation: batches of eval.batch_size users in order, then divided
    totals = {"HR@20": 0.0, "NDCG@20": 0.0}
    batch = load_trained(trained_run).config.eval.batch_size
    for start in range(0, len(ranks), batch):
        sums = metric_sums(ranks[start : start + batch], [20])
        for name in totals:
            totals[name] += sums[name]
    assert 0 < totals["HR@20"] < len(ranks)
    for name, value in totals.items():
        assert value / len(ranks) == expected[name], name


def naive_top_k(scores: np.ndarray, excluded: set[int], k: int) -> list[int]:
    """Items 1..N by score descending, ties by id, skipping ``excluded``: a plain sort."""
    order = sorted((i for i in range(1, len(scores)) if i not in excluded),
                   key=lambda i: (-scores[i], i))
    return order[:k]


def test_serving_rows_equal_a_naive_ranking_and_nearest_intent(trained_run: Path, dataset: Path,
                                                              tmp_path: Path) -> None:
    trained = load_trained(trained_run)
    model = trained.model
    _, user_ids, sequences = load_sequences(str(dataset))
    table = model.item_embeddings.weight.detach().numpy().astype(np.float64)
    centres = F.normalize(model.cluster_centers.detach(), dim=-1).numpy().astype(np.float64)
    for keep in (False, True):
        out = tmp_path / f"keep-{keep}"
        flags = ["--keep-history"] if keep else []
        last_json(run("launcher/infer.py", str(trained_run), "--data", str(dataset), "--output",
                      str(out), "--k", "10", *flags))
        rows = read_recommendations(str(out)).to_pylist()
        assert len(rows) == len(sequences)
        picked = range(0, len(rows), 37)
        with torch.no_grad():
            padded = left_pad([sequences[i] for i in picked], model.config.max_len)
            pooled = model.pooled(model(padded)).numpy().astype(np.float64)
        for j, i in enumerate(picked):
            row, seq = rows[i], sequences[i]
            assert row["user"] == int(user_ids[i])
            vector = np.asarray(row["user_vector"], dtype=np.float64)
            scores = table @ vector  # float64: no float32 near-tie can flip the naive order
            excluded = set() if keep else set(seq.tolist())
            assert row["items"] == naive_top_k(scores, excluded, 10)
            assert np.allclose(row["scores"], scores[row["items"]], rtol=1e-5, atol=1e-5)
            if not keep:
                assert not set(row["items"]) & set(seq.tolist())
            cosines = centres @ (pooled[j] / np.linalg.norm(pooled[j]))
            assert row["intent"] == int(np.argmax(cosines))
            assert row["intent_cosine"] == pytest.approx(cosines.max(), abs=1e-5)


@pytest.mark.distributed
def test_two_processes_write_the_bytes_one_process_writes(trained_run: Path, dataset: Path,
                                                          tmp_path: Path) -> None:
    outs = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks-{ranks}"
        cmd, _ = deepspeed_command("launcher/infer.py", str(trained_run), "--data", str(dataset),
                                   "--output", str(out), "--shard-users", "130", ranks=ranks)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=deepspeed_env())
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outs[ranks] = out
    one = json.loads((outs[1] / "manifest.json").read_text())
    two = json.loads((outs[2] / "manifest.json").read_text())
    assert len(one["files"]) == 5  # ceil(600 / 130) shards
    assert one["files"] == two["files"]  # names, sizes and sha256 of every shard
    for entry in one["files"]:
        assert (outs[1] / entry["path"]).read_bytes() == (outs[2] / entry["path"]).read_bytes()
    assert sorted(p.name for p in outs[2].iterdir()) == sorted([*(f["path"] for f in one["files"]),
                                                                 "manifest.json"])


def test_original_ids_come_from_the_datasets_id_maps(tmp_path: Path) -> None:
    # a raw log with string ids: contiguous ids are assigned by the build, originals must return
    rng = np.random.default_rng(0)
    events = [(f"user-{u}", f"sku-{int(rng.integers(0, 30))}", t, "click")
              for u in range(40) for t in range(int(rng.integers(5, 12)))]
    log = events_csv(tmp_path / "log.csv", events)
    data = tmp_path / "data"
    assert build(log, data, "--min-user-interactions", "4", "--min-item-interactions", "1",
                 "--shards", "2") == 0
    info, user_ids, sequences = load_sequences(str(data))
    config = load_config("configs/demo.yaml", ["model.num_clusters=3", f"data.path={data}"])
    torch.manual_seed(0)
    model = ELCRec(config.model, num_items=info.num_items).eval()
    run_dir = tmp_path / "run"
    save_model(
        run_dir / "best_model.pt", state=model.state_dict(), config=config.to_dict(), meta={}
    )
    out = tmp_path / "recs"
    last_json(run("launcher/infer.py", str(run_dir), "--output", str(out), "--k", "5"))  # data.path
    rows = read_recommendations(str(out)).to_pylist()

    item_map = pq.read_table(data / "item_map.parquet").to_pylist()
    item_of = {r["item_id"]: r["item"] for r in item_map}
    user_map = pa.concat_tables(pq.read_table(p) for p in sorted((data / "user_map").iterdir()))
    user_of = dict(zip(user_map["user_id"].to_pylist(), user_map["user"].to_pylist(), strict=True))
    table = model.item_embeddings.weight.detach().numpy().astype(np.float64)
    assert [r["user"] for r in rows] == [user_of[int(u)] for u in user_ids]
    for row, seq in zip(rows, sequences, strict=True):
        assert row["user"].startswith("user-")
        scores = table @ np.asarray(row["user_vector"], dtype=np.float64)
        assert row["items"] == [item_of[i] for i in naive_top_k(scores, set(seq.tolist()), 5)]


def test_model_and_output_in_s3_equal_the_local_output(
    trained_run: Path, dataset: Path, tmp_path: Path, s3_env: str
) -> None:
    import os

    local = tmp_path / "local"
    last_json(run("launcher/infer.py", str(trained_run), "--data", str(dataset), "--output",
                  str(local), "--shard-users", "250"))
    # the run folder in the bucket too (a trainer may write it there)
    import fsspec

    fsspec.filesystem("s3").put_file(str(trained_run / "best_model.pt"),
                                     f"{s3_env}/run/best_model.pt")
    url = f"s3://{s3_env}/recs"
    last_json(run("launcher/infer.py", f"s3://{s3_env}/run", "--data", str(dataset), "--output",
                  url, "--shard-users", "250", env=dict(os.environ)))
    assert read_recommendations(url).equals(read_recommendations(str(local)))
    listed = sorted(p.rsplit("/", 1)[-1] for p in fsspec.filesystem("s3").find(f"{s3_env}/recs"))
    assert listed == ["manifest.json", "part-00000-of-00003.parquet",
                      "part-00001-of-00003.parquet", "part-00002-of-00003.parquet"]


def test_refusals_exit_2_and_write_nothing(
    trained_run: Path, dataset: Path, tmp_path: Path
) -> None:
    # a folder holding something else
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    proc = run("launcher/infer.py", str(trained_run), "--data", str(dataset), "--output", str(busy))
    assert proc.returncode == 2 and "notes.txt" in proc.stderr
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    # a dataset whose catalogue is not the model's
    other = write_prepared(tmp_path / "other", SyntheticSpec(users=60, items=40, intents=4))
    proc = run("launcher/infer.py", str(trained_run), "--data", str(other), "--output",
               str(tmp_path / "never"))
    assert proc.returncode == 2
    assert "40 items" in proc.stderr and "120" in proc.stderr, proc.stderr
    assert not (tmp_path / "never").exists()
    # a finished output asked again: nothing to do; asked with other arguments: refused
    done = tmp_path / "done"
    last_json(
        run("launcher/infer.py", str(trained_run), "--data", str(dataset), "--output", str(done))
    )
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    again = last_json(run("launcher/infer.py", str(trained_run), "--data", str(dataset), "--output",
                          str(done)))
    assert again["already_complete"] is True
    proc = run("launcher/infer.py", str(trained_run), "--data", str(dataset), "--output", str(done),
               "--k", "7")
    assert proc.returncode == 2 and "another request" in proc.stderr
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before


def test_a_model_file_whose_config_does_not_fit_its_weights_is_refused(tmp_path: Path) -> None:
    config = load_config("configs/demo.yaml", ["model.num_clusters=6"])
    model = ELCRec(config.model, num_items=30)
    wrong = load_config("configs/demo.yaml", ["model.num_clusters=8"])
    save_model(tmp_path / "run" / "best_model.pt", state=model.state_dict(), config=wrong.to_dict(),
               meta={})
    with pytest.raises(CheckpointError, match=r"cluster_centers is \(6, 64\).*\(8, 64\)"):
        load_trained(tmp_path / "run")
    proc = run("launcher/infer.py", str(tmp_path / "run"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "cluster_centers" in proc.stderr
    assert not (tmp_path / "out").exists()
