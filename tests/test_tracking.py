"""TensorBoard beyond scalars (elcrec_dist.tracking through RunLogger): the config text, the
hparams row with the best validation metric, the projector of items and centres labelled with
original ids, the embedding norms, and step losses echoed to the console."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import write_prepared
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_prep.synthetic import SyntheticSpec
from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import read_info
from elcrec_dist.runlog import RunLogger
from elcrec_dist.tracking import embedding_norms, flat_hparams, record_run


def test_flat_hparams_by_hand() -> None:
    tree = {"model": {"hidden_size": 64, "intents": "learned"}, "eval": {"ks": [5, 20]}, "x": True}
    assert flat_hparams(tree) == {"model.hidden_size": 64, "model.intents": "learned",
                                  "eval.ks": "[5, 20]", "x": True}


def test_embedding_norms_by_hand() -> None:
    config = load_config("configs/demo.yaml", ["model.num_clusters=2", "model.hidden_size=2",
                                               "model.num_heads=1"])
    model = ELCRec(config.model, num_items=2)
    with torch.no_grad():
        model.item_embeddings.weight.copy_(torch.tensor([[9.0, 9.0], [3.0, 4.0], [0.0, 1.0]]))
        model.cluster_centers.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert embedding_norms(model) == {"norms/item_embedding_mean": 3.0,
                                      "norms/item_embedding_max": 5.0, "norms/centre_mean": 1.5}


def test_record_run_writes_config_hparams_and_projector(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    data = write_prepared(tmp_path / "data", SyntheticSpec(users=60, items=40, intents=4))
    config = load_config("configs/demo.yaml", ["model.num_clusters=3"])
    model = ELCRec(config.model, num_items=40)
    run_log = RunLogger(tmp_path / "run", enabled=True)
    with caplog.at_level(logging.INFO, logger="elcrec_dist"):
        run_log.log({"loss/next_item": 1.5, "loss/total": 2.25, "lr": 0.001}, step=7)
    assert "step 7: next_item 1.5000 total 2.2500" in caplog.text
    summary = {"best_valid": 0.125, "test": {"NDCG@20": 0.1}}
    record_run(run_log, config.to_dict(), summary, model, data_url=str(data),
               info=read_info(str(data)), step=7)
    run_log.close()
    tb = tmp_path / "run" / "tb"
    events = EventAccumulator(str(tb), size_guidance={"tensors": 0}).Reload()
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "hidden_size: 64" in text
    assert events.Scalars("norms/centre_mean")[0].value == pytest.approx(
        float(model.cluster_centers.detach().norm(dim=1).mean()))
    hparams = EventAccumulator(str(tb / "hparams")).Reload()
    assert hparams.Scalars("hparam/best_valid_NDCG@20")[0].value == 0.125
    metadata = next(tb.rglob("metadata.tsv")).read_text().splitlines()
    assert metadata[0] == "label\tkind"
    assert metadata[1:41] == [f"{i}\titem" for i in range(1, 41)]  # synthetic ids are originals
    assert metadata[41:] == ["intent 0\tintent", "intent 1\tintent", "intent 2\tintent"]
