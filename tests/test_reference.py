"""Import of published ELCRec checkpoints (spec: "The reference checkpoint")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elcrec_dist.config import ModelConfig
from elcrec_dist.data import eval_batch
from elcrec_dist.evaluation import (
    HistoryItems,
    answer_ranks,
    dense_top_k,
    evaluate,
    tiled_answer_ranks,
    top_k_items,
    user_vectors,
)
from elcrec_dist.model import ELCRec
from elcrec_dist.reference import ReferenceError, load_reference

BEAUTY_ITEMS = 12101


# The official layout, written out by hand (not derived from the code under test): our name ->
# theirs.
def official_name(ours: str) -> str:
    top = {
        "item_embeddings.weight": "item_embeddings.weight",
        "position_embeddings.weight": "position_embeddings.weight",
        "cluster_centers": "cluster_centers",
        "layer_norm.weight": "LayerNorm.weight",
        "layer_norm.bias": "LayerNorm.bias",
    }
    if ours in top:
        return top[ours]
    _, index, module, part, leaf = ours.split(
        "."
    )  # blocks.{i}.{attention|feed_forward}.{part}.{leaf}
    parent = {"attention": "attention", "feed_forward": "intermediate"}[module]
    part = {"layer_norm": "LayerNorm"}.get(part, part)
    return f"item_encoder.layer.{index}.{parent}.{part}.{leaf}"


def fake_published(model: ELCRec) -> dict[str, torch.Tensor]:
    """``model``'s state in the official key layout, with the extra (N + 2)-th item row."""
    published = {official_name(k): v.clone() for k, v in model.state_dict().items()}
    table = published["item_embeddings.weight"]
    published["item_embeddings.weight"] = torch.cat([table, torch.randn(1, table.shape[1])])
    return published


SMALL = ModelConfig(num_layers=2, num_clusters=7)
SMALL_ITEMS = 30


@pytest.fixture
def small_checkpoint(tmp_path: Path) -> tuple[ELCRec, Path]:
    torch.manual_seed(123)
    source = ELCRec(SMALL, num_items=SMALL_ITEMS)
    with torch.no_grad():  # move LayerNorms and biases off their (1, 0) init so a miss shows
        for name, param in source.named_parameters():
            if "layer_norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path / "ELCRec-Fake-1.pt"
    torch.save(fake_published(source), path)
    return source, path


def test_fake_layout_covers_the_documented_keys(small_checkpoint: tuple[ELCRec, Path]) -> None:
    _, path = small_checkpoint
    published = torch.load(path, weights_only=True)
    assert published["item_embeddings.weight"].shape == (SMALL_ITEMS + 2, 64)  # N + 2 rows
    assert published["cluster_centers"].shape == (7, 64)
    assert published["item_encoder.layer.1.intermediate.dense_1.weight"].shape == (256, 64)
    assert published["item_encoder.layer.1.intermediate.dense_2.weight"].shape == (64, 256)
    assert "item_encoder.layer.0.attention.LayerNorm.bias" in published
    assert "LayerNorm.weight" in published


def test_another_datasets_checkpoint_round_trips(small_checkpoint: tuple[ELCRec, Path]) -> None:
    source, path = small_checkpoint
    torch.manual_seed(999)
    target = ELCRec(SMALL, num_items=SMALL_ITEMS)
    assert not torch.equal(target.item_embeddings.weight, source.item_embeddings.weight)
    load_reference(path, target)

    # every parameter equals the source's; the extra last item row was dropped
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    assert target.item_embeddings.weight.shape == (SMALL_ITEMS + 1, 64)

    source.eval()
    target.eval()
    items = torch.randint(0, SMALL_ITEMS + 1, (5, SMALL.max_len))
    items[0, :45] = 0  # a short, left-padded user
    with torch.no_grad():
        hidden_s, hidden_t = source(items), target(items)
        assert torch.equal(hidden_t, hidden_s)
        scores_s = source.score_all(source.user_vector(hidden_s))
        scores_t = target.score_all(target.user_vector(hidden_t))
    assert scores_t.shape == (5, SMALL_ITEMS + 1)
    assert torch.equal(scores_t, scores_s)


def expect_refusal(path: Path, model: ELCRec, *patterns: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ReferenceError) as info:
        load_reference(path, model)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    # a refused import leaves the model as it was
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_more_layers_than_the_checkpoint_is_refused(small_checkpoint: tuple[ELCRec, Path]) -> None:
    _, path = small_checkpoint
    model = ELCRec(ModelConfig(num_layers=3, num_clusters=7), num_items=SMALL_ITEMS)
    expect_refusal(path, model, "lacks", "blocks.2.attention.query.weight")


def test_fewer_layers_than_the_checkpoint_is_refused(small_checkpoint: tuple[ELCRec, Path]) -> None:
    _, path = small_checkpoint
    model = ELCRec(ModelConfig(num_layers=1, num_clusters=7), num_items=SMALL_ITEMS)
    expect_refusal(path, model, "item_encoder.layer.1.", "1 layer(s)")


def test_wrong_cluster_count_is_refused(small_checkpoint: tuple[ELCRec, Path]) -> None:
    _, path = small_checkpoint
    model = ELCRec(ModelConfig(num_layers=2, num_clusters=8), num_items=SMALL_ITEMS)
    expect_refusal(path, model, "cluster_centers is [7, 64]", "[8, 64]", "model.num_clusters")


@pytest.mark.parametrize("num_items", [SMALL_ITEMS - 1, SMALL_ITEMS + 1])
def test_wrong_item_count_is_refused(small_checkpoint: tuple[ELCRec, Path], num_items: int) -> None:
    _, path = small_checkpoint
    model = ELCRec(SMALL, num_items=num_items)
    # 30 items -> 32 rows; a model for 29 items expects 31, one for 31 expects 33
    expect_refusal(path, model, "item_embeddings.weight is [32, 64]", f"[{num_items + 2}, 64]")


