"""The item table's gradient exchange (``deepspeed.item_exchange``, elcrec_dist.trainer.exchange).

- the rows a step can give a gradient are exactly the ones ``touched_rows`` lists (a dense
  backward on one process: every non-zero gradient row is listed);
- on 2 ranks over gloo, a few steps with ``sparse`` (and ``auto``) leave parameters and Adam
  moments bitwise equal to ``dense``; bytes per step are what the formulas give for the rows
  each rank touched;
- on 3 ranks ranks stay bitwise identical, and the update equals dense up to summation order;
- ``sparse`` under ZeRO is refused at config validation; ``auto`` is dense there.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import deepspeed_command, deepspeed_env

from elcrec_dist.batching import make_train_batch
from elcrec_dist.config import ConfigError, load_config
from elcrec_dist.losses import elcrec_terms, weighted_total
from elcrec_dist.model import ELCRec
from elcrec_dist.trainer.exchange import (
    DenseExchange,
    ExchangeLog,
    item_exchange,
    ring_allreduce_bytes,
    touched_rows,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "exchange_steps.py"
HIDDEN = 64


def test_every_row_with_a_gradient_is_a_touched_row() -> None:
    config = load_config(None, ["model.num_clusters=8", "model.hidden_dropout=0.0"])
    num_items = 2000
    torch.manual_seed(0)
    model = ELCRec(config.model, num_items=num_items)
    rng = np.random.default_rng(1)
    users = [rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(5, 60)), replace=False)
             for _ in range(48)]
    batch = make_train_batch(users, num_items=num_items, max_len=config.model.max_len,
                             augment=config.augment, generator=torch.Generator().manual_seed(2))
    weighted_total(elcrec_terms(model, batch, config.loss), config.loss).backward()
    grad = model.item_embeddings.weight.grad
    assert grad is not None
    nonzero = set(torch.nonzero(grad.abs().sum(dim=1)).flatten().tolist())
    listed = set(touched_rows(batch).tolist())
    every_id = np.concatenate([t.numpy().ravel() for t in (batch.inputs, batch.targets,
                                                           batch.negatives, batch.views)])
    assert listed == set(every_id.tolist())  # the unique ids of the batch, nothing else
    assert nonzero <= listed
    assert len(nonzero) > 1000  # a real step: most listed rows do get a gradient
    assert len(listed) < num_items  # and the table has rows the step never touched


def test_sparse_under_zero_is_refused_and_auto_is_dense_there() -> None:
    with pytest.raises(ConfigError, match=r"item_exchange=sparse needs deepspeed\.zero_stage 0"):
        load_config(None, ["deepspeed.item_exchange=sparse", "deepspeed.zero_stage=1"])
    config = load_config(None, ["deepspeed.item_exchange=auto", "deepspeed.zero_stage=2"])
    assert isinstance(item_exchange(config), DenseExchange)
    with pytest.raises(ConfigError, match=r"deepspeed\.item_exchange"):
        load_config(None, ["deepspeed.item_exchange=lazy"])


def test_exchange_log_means_per_step() -> None:
    log = ExchangeLog()
    log.add({"a": 1.0})
    log.add({"a": 4.0, "b": 2.0})
    assert log.drain() == {"a": 2.5, "b": 1.0}
    assert log.drain() == {}
    assert ring_allreduce_bytes(10, 4) == 2 * 3 / 4 * 40


def _launch(out: Path, ranks: int, *, exchange: str, num_items: int = 5000, steps: int = 4,
            overrides: Sequence[str] = ()) -> list[dict]:
    cmd, _ = deepspeed_command(WORKER, "--out", str(out), "--steps", str(steps),
                               "--num-items", str(num_items), ranks=ranks)
    for o in [f"deepspeed.item_exchange={exchange}", *overrides]:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=deepspeed_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


def _assert_equal_runs(a: dict, b: dict) -> None:
    """Parameters and Adam state (step, both moments) bitwise equal, name by name."""
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), name
    assert a["adam"].keys() == b["adam"].keys() and len(a["adam"]) > 0
    for name, state in a["adam"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["adam"][name][key])), (
                name,
                key,
            )
    assert a["losses"] == b["losses"]


@pytest.fixture(scope="module")
def dense_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("dense"), 2, exchange="dense")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["sparse", "auto"])
def test_two_ranks_sparse_update_equals_dense_bitwise(dense_two_ranks: list[dict], tmp_path: Path,
                                                      exchange: str) -> None:
    ranks = _launch(tmp_path, 2, exchange=exchange)
    for r in range(2):
        _assert_equal_runs(ranks[r], dense_two_ranks[r])
    _assert_equal_runs(ranks[0], ranks[1])
    # the Adam moments of rows no step touched decayed as in dense (they stay zero here) and
    # the table really was exchanged sparsely: bytes follow the rows touched, not the catalogue
    table = (5000 + 1) * HIDDEN
    for step, figures in enumerate(ranks[0]["figures"]):
        rows_max = max(rank["figures"][step]["rows_here"] for rank in ranks)
        assert figures["exchange/item_sparse_steps"] == 1.0
        assert figures["exchange/item_bytes_sent"] == (2 - 1) * rows_max * (HIDDEN + 1) * 4
        assert figures["exchange/item_bytes_sent"] < ring_allreduce_bytes(table, 2)
        assert figures["exchange/item_bytes_if_sparse"] == figures["exchange/item_bytes_sent"]
        assert figures["exchange/item_bytes_if_dense"] == ring_allreduce_bytes(table, 2)
        both = sum(rank["figures"][step]["rows_here"] for rank in ranks)
        assert figures["exchange/item_rows_touched"] == both
        assert rows_max <= figures["exchange/item_rows_union"] <= both
    for figures in dense_two_ranks[0]["figures"]:
        assert figures["exchange/item_bytes_sent"] == ring_allreduce_bytes(table, 2)
        assert figures["exchange/item_sparse_steps"] == 0.0


@pytest.mark.distributed
@pytest.mark.slow
def test_auto_stays_dense_where_the_table_is_small(tmp_path: Path) -> None:
    # 300 items: the touched rows of a step (with their ids) cost more than the whole table
    dense = _launch(tmp_path / "dense", 2, exchange="dense", num_items=300, steps=2)
    auto = _launch(tmp_path / "auto", 2, exchange="auto", num_items=300, steps=2)
    _assert_equal_runs(auto[0], dense[0])
    for figures in auto[0]["figures"]:
        assert figures["exchange/item_sparse_steps"] == 0.0
        assert figures["exchange/item_bytes_if_sparse"] > figures["exchange/item_bytes_if_dense"]
        assert figures["exchange/item_bytes_sent"] == figures["exchange/item_bytes_if_dense"]


@pytest.mark.distributed
@pytest.mark.slow
def test_three_ranks_stay_identical_and_match_dense_up_to_summation_order(tmp_path: Path) -> None:
    three = ["train.batch_size=66"]
    dense = _launch(tmp_path / "dense", 3, exchange="dense", steps=3, overrides=three)
    sparse = _launch(tmp_path / "sparse", 3, exchange="sparse", steps=3, overrides=three)
    for r in (1, 2):
        _assert_equal_runs(sparse[r], sparse[0])
    diffs = []
    for name, value in dense[0]["state"].items():
        # Adam's first steps are lr * m / sqrt(v): where a gradient is ~0 up to rounding (the
        # attention key bias's is exactly 0 in theory) another summation order moves an entry
        # by a small fraction of lr (1e-3); everywhere else the two differ by float rounding.
        diff = (sparse[0]["state"][name] - value).abs()
        assert diff.max() <= 2e-5, (name, float(diff.max()))
        diffs.append(diff.flatten())
    assert (torch.cat(diffs) > 1e-7).float().mean() <= 1e-3


def test_a_resume_may_switch_the_exchange_but_not_the_validation_sample() -> None:
    from elcrec_dist.checkpoint import config_changes

    before = load_config(None, []).to_dict()
    switched = load_config(None, ["deepspeed.item_exchange=sparse", "eval.sampled_negatives=100",
                                  "eval.sampled_distribution=popularity"]).to_dict()
    assert config_changes(before, switched).changed == {}
    sampled = load_config(None, ["eval.valid_users=1000"]).to_dict()  # another best model
    assert set(config_changes(before, sampled).changed) == {"eval.valid_users"}
