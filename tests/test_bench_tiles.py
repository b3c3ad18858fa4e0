"""The tile benchmarks run as documented and report what they measured: the figures' structure,
the dense matrix's size by hand, and tiled == dense where the arithmetic is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elcrec_dist import checkpoint as ckpt
from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import read_info

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_topk_memory_reports_each_case_against_the_dense_matrix() -> None:
    got = bench("bench.topk_memory", "--items", "3000", "--users", "64", "--tile-items", "1000",
                "--repeat", "1")
    assert got["dense_matrix_mib"] == round(64 * 3001 * 4 / 2**20, 1)  # [B, N + 1] float32
    assert got["tile_mib"] == round(64 * 1000 * 4 / 2**20, 1)
    for kind in ("rank", "top_k"):
        for path in ("tiled", "dense"):
            figures = got[kind][path]
            assert figures["seconds"] > 0 and figures["cpu_seconds"] > 0
            assert figures["peak_mib"] >= 0
    # random normal scores: no exact ties, so even torch.topk's order is defined
    assert got["ranks_equal"] is True and got["top_k_equal"] is True
    assert got["cpu"] and got["threads"] >= 1


def test_softmax_memory_reports_chunks_against_the_whole_logits() -> None:
    got = bench("bench.softmax_memory", "--items", "3000", "--batch", "2", "--max-len", "10",
                "--max-logits", "12000", "--cases", "chunked", "whole")
    assert got["positions"] == 20 and got["chunk_positions"] == 4  # 12,000 // 3,000
    assert got["whole_logits_mib"] == round(20 * 3000 * 4 / 2**20, 1)  # [P, N] float32
    for case in ("chunked", "whole"):
        assert got[case]["seconds"] > 0 and got[case]["peak_mib"] >= 0
    # float32 rounding of another summation order, nothing more
    assert all(0 <= diff < 1e-5 for diff in got["max_rel_diff"].values())
    assert got["cpu"] and got["threads"] >= 1


def test_eval_tiles_times_each_setting_and_checks_the_metrics(
    small_synthetic: Path, tmp_path: Path
) -> None:
    # signed unit-axis item rows make every score exact, so every setting must give the dense
    # pass's sums bit for bit (tests/test_tiles.py says why)
    config = load_config(REPO / "configs" / "demo.yaml", [f"data.path={small_synthetic}"])
    num_items = read_info(str(small_synthetic)).num_items
    torch.manual_seed(0)
    model = ELCRec(config.model, num_items=num_items)
    axes = torch.randint(0, config.model.hidden_size, (num_items + 1,))
    with torch.no_grad():
        model.item_embeddings.weight.zero_()
        model.item_embeddings.weight[torch.arange(num_items + 1), axes] = 1.0
    path = tmp_path / "best_model.pt"
    ckpt.save_model(path, state=model.state_dict(), config=config.to_dict(), meta={})
    got = bench("bench.eval_tiles", "--data", str(small_synthetic), "--checkpoint", str(path),
                "--tiles", "7", "40", "--repeat", "3")
    assert set(got["fastest_s"]) == {"dense", "tile_7", "tile_40"}
    for name, fastest in got["fastest_s"].items():
        assert 0 < fastest <= got["median_s"][name]
    assert got["users"] == 60 and got["items"] == num_items == 40
    assert got["metrics_equal_dense"] is True


@pytest.mark.parametrize(
    "module", ["bench.topk_memory", "bench.eval_tiles", "bench.softmax_memory"]
)
def test_help_names_the_command(module: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    assert f"python -m {module}" in proc.stdout
