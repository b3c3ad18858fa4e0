"""The ICLRec-style baseline (``model.intents: epoch_kmeans``): its centres are a plain k-means of
every training user's embedding, they stay fixed through the epoch's steps, and the variant
config layers over a dataset config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import _stream, _tiny_config, _tiny_data

from elcrec_dist.batching import make_train_batch
from elcrec_dist.clustering import kmeans
from elcrec_dist.config import load_config
from elcrec_dist.data import left_pad, train_pairs
from elcrec_dist.losses import elcrec_terms, weighted_total
from elcrec_dist.model import ELCRec
from elcrec_dist.trainer.intents import epoch_kmeans_seed, refresh_intents

REPO = Path(__file__).resolve().parents[1]
ICLREC = [
    "model.intents=epoch_kmeans",
    "loss.cluster_weight=0",
    "loss.fusion=none",
    "model.num_clusters=4",
]


def one_by_one_embeddings(model: ELCRec, seqs: list) -> torch.Tensor:
    """Each user's normalised mean-pooled training input, one forward per user (eval mode)."""
    model.eval()
    rows = []
    with torch.no_grad():
        for seq in seqs:
            hidden = model(left_pad([train_pairs(seq)[0]], model.config.max_len))
            rows.append(F.normalize(hidden.mean(dim=1)[0], dim=0))
    return torch.stack(rows)


@pytest.mark.parametrize("epoch", [0, 5])
def test_epoch_centres_equal_a_plain_kmeans_of_all_user_embeddings(
    tmp_path: Path, epoch: int
) -> None:
    cfg = _tiny_config(ICLREC)
    seqs = _tiny_data(n=30, items=20, seed=3)
    data = _stream(tmp_path, seqs)
    torch.manual_seed(0)
    model = ELCRec(cfg.model, num_items=20)
    stats = refresh_intents(model, data, cfg, epoch=epoch)

    order = [seq for chunk in data.eval_sequences(rank=0, world=1) for seq in chunk.sequences]
    assert sorted(map(tuple, order)) == sorted(map(tuple, seqs))  # every user, once
    embeddings = one_by_one_embeddings(model, order)
    want = kmeans(embeddings, 4, iterations=cfg.kmeans.iterations, restarts=cfg.kmeans.restarts,
                  generator=torch.Generator().manual_seed(epoch_kmeans_seed(cfg.train.seed, epoch)))
    assert torch.allclose(model.cluster_centers.detach(), want.centres, atol=1e-5)
    assert stats["kmeans/users"] == 30
    assert stats["kmeans/inertia"] == pytest.approx(want.inertia, rel=1e-4)
    # centroids of unit vectors are not re-projected onto the sphere
    assert (model.cluster_centers.detach().norm(dim=1) < 1 - 1e-3).any()


def test_epochs_draw_different_kmeans_seeds() -> None:
    assert epoch_kmeans_seed(1, 0) != epoch_kmeans_seed(1, 1) != epoch_kmeans_seed(2, 1)


def test_steps_leave_the_epoch_centres_alone_and_train_the_rest(tmp_path: Path) -> None:
    """A DeepSpeed step with frozen centres equals torch Adam over every other parameter."""
    from elcrec_dist import distributed as dist_utils
    from elcrec_dist.trainer.engine import GRAD_NORM, build_engine, train_step

    dist_utils.init()
    cfg = _tiny_config(ICLREC)
    seqs = _tiny_data(n=8, seed=4)
    torch.manual_seed(0)
    model = ELCRec(cfg.model, num_items=20)
    refresh_intents(model, _stream(tmp_path, seqs), cfg, epoch=0)
    centres = model.cluster_centers.detach().clone()
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    batch = make_train_batch(
        seqs[:4],
        num_items=20,
        max_len=6,
        augment=cfg.augment,
        generator=torch.Generator().manual_seed(1),
    )

    engine = build_engine(model, cfg)
    logged = train_step(engine, batch, cfg)

    trainable = [p for name, p in reference.named_parameters() if name != "cluster_centers"]
    opt = torch.optim.Adam(trainable, lr=cfg.train.lr, betas=cfg.train.betas, eps=1e-8)
    loss = weighted_total(
        elcrec_terms(reference, batch, cfg.loss, normalised_centres=False), cfg.loss
    )
    loss.backward()
    opt.step()

    assert set(logged) == {
        "loss/next_item", "loss/seq_cl", "loss/intent_cl", "loss/total", GRAD_NORM
    }
    # the norm covers the trained parameters only: the frozen centres have no gradient
    grads = [p.grad for p in trainable]
    assert all(g is not None for g in grads)
    squares = sum(float(g.double().square().sum()) for g in grads if g is not None)
    assert logged[GRAD_NORM] == pytest.approx(squares**0.5, rel=1e-5)
    assert logged["loss/total"] == pytest.approx(float(loss.detach()), rel=1e-6)
    # no optimizer update, no projection
    assert torch.equal(model.cluster_centers.detach(), centres)
    for (name, ours), theirs in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.allclose(ours, theirs, atol=1e-6), name
    moved = {
        name for name, value in model.state_dict().items() if not torch.equal(value, initial[name])
    }
    assert "item_embeddings.weight" in moved and "cluster_centers" not in moved


def test_iclrec_variant_layers_over_a_dataset_config() -> None:
    config = load_config(
        [REPO / "configs" / "beauty.yaml", REPO / "configs" / "variants" / "iclrec.yaml"]
    )
    assert config.model.intents == "epoch_kmeans"
    assert config.loss.cluster_weight == 0 and config.loss.fusion == "none"
    # the dataset's settings
    assert config.model.num_clusters == 256 and config.kmeans.iterations == 20
