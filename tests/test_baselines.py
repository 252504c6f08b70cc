"""Baselines through the evaluator, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_recommender.config import EvaluationConfig
from llm_recommender.data.dataset import ProcessedData
from llm_recommender.errors import ConfigError
from llm_recommender.evaluation.baselines import (
    MarkovBaseline,
    PopularityBaseline,
    RandomBaseline,
    get_baseline,
)
from llm_recommender.evaluation.evaluator import evaluate
from processed_helpers import write_processed  # noqa: E402  (tests/ is on sys.path)


def hand_data(tmp_path) -> ProcessedData:
    # Training counts: item 1: 3, item 2: 1, items 3..5: 0.
    return write_processed(tmp_path / "hand", [[1, 2, 3, 4], [1, 2, 5], [1, 3, 2]], num_items=5)


def test_popularity_full_ranking_by_hand(tmp_path):
    data = hand_data(tmp_path)
    result = evaluate(PopularityBaseline(data), data, "test", EvaluationConfig(), 10, protocols=("full",),
                      return_ranks=True)
    # u1: target 4 (0), history 1 2 3 masked, 5 ties -> rank 1. u2: target 5 (0), 3 and 4 tie -> 2.
    # u3: target 2 (1), history 1 3 masked, 4 and 5 score 0 -> rank 0.
    assert result["ranks"]["full"].tolist() == [1, 2, 0]
    full = result["full"]
    assert full["HR@1"] == pytest.approx(1 / 3) and full["HR@5"] == 1.0
    assert full["NDCG@5"] == pytest.approx((1 / math.log2(3) + 0.5 + 1) / 3)
    assert full["MRR"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)


def test_popularity_sampled_with_given_candidates(tmp_path):
    data = hand_data(tmp_path)
    candidates = np.array([[4, 1, 5], [5, 3, 4], [2, 4, 5]], dtype=np.int32)
    result = evaluate(PopularityBaseline(data), data, "test", EvaluationConfig(), 10, protocols=("sampled",),
                      candidates=candidates, return_ranks=True)
    assert result["ranks"]["sampled"].tolist() == [2, 2, 0]  # item 1 beats 4, and ties count against
    assert result["sampled"]["HR@1"] == pytest.approx(1 / 3)
    assert result["sampled"]["NDCG@5"] == pytest.approx((0.5 + 0.5 + 1) / 3)


def test_popularity_with_validation_counts(tmp_path):
    data = hand_data(tmp_path)
    assert PopularityBaseline(data).item_scores.tolist() == [0, 3, 1, 0, 0, 0]
    # Validation events are 3, 2, 3.
    assert PopularityBaseline(data, include_valid=True).item_scores.tolist() == [0, 3, 2, 2, 0, 0]
    with pytest.raises(ConfigError, match="test split"):
        get_baseline("popularity_with_valid", data, split="valid")


def cyclic_data(tmp_path, num_users=200, num_items=20, length=8) -> ProcessedData:
    # Deterministic transitions i -> i+1 (mod num_items), random start: pure sequential structure.
    rng = np.random.default_rng(0)
    starts = rng.integers(0, num_items, size=num_users)
    sequences = [[(s + t) % num_items + 1 for t in range(length)] for s in starts]
    return write_processed(tmp_path / "cyclic", sequences, num_items)


def test_markov_beats_popularity_on_sequential_data(tmp_path):
    data = cyclic_data(tmp_path)
    config = EvaluationConfig(num_negatives=10)
    markov = evaluate(MarkovBaseline(data), data, "test", config, 5, cache_candidates=False)
    popularity = evaluate(PopularityBaseline(data), data, "test", config, 5, cache_candidates=False)
    assert markov["full"]["HR@1"] == 1.0 and markov["sampled"]["HR@1"] == 1.0
    assert popularity["full"]["NDCG@10"] < 0.5
    assert markov["full"]["NDCG@10"] > popularity["full"]["NDCG@10"] + 0.5


def test_markov_scores_by_hand_and_agree_between_protocols(tmp_path):
    # Training transitions from item 1: 1->2 twice, 1->3 once (valid/test events excluded).
    data = write_processed(tmp_path / "m", [[1, 2, 3, 4, 5], [1, 2, 5, 4], [1, 3, 9, 9, 9]], num_items=9)
    markov = MarkovBaseline(data)
    popularity = data.item_popularity().astype(float)
    backoff = popularity / (popularity.max() + 1)
    seq = torch.tensor([[1, 0, 0], [5, 1, 0], [0, 0, 0]])  # last items 1, 1, none
    full = markov.full_sort_predict(torch.tensor([1, 2, 3]), seq)
    expected = np.tile(backoff, (3, 1))
    expected[0, 2] += 2
    expected[0, 3] += 1
    expected[1, 2] += 2
    expected[1, 3] += 1
    assert np.allclose(full.numpy(), expected)
    candidates = torch.tensor([[2, 3, 4], [9, 2, 0], [1, 2, 3]])
    assert torch.allclose(markov.predict_candidates(torch.tensor([1, 2, 3]), seq, candidates),
                          full.gather(1, candidates))
    left_padded = torch.tensor([[0, 0, 1]])  # the last item is found with left padding too
    assert torch.allclose(markov.full_sort_predict(torch.tensor([1]), left_padded), full[:1])


def test_random_baseline_is_the_chance_floor(tmp_path):
    rng = np.random.default_rng(0)
    sequences = [list(rng.choice(np.arange(1, 501), size=5, replace=False)) for _ in range(3000)]
    data = write_processed(tmp_path / "r", sequences, num_items=500)
    scorer = get_baseline("random", data, seed=1)
    result = evaluate(scorer, data, "test", EvaluationConfig(), 4, cache_candidates=False)
    assert result["sampled"]["HR@10"] == pytest.approx(10 / 101, abs=0.02)
    assert result["full"]["HR@10"] == pytest.approx(10 / 496, abs=0.01)
    users, items = torch.tensor([3, 4]), torch.tensor([[7, 8], [9, 10]])
    full = scorer.full_sort_predict(users, torch.zeros(2, 1, dtype=torch.long))
    assert torch.equal(scorer.predict_candidates(users, None, items), full.gather(1, items))
    assert not torch.equal(RandomBaseline(seed=2, num_items=500).predict_candidates(users, None, items),
                           scorer.predict_candidates(users, None, items))


def test_unknown_baseline_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'popularity'"):
        get_baseline("populariti", hand_data(tmp_path))
