"""Full-rank metrics against hand-computed ranks and a naive loop (spec: "Evaluation")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elcrec_dist.config import ModelConfig
from elcrec_dist.evaluation import (
    answer_ranks,
    evaluate,
    evaluate_sums,
    finalize,
    metric_sums,
    naive_answer_rank,
)
from elcrec_dist.model import ELCRec


def ranks_of(scores: list[float], answer: int, history: list[int]) -> int:
    """One user through the batched function."""
    return int(
        answer_ranks(
            torch.tensor([scores], dtype=torch.float32),
            torch.tensor([answer]),
            torch.tensor([history or [0]], dtype=torch.int64),
        )[0]
    )


# --- answer_ranks by hand -----------------------------------------------------------------------

#         pad   1    2    3    4    5
SCORES = [0.0, 0.1, 0.5, 0.3, 0.9, 0.2]


def test_one_user_rank_by_hand() -> None:
    # answer 3 scores 0.3; candidates scoring >= 0.3 other than itself: item 2 (0.5), item 4 (0.9)
    # -> 0-based rank 2.
    assert ranks_of(SCORES, 3, []) == 2
    # answer 4 is the top item -> rank 0; answer 1 is the lowest of 5 -> rank 4.
    assert ranks_of(SCORES, 4, []) == 0
    assert ranks_of(SCORES, 1, []) == 4


def test_batch_of_users_is_ranked_row_by_row() -> None:
    scores = torch.tensor([SCORES, SCORES[::-1]])
    # row 1 reversed: pad=0.2, 1:0.9, 2:0.3, 3:0.5, 4:0.1, 5:0.0; answer 2 (0.3): items 1, 3 above
    # -> 2
    ranks = answer_ranks(scores, torch.tensor([4, 2]), torch.zeros(2, 1, dtype=torch.int64))
    assert ranks.tolist() == [0, 2]
    assert ranks.dtype == torch.int64


def test_ties_are_pessimistic() -> None:
    #        pad 1  2  3  4  5
    tied = [0.0, 1, 1, 1, 0, 1]
    # answer 2 scores 1; other candidates with score >= 1: items 1, 3, 5 -> rank 3 (not 0).
    assert ranks_of(tied, 2, []) == 3
    # answer 4 scores 0; every other candidate (1, 2, 3, 5) is >= 0 -> rank 4.
    assert ranks_of(tied, 4, []) == 4
    # all equal: a constant model gets the worst rank, N - 1 = 4.
    assert ranks_of([7.0] * 6, 1, []) == 4


def test_history_items_do_not_count() -> None:
    # answer 3 (0.3): items 2 (0.5) and 4 (0.9) beat it; with 4 in the history only 2 counts.
    assert ranks_of(SCORES, 3, [4]) == 1
    assert ranks_of(SCORES, 3, [4, 2]) == 0
    # lower-scored history items change nothing: item 1 (0.1) and 5 (0.2) never beat 0.3.
    assert ranks_of(SCORES, 3, [1, 5]) == 2


def test_padding_column_never_counts() -> None:
    scores = [100.0, *SCORES[1:]]  # padding has the highest score of all
    assert ranks_of(scores, 3, []) == 2
    assert ranks_of(scores, 4, []) == 0
    # history padded with 0 (right padding of a short history in a batch) excludes nothing real
    assert ranks_of(SCORES, 3, [4, 0, 0]) == 1


def test_answer_in_history_is_still_a_candidate() -> None:
    # a repeated purchase: 3 is both in the history and the answer; it keeps its score 0.3 and
    # is ranked behind items 2 and 4, not made an automatic miss.
    assert ranks_of(SCORES, 3, [3]) == 2
    assert ranks_of(SCORES, 3, [3, 4, 3]) == 1
    # and with the answer at the top
    assert ranks_of(SCORES, 4, [4, 4]) == 0


def test_input_scores_are_not_modified() -> None:
    scores = torch.tensor([SCORES])
    before = scores.clone()
    answer_ranks(scores, torch.tensor([3]), torch.tensor([[4, 2]]))
    assert torch.equal(scores, before)


def test_k_larger_than_the_candidate_count() -> None:
    # 5 items, answer 1 is last -> rank 4; k = 20 > 5 candidates: HR@20 = 1, NDCG@20 = 1/log2(6).
    rank = ranks_of(SCORES, 1, [])
    sums = metric_sums(torch.tensor([rank]), (20,))
    assert sums["HR@20"] == 1.0
    assert sums["NDCG@20"] == pytest.approx(0.3868528072, abs=1e-9)  # ln 2 / ln 6


# --- metric_sums by hand ------------------------------------------------------------------------


def test_metric_sums_by_hand() -> None:
    ranks = torch.tensor([0, 1, 4, 9, 25])
    sums = metric_sums(ranks, (1, 5, 10))
    # HR@1: only rank 0 -> 1; NDCG@1 = 1/log2(2) = 1.
    assert sums["HR@1"] == 1.0
    assert sums["NDCG@1"] == pytest.approx(1.0)
    # HR@5: ranks 0, 1, 4 -> 3.
    # NDCG@5 = 1/log2(2) + 1/log2(3) + 1/log2(6) = 1 + 0.6309297536 + 0.3868528072 = 2.0177825608
    assert sums["HR@5"] == 3.0
    assert sums["NDCG@5"] == pytest.approx(2.0177825608, abs=1e-9)
    # HR@10: ranks 0, 1, 4, 9 -> 4; NDCG@10 adds 1/log2(11) = 0.2890648263 -> 2.3068473871
    assert sums["HR@10"] == 4.0
    assert sums["NDCG@10"] == pytest.approx(2.3068473871, abs=1e-9)
    # MRR = 1/1 + 1/2 + 1/5 + 1/10 + 1/26 = 1.8 + 0.0384615385 = 1.8384615385
    assert sums["MRR"] == pytest.approx(1.8384615385, abs=1e-9)
    assert set(sums) == {"HR@1", "NDCG@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR"}


def test_rank_equal_to_k_is_a_miss() -> None:
    # HR@k = 1[rank < k]: 0-based rank 5 is the 6th place, outside the top 5.
    sums = metric_sums(torch.tensor([5]), (5, 6))
    assert sums["HR@5"] == 0.0 and sums["NDCG@5"] == 0.0
    assert sums["HR@6"] == 1.0 and sums["NDCG@6"] == pytest.approx(1 / math.log2(7))


def test_finalize_divides_by_the_user_count() -> None:
    sums = metric_sums(torch.tensor([0, 1, 4, 9, 25]), (5,))
    means = finalize(sums, 5)
    assert means["HR@5"] == pytest.approx(3 / 5)
    assert means["NDCG@5"] == pytest.approx(2.0177825608 / 5)
    with pytest.raises(ValueError, match="no users"):
        finalize(sums, 0)


def test_sums_of_shards_equal_the_sum_of_the_whole() -> None:
    ranks = torch.tensor([0, 3, 7, 12, 2, 30, 19])
    whole = metric_sums(ranks, (5, 10, 20))
    a, b = metric_sums(ranks[:3], (5, 10, 20)), metric_sums(ranks[3:], (5, 10, 20))
    for name, value in whole.items():
        assert a[name] + b[name] == pytest.approx(value)


# --- random property test -----------------------------------------------------------------------


def own_rank(scores: list[float], answer: int, history: list[int]) -> int:
    """Independent statement of the rule: other candidates 1..N not in history, score >=
    answer's."""
    return sum(
        1
        for item in range(1, len(scores))
        if item != answer and item not in history and scores[item] >= scores[answer]
    )


