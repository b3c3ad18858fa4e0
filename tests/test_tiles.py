"""Scoring in item tiles: the running rank count and the running top-K against the dense score
matrix they replace, hand-computed cases and a naive per-user loop (spec: "Evaluation").

Exact equality needs the tiles' dot products to equal the dense matrix's. Tables and users with
small integer values make every product and sum exact in float32, whatever kernel computes them,
so these tests hold on any machine, and they make many exact ties.
"""

from __future__ import annotations

import math

import pytest
import torch

from elcrec_dist.config import ConfigError, ModelConfig, load_config
from elcrec_dist.data import eval_batch
from elcrec_dist.evaluation import (
    HistoryItems,
    SharedScores,
    answer_ranks,
    dense_top_k,
    evaluate_sums,
    naive_answer_rank,
    recommend,
    tile_ranges,
    tiled_answer_ranks,
    top_k_items,
)
from elcrec_dist.model import ELCRec

# --- hand-computed cases ------------------------------------------------------------------------
# With D = 1 and every user vector [1.0], a user's score of item i is table[i]: the scores are
# written out directly.

#          pad   1    2    3    4    5
SCORES = [9.0, 0.5, 0.75, 0.5, 0.125, 0.75]  # exact in float32


def one_column(scores: list[float]) -> torch.Tensor:
    return torch.tensor(scores, dtype=torch.float32)[:, None]  # [N + 1, 1]


def tiled_rank(
    scores: list[float], answer: int, history: list[int], tile: int, rule: HistoryItems = "exclude"
) -> int:
    ranks = tiled_answer_ranks(
        torch.ones(1, 1), one_column(scores), torch.tensor([answer]),
        torch.tensor([history or [0]]), tile_items=tile, history_items=rule,
    )
    return int(ranks[0])


@pytest.mark.parametrize("tile", [1, 2, 4, 5, 100])
def test_tiled_rank_by_hand(tile: int) -> None:
    # answer 1 (0.5): items 2 and 5 (0.75) and 3 (0.5, a tie: pessimistic) count -> 3;
    # the padding row's 9.0 never counts.
    assert tiled_rank(SCORES, 1, [], tile) == 3
    # answer 2 (0.75): item 5 ties -> 1; answer 4 (0.125) is last of 5 -> 4
    assert tiled_rank(SCORES, 2, [], tile) == 1
    assert tiled_rank(SCORES, 4, [], tile) == 4
    # history 5 and 3 are excluded (and 3 twice counts once): answer 1 is behind item 2 only
    assert tiled_rank(SCORES, 1, [5, 3, 3, 0], tile) == 1
    # the answer in its own history keeps its score: a repeated purchase is still rankable
    assert tiled_rank(SCORES, 1, [1, 1], tile) == 3


@pytest.mark.parametrize("tile", [1, 2, 4, 5, 100])
def test_tiled_rank_by_hand_under_the_reference_rule(tile: int) -> None:
    """``score_zero``: history scores become 0 and the padding row is a candidate."""
    zero: HistoryItems = "score_zero"
    # no history: the padding row's 9.0 counts too -> 4 (3 under exclude)
    assert tiled_rank(SCORES, 1, [], tile, zero) == 4
    # history 5 and 3 score 0, below the answer's 0.5: only the padding row and item 2 -> 2
    assert tiled_rank(SCORES, 1, [5, 3, 3, 0], tile, zero) == 2
    # the answer repeats a history item: it competes at 0, and every other candidate (padding
    # 9.0, item 2 zeroed to 0 (a tie), 3, 4, 5) is >= 0 -> 5, last (2 under exclude)
    assert tiled_rank(SCORES, 1, [1, 2], tile, zero) == 5
    assert tiled_rank(SCORES, 1, [1, 2], tile) == 2
    #             pad    1     2      3     4
    negative = [-1.0, 0.25, -0.5, -0.25, 0.5]
    # an answer scoring below 0 (item 3, -0.25) falls behind its history (1 and 4, now 0):
    # 2 under score_zero, first (0) under exclude
    assert tiled_rank(negative, 3, [1, 4], tile, zero) == 2
    assert tiled_rank(negative, 3, [1, 4], tile) == 0
    # nothing in the history: the same rank under both rules, the padding row being below
    assert tiled_rank(negative, 3, [], tile, zero) == tiled_rank(negative, 3, [], tile) == 2


def top(scores: list[float], history: list[int], k: int, tile: int, keep: bool = False):
    got = top_k_items(
        torch.ones(1, 1), one_column(scores), torch.tensor([history or [0]]),
        k=k, keep_history=keep, tile_items=tile,
    )
    return got.items[0].tolist(), got.scores[0].tolist()


