"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_recommender.evaluation.metrics import (
    confidence_interval_95,
    metrics_from_ranks,
    ndcg_at_k,
    ranks_from_candidate_scores,
    ranks_from_full_scores,
)


def test_rank_zero_is_perfect():
    m = metrics_from_ranks(np.array([0]), ks=(1, 5, 10, 20))
    assert m["HR@1"] == 1.0 and m["NDCG@1"] == 1.0 and m["NDCG@20"] == 1.0 and m["MRR"] == 1.0
    assert m["num_users"] == 1


def test_rank_two_ndcg_is_half():
    m = metrics_from_ranks(np.array([2]), ks=(1, 5, 10, 20))
    assert m["HR@1"] == 0.0 and m["NDCG@1"] == 0.0
    assert m["HR@5"] == 1.0
    assert m["NDCG@5"] == pytest.approx(1 / math.log2(4)) == 0.5
    assert m["MRR"] == pytest.approx(1 / 3)


def test_mixed_ranks_by_hand():
    m = metrics_from_ranks(np.array([0, 2, 10, 25]), ks=(1, 5, 10, 20))
    assert m["HR@1"] == 0.25
    assert m["HR@10"] == 0.5  # rank 10 is the 11th place: outside the top 10
    assert m["HR@20"] == 0.75
    assert m["NDCG@10"] == pytest.approx((1 + 0.5) / 4)
    assert m["NDCG@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 26) / 4)


def test_ties_count_against_the_positive():
    constant = torch.zeros(3, 101)  # 1 positive + 100 negatives, every score equal
    ranks = ranks_from_candidate_scores(constant)
    assert ranks.tolist() == [100, 100, 100]
    m = metrics_from_ranks(ranks.numpy())
    assert m["HR@10"] == 0.0 and m["NDCG@10"] == 0.0
    assert m["MRR"] == pytest.approx(1 / 101)
    # One higher, one tied, one lower: rank 2.
    assert ranks_from_candidate_scores(torch.tensor([[1.0, 2.0, 1.0, 0.5]])).tolist() == [2]


def test_padding_columns_are_masked():
    scores = torch.tensor([[1.0, 5.0, 0.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True, False, False]])  # a user with only 2 negatives
    assert ranks_from_candidate_scores(scores, valid).tolist() == [1]
    assert ranks_from_candidate_scores(scores).tolist() == [3]


def test_nan_scores_count_against_the_positive():
    scores = torch.tensor([[float("nan"), 0.1, 0.2], [0.5, float("nan"), 0.2]])
    assert ranks_from_candidate_scores(scores).tolist() == [2, 1]
    full = torch.full((1, 4), float("nan"))
    assert ranks_from_full_scores(full, torch.tensor([2])).tolist() == [3]


def test_full_scores_ignore_masked_items():
    scores = torch.tensor([[float("-inf"), 3.0, float("-inf"), 1.0, 2.0]])
    assert ranks_from_full_scores(scores, torch.tensor([3])).tolist() == [2]
    assert ranks_from_full_scores(scores, torch.tensor([1])).tolist() == [0]


def test_confidence_interval_formula():
    # NDCG@10 per user: 1, 1, 0, 0 -> mean 0.5, std (ddof=1) sqrt(1/3).
    lo, hi = metrics_from_ranks(np.array([0, 0, 100, 100]))["NDCG@10_ci95"]
    half = 1.96 * math.sqrt(1 / 3) / 2
    assert lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    assert confidence_interval_95(np.array([0.3])) == (0.3, 0.3)
    assert ndcg_at_k(np.array([0, 1, 9, 10]), 10).tolist() == pytest.approx(
        [1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0]
    )