@pytest.mark.parametrize("seed", range(5))
def test_answer_ranks_equals_naive_loop_on_random_inputs(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch, num_items, width = 64, int(torch.randint(1, 30, (), generator=gen)), 12
    # small integer scores -> many exact ties; padding column random too
    scores = torch.randint(0, 4, (batch, num_items + 1), generator=gen).float()
    answers = torch.randint(1, num_items + 1, (batch,), generator=gen)
    # histories drawn with replacement (duplicates), right-padded with 0 at random lengths,
    # and in a quarter of the rows the answer itself is planted in the history
    history = torch.randint(1, num_items + 1, (batch, width), generator=gen)
    lengths = torch.randint(0, width + 1, (batch,), generator=gen)
    history[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    plant = torch.rand(batch, generator=gen) < 0.25
    history[plant, 0] = answers[plant]

    got = answer_ranks(scores, answers, history).tolist()
    for row in range(batch):
        s, a, h = scores[row].tolist(), int(answers[row]), history[row].tolist()
        assert got[row] == naive_answer_rank(s, a, h) == own_rank(s, a, h), row
    assert any(plant.tolist()) and (history == 0).any()


def test_answer_ranks_on_float_scores_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(11)
    scores = torch.randn(32, 101, generator=gen)
    answers = torch.randint(1, 101, (32,), generator=gen)
    history = torch.randint(0, 101, (32, 40), generator=gen)
    got = answer_ranks(scores, answers, history).tolist()
    want = [own_rank(scores[r].tolist(), int(answers[r]), history[r].tolist()) for r in range(32)]
    assert got == want


# --- evaluate() against a hand-rolled loop -------------------------------------------------------


def tiny_model(num_items: int = 20) -> ELCRec:
    torch.manual_seed(0)
    model = ELCRec(
        ModelConfig(num_layers=1, hidden_size=16, max_len=6, num_clusters=3), num_items=num_items
    )
    with torch.no_grad():  # larger weights -> a spread of ranks instead of near-ties
        model.item_embeddings.weight.normal_(0, 1.0)
    return model


def tiny_sequences(num_items: int = 20, users: int = 9) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    seqs = [rng.integers(1, num_items + 1, size=int(rng.integers(4, 12))) for _ in range(users)]
    seqs[0] = np.array([3, 3, 7, 3])  # test answer 3 repeats an item of the history
    return seqs


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_matches_a_naive_per_user_loop(split: str) -> None:
    model = tiny_model()
    seqs = tiny_sequences()
    model.train()
    got = evaluate(model, seqs, split=split, ks=(1, 5), batch_size=4)
    assert model.training  # the caller's mode is restored

    model.eval()
    cut = 2 if split == "valid" else 1
    hr1 = hr5 = ndcg5 = mrr = 0.0
    with torch.no_grad():
        for seq in seqs:
            history, answer = list(seq[:-cut]), int(seq[-cut])
            window = history[-6:]
            inputs = torch.tensor([[0] * (6 - len(window)) + window])
            user = model(inputs)[0, -1]  # newest position
            scores = (model.item_embeddings.weight @ user).tolist()
            rank = own_rank(scores, answer, history)
            hr1 += rank < 1
            hr5 += rank < 5
            ndcg5 += 1 / math.log2(rank + 2) if rank < 5 else 0.0
            mrr += 1 / (rank + 1)
    n = len(seqs)
    assert got["HR@1"] == pytest.approx(hr1 / n)
    assert got["HR@5"] == pytest.approx(hr5 / n)
    assert got["NDCG@5"] == pytest.approx(ndcg5 / n)
    assert got["MRR"] == pytest.approx(mrr / n)
    assert 0 < got["MRR"] < 1  # the example is not degenerate


def test_evaluate_sums_do_not_depend_on_batch_size() -> None:
    model = tiny_model()
    seqs = tiny_sequences()
    one, n1 = evaluate_sums(model, seqs, split="test", batch_size=1)
    all_, n2 = evaluate_sums(model, seqs, split="test", batch_size=1024)
    assert n1 == n2 == len(seqs)
    assert one == pytest.approx(all_)