def test_unknown_key_is_refused(small_checkpoint: tuple[ELCRec, Path], tmp_path: Path) -> None:
    _, path = small_checkpoint
    published = torch.load(path, weights_only=True)
    published["item_encoder.layer.0.attention.rotary.weight"] = torch.zeros(2)
    bad = tmp_path / "extra.pt"
    torch.save(published, bad)
    expect_refusal(bad, ELCRec(SMALL, num_items=SMALL_ITEMS), "unknown key", "rotary")


def test_missing_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    model = ELCRec(SMALL, num_items=SMALL_ITEMS)
    expect_refusal(tmp_path / "nope.pt", model, "no such file")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    expect_refusal(garbage, model, "cannot be read")
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, nested)
    expect_refusal(nested, model, "plain state_dict")


# --- the published Beauty checkpoint ------------------------------------------------------------


@pytest.fixture(scope="session")
def beauty_checkpoint(shared_dir: Path) -> Path:
    path = shared_dir / "reference" / "ELCRec-Beauty-1.pt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (published Beauty checkpoint)")
    return path


@pytest.mark.parametrize("rule", ["exclude", "score_zero"])
def test_beauty_checkpoint_reproduces_the_published_numbers(
    beauty_checkpoint: Path, beauty_sequences, rule: HistoryItems
) -> None:
    """Under both history rules (eval.history_items): no Beauty answer repeats a history item
    and the answers that reach the top 20 score above 0, so the two agree here."""
    info, _, seqs = beauty_sequences
    assert info.num_items == BEAUTY_ITEMS
    model = ELCRec(ModelConfig(num_layers=1, num_clusters=256), num_items=BEAUTY_ITEMS)
    load_reference(beauty_checkpoint, model)
    metrics = evaluate(model, seqs, split="test", history_items=rule)
    rounded = {name: round(value, 4) for name, value in metrics.items() if name != "MRR"}
    # Table 1 (HR@5, NDCG@5, HR@20, NDCG@20) plus the @10 values of the same checkpoint
    assert rounded == {
        "HR@5": 0.0529,
        "NDCG@5": 0.0355,
        "HR@10": 0.0762,
        "NDCG@10": 0.0429,
        "HR@20": 0.1079,
        "NDCG@20": 0.0509,
    }


@pytest.fixture(scope="session")
def beauty_model(beauty_checkpoint: Path) -> ELCRec:
    model = ELCRec(ModelConfig(num_layers=1, num_clusters=256), num_items=BEAUTY_ITEMS)
    load_reference(beauty_checkpoint, model)
    return model.eval()


def test_beauty_row_is_the_same_from_the_dense_matrix(
    beauty_model: ELCRec, beauty_sequences
) -> None:
    """The paper's row above comes through the default tiles; the dense reference gives it too."""
    _, _, seqs = beauty_sequences
    tiled = evaluate(beauty_model, seqs, split="test")
    assert evaluate(beauty_model, seqs, split="test", tile_items=None) == tiled


@torch.no_grad()
def test_beauty_tiled_ranks_and_top_k_equal_the_dense_matrix_exactly(
    beauty_model: ELCRec, beauty_sequences
) -> None:
    """Every user's rank (valid and test) and top-20 (ids and scores) with the published weights,
    tile sizes that leave a remainder (12,101 items is prime), one tile of exactly N and one
    larger than N, against the dense [B, N + 1] matrix: equal, not close. Batches of 1,024 users
    and the last one of 859 (float products: see elcrec_dist.evaluation on when they agree)."""
    _, _, seqs = beauty_sequences
    table = beauty_model.item_embeddings.weight
    tiles = (1000, 4096, BEAUTY_ITEMS, 16384)
    for split in ("valid", "test"):
        for start in range(0, len(seqs), 1024):
            batch = eval_batch(seqs[start : start + 1024], split, beauty_model.config.max_len)
            users = user_vectors(beauty_model, batch.inputs)
            dense = beauty_model.score_all(users).float()
            ranks = answer_ranks(dense, batch.answers, batch.history)
            best = dense_top_k(dense, batch.history, k=20)
            for tile in tiles:
                got = tiled_answer_ranks(
                    users, table, batch.answers, batch.history, tile_items=tile
                )
                assert torch.equal(got, ranks), (split, start, tile)
                if split == "test":
                    top = top_k_items(users, table, batch.history, k=20, tile_items=tile)
                    assert torch.equal(top.items, best.items), (start, tile)
                    assert torch.equal(top.scores, best.scores), (start, tile)


@pytest.mark.parametrize(
    ("config", "num_items", "patterns"),
    [
        (ModelConfig(num_layers=2, num_clusters=256), BEAUTY_ITEMS, ["lacks", "blocks.1."]),
        (
            ModelConfig(num_layers=1, num_clusters=512),
            BEAUTY_ITEMS,
            ["cluster_centers is [256, 64]", "[512, 64]"],
        ),
        (
            ModelConfig(num_layers=1, num_clusters=256),
            BEAUTY_ITEMS - 1,
            ["item_embeddings.weight is [12103, 64]", "12100 items", "[12102, 64]"],
        ),
    ],
    ids=["two-layers", "k512", "wrong-items"],
)
def test_beauty_checkpoint_shape_refusals(
    beauty_checkpoint: Path, config: ModelConfig, num_items: int, patterns: list[str]
) -> None:
    expect_refusal(beauty_checkpoint, ELCRec(config, num_items=num_items), *patterns)