@pytest.mark.parametrize("tile", [1, 2, 3, 5, 100])
def test_top_k_by_hand(tile: int) -> None:
    # 0.75 ties between items 2 and 5: smaller id first; then 0.5 for items 1 and 3
    assert top(SCORES, [], 3, tile) == ([2, 5, 1], [0.75, 0.75, 0.5])
    assert top(SCORES, [], 5, tile)[0] == [2, 5, 1, 3, 4]  # padding (9.0) never returned
    # history 2 and 1 excluded ...
    assert top(SCORES, [2, 1, 0], 3, tile)[0] == [5, 3, 4]
    # ... unless kept
    assert top(SCORES, [2, 1, 0], 3, tile, keep=True)[0] == [2, 5, 1]
    # fewer candidates than k: the rest is item 0 with score -inf
    assert top(SCORES, [2, 1, 5], 4, tile) == ([3, 4, 0, 0], [0.5, 0.125, -math.inf, -math.inf])
    assert top(SCORES, [1, 2, 3, 4, 5], 2, tile) == ([0, 0], [-math.inf, -math.inf])


@pytest.mark.parametrize("tile", [1, 2, 3, 7])
def test_top_k_orders_negative_zero_and_infinite_scores(tile: int) -> None:
    #            pad    1     2     3      4         5     6          7
    scores = [0.0, -1.0, 0.0, -0.0, -math.inf, -2.5, math.inf, -0.0]
    items, values = top(scores, [], 7, tile)
    # -0.0 and 0.0 are one score: items 2, 3, 7 tie and come in id order; a real -inf item is
    # returned with its id, after every finite score
    assert items == [6, 2, 3, 7, 1, 5, 4]
    assert values == [math.inf, 0.0, 0.0, 0.0, -1.0, -2.5, -math.inf]
    assert [math.copysign(1, v) for v in values[1:4]] == [1.0, 1.0, 1.0]
    # the dense reference agrees, signs of zeros included
    ref = dense_top_k(one_column(scores).T, torch.zeros(1, 1, dtype=torch.int64), k=7)
    assert ref.items[0].tolist() == items and ref.scores[0].tolist() == values
    assert all(math.copysign(1, v) == 1.0 for v in ref.scores[0, 1:4].tolist())


def test_bad_arguments_are_refused() -> None:
    table, users = one_column(SCORES), torch.ones(1, 1)
    history = torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.5"):
        top_k_items(users, table, history, k=6, tile_items=2)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.5"):
        top_k_items(users, table, history, k=0, tile_items=2)
    with pytest.raises(ValueError, match="tile_items must be >= 1"):
        tiled_answer_ranks(users, table, torch.tensor([1]), history, tile_items=0)
    with pytest.raises(ConfigError, match=r"eval\.tile_items must be >= 1, got 0"):
        load_config(None, ["eval.tile_items=0"])
    with pytest.raises(ValueError, match="history_items must be one of"):
        tiled_answer_ranks(users, table, torch.tensor([1]), history, tile_items=2,
                           history_items="minus_inf")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"eval\.history_items"):
        load_config(None, ["eval.history_items=minus_inf"])


def test_tiles_cover_every_item_once() -> None:
    for n, tile in [(10, 3), (10, 5), (10, 10), (10, 11), (1, 1), (7, 1)]:
        ranges = list(tile_ranges(n, tile))
        covered = [i for lo, hi in ranges for i in range(lo, hi)]
        assert covered == list(range(1, n + 1)), (n, tile)
        assert all(hi - lo <= tile for lo, hi in ranges)
        assert len(ranges) == -(-n // tile)


# --- random integer tables: tiled == dense == naive loop -----------------------------------------


def integer_problem(seed: int, *, users: int = 48, width: int = 9):
    """Users, table, answers and histories with small integer values (exact products, ties),
    the padding row among the highest scores, duplicate history ids, answers in their history."""
    gen = torch.Generator().manual_seed(seed)
    num_items = int(torch.randint(1, 50, (), generator=gen))
    dim = int(torch.randint(1, 5, (), generator=gen))
    table = torch.randint(-2, 3, (num_items + 1, dim), generator=gen).float()
    table[0] = 3.0
    vectors = torch.randint(-2, 3, (users, dim), generator=gen).float()
    answers = torch.randint(1, num_items + 1, (users,), generator=gen)
    history = torch.randint(1, num_items + 1, (users, width), generator=gen)
    lengths = torch.randint(0, width + 1, (users,), generator=gen)
    history[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    plant = torch.rand(users, generator=gen) < 0.25
    history[plant, 0] = answers[plant]
    return vectors, table, answers, history


def tile_sizes(num_items: int) -> list[int]:
    """Tiles of one item, sizes that do and do not divide N, exactly N, more than N."""
    halves = {max(1, num_items // 2), max(1, num_items - 1)}
    return sorted({1, 2, 3, *halves, num_items, num_items + 5})


@pytest.mark.parametrize("rule", ["exclude", "score_zero"])
@pytest.mark.parametrize("seed", range(8))
def test_tiled_ranks_equal_dense_and_the_naive_loop(seed: int, rule: HistoryItems) -> None:
    users, table, answers, history = integer_problem(seed)
    dense = users @ table.T  # [B, N + 1]
    before = dense.clone()
    want = answer_ranks(dense, answers, history, history_items=rule)
    assert torch.equal(dense, before)  # the scores are not written into
    for row in range(len(users)):
        naive = naive_answer_rank(dense[row].tolist(), int(answers[row]), history[row].tolist(),
                                  rule)
        assert int(want[row]) == naive, row
    num_items = table.shape[0] - 1
    for tile in tile_sizes(num_items):
        got = tiled_answer_ranks(users, table, answers, history, tile_items=tile,
                                 history_items=rule)
        assert torch.equal(got, want), (num_items, tile)


@pytest.mark.parametrize("rule", ["exclude", "score_zero"])
@pytest.mark.parametrize("seed", range(8))
def test_one_shared_score_row_ranks_as_the_dense_matrix_and_the_naive_loop(
    seed: int, rule: HistoryItems
) -> None:
    # The most-popular baseline: one row for every user, scores with many ties, some below 0
    # (where the reference rule lets the history overtake the answer), a padding score among
    # them and -0.0 beside 0.0.
    _, _, answers, history = integer_problem(seed)
    num_items = int(max(answers.max(), history.max()))
    gen = torch.Generator().manual_seed(100 + seed)
    row = torch.randint(-3, 4, (num_items + 1,), generator=gen).double()
    zeros = row == 0
    negative = torch.rand(int(zeros.sum()), generator=gen) < 0.5
    row[zeros] = torch.where(negative, -0.0, 0.0).to(row.dtype)
    assert bool(torch.signbit(row[zeros]).any()) or int(zeros.sum()) < 3
    got = SharedScores(row).ranks(answers, history, history_items=rule)
    dense = answer_ranks(row.expand(len(answers), -1), answers, history, history_items=rule)
    assert torch.equal(got, dense)
    for user in range(len(answers)):
        naive = naive_answer_rank(row.tolist(), int(answers[user]), history[user].tolist(), rule)
        assert int(got[user]) == naive, user


def test_the_two_history_rules_differ_where_the_problem_says_they_should() -> None:
    """Over the random problems: a user whose answer is not in its history and scores above 0
    while the padding row scores below it gets the same rank under both rules; repeated answers
    and answers below 0 do move (the problems hold both)."""
    moved = same = 0
    for seed in range(8):
        users, table, answers, history = integer_problem(seed)
        dense = users @ table.T
        excl = answer_ranks(dense, answers, history)
        zero = answer_ranks(dense, answers, history, history_items="score_zero")
        own = dense.gather(1, answers[:, None])[:, 0]
        repeats = (history == answers[:, None]).any(dim=1)
        plain = ~repeats & (own > 0) & (dense[:, 0] < own)
        assert torch.equal(excl[plain], zero[plain])
        same += int(plain.sum())
        moved += int((excl != zero).sum())
        assert bool((zero[repeats & (own > 0)] >= excl[repeats & (own > 0)]).all())
    assert same > 20 and moved > 20
    # ties are common here: the pessimistic rule is exercised
    answer_scores = dense.gather(1, answers[:, None])
    assert int(((dense[:, 1:] == answer_scores).sum(1) > 1).sum()) > 0


def naive_top_k(scores: list[float], history: list[int], k: int, keep: bool) -> list[int]:
    """Every item 1..N not excluded, by score descending then id ascending, padded with 0."""
    excluded = set() if keep else set(history)
    candidates = [i for i in range(1, len(scores)) if i not in excluded]
    ordered = sorted(candidates, key=lambda i: (-scores[i], i))[:k]
    return ordered + [0] * (k - len(ordered))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("keep", [False, True])
def test_tiled_top_k_equals_dense_and_the_naive_loop(seed: int, keep: bool) -> None:
    users, table, _, history = integer_problem(seed)
    num_items = table.shape[0] - 1
    dense = users @ table.T
    for k in sorted({1, min(5, num_items), num_items}):
        ref = dense_top_k(dense, history, k=k, keep_history=keep)
        for row in range(len(users)):
            want = naive_top_k(dense[row].tolist(), history[row].tolist(), k, keep)
            assert ref.items[row].tolist() == want, (row, k)
            scores = [dense[row, i].item() if i else -math.inf for i in want]
            assert ref.scores[row].tolist() == scores
        for tile in tile_sizes(num_items):
            got = top_k_items(users, table, history, k=k, keep_history=keep, tile_items=tile)
            assert torch.equal(got.items, ref.items), (k, tile)
            assert torch.equal(got.scores, ref.scores), (k, tile)
            assert got.items.dtype == torch.int64 and got.scores.dtype == torch.float32


def test_a_large_tie_is_cut_by_item_id() -> None:
    # 1,000 items, every score equal: the top 10 are items 1..10 whatever the tiling (torch.topk
    # alone leaves the choice among equal values unspecified)
    table = torch.ones(1001, 2)
    users = torch.ones(3, 2)
    history = torch.tensor([[0], [1], [5]])
    for tile in (7, 64, 1000):
        got = top_k_items(users, table, history, k=10, tile_items=tile)
        assert got.items.tolist() == [
            list(range(1, 11)), list(range(2, 12)), [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
        ]
        assert (got.scores == 2.0).all()


# --- through the model --------------------------------------------------------------------------


def signed_axis_model(num_items: int = 37) -> ELCRec:
    """A model whose item rows are signed unit axes (+-e_j): each score is exactly +-u_j of the
    user's float vector u, whatever kernel sums the zero terms, and items on one axis with one
    sign tie exactly."""
    torch.manual_seed(3)
    config = ModelConfig(num_layers=1, hidden_size=8, max_len=5, num_clusters=2)
    model = ELCRec(config, num_items=num_items)
    axes = torch.randint(0, 8, (num_items + 1,))
    signs = torch.randint(0, 2, (num_items + 1,)).float() * 2 - 1
    with torch.no_grad():
        model.item_embeddings.weight.zero_()
        model.item_embeddings.weight[torch.arange(num_items + 1), axes] = signs
    return model.eval()


def random_sequences(count: int, num_items: int = 37) -> list:
    gen = torch.Generator().manual_seed(count)
    lengths = torch.randint(3, 12, (count,), generator=gen)
    return [torch.randint(1, num_items + 1, (int(n),), generator=gen).numpy() for n in lengths]


def test_recommend_is_top_k_of_the_users_vectors() -> None:
    model = signed_axis_model()
    seqs = random_sequences(20)
    batch = eval_batch(seqs, "test", model.config.max_len)
    got = recommend(model, batch.inputs, batch.history, k=6, tile_items=10)
    with torch.no_grad():
        users = model.user_vector(model(batch.inputs))
        dense = model.score_all(users).float()
    for row in range(len(seqs)):
        want = naive_top_k(dense[row].tolist(), batch.history[row].tolist(), 6, False)
        assert got.items[row].tolist() == want
        assert not set(want) & set(batch.history[row].tolist())


@pytest.mark.parametrize("rule", ["exclude", "score_zero"])
def test_evaluate_sums_tiled_equal_dense_on_a_model(rule: HistoryItems) -> None:
    model = signed_axis_model()
    seqs = random_sequences(50)
    for split in ("valid", "test"):
        dense, n = evaluate_sums(model, seqs, split=split, ks=(1, 5, 10), tile_items=None,
                                 history_items=rule)
        assert 0 < dense["MRR"] < n  # neither all hits nor all misses
        for tile in (1, 5, 36, 37, 100):
            tiled, m = evaluate_sums(model, seqs, split=split, ks=(1, 5, 10), tile_items=tile,
                                     history_items=rule)
            assert (tiled, m) == (dense, n), tile


def test_a_resume_may_change_the_tile_size() -> None:
    """The tile size changes how much is scored at a time, not what a run computes."""
    from elcrec_dist.checkpoint import config_changes

    before = load_config(None, []).to_dict()
    after = load_config(None, ["eval.tile_items=4096"]).to_dict()
    assert before["eval"]["tile_items"] != after["eval"]["tile_items"]
    assert config_changes(before, after).changed == {}
    # while a key that changes the computation is still refused
    other = load_config(None, ["eval.tile_items=4096", "train.lr=0.5"]).to_dict()
    assert set(config_changes(before, other).changed) == {"train.lr"}
