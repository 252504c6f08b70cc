"""Ranking metrics: pure functions from scores to ranks, and from ranks to HR, NDCG, MRR.

A *rank* is 0-based: the number of competing candidates placed before the positive.
Ties count against the positive: a candidate whose score equals the positive's is placed
before it, so a constant scorer lands at the bottom of its list (chance or worse), never at
the top. A NaN score, the positive's or a competitor's, also counts against the positive, so a
broken model cannot rank well by accident.

    HR@K    = 1[rank < K]
    NDCG@K  = 1 / log2(rank + 2)  if rank < K  else 0      (one relevant item: IDCG = 1)
    MRR     = mean of 1 / (rank + 1)
    CI95    = mean ± 1.96 · std / sqrt(n)  (normal approximation, std with ddof=1)
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

NEG_INF = float("-inf")
# Scores compared at once in full ranking (temporaries of 4 MiB bool + 16 MiB int32).
_COMPARE_BLOCK = 1 << 22


def ranks_from_candidate_scores(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of the positive (column 0) among its candidates.

    Args:
        scores: ``(B, C)`` scores; column 0 is the positive, columns 1.. the negatives.
        valid: ``(B, C)`` bool, False for padding columns (users with fewer negatives);
            ``None``: every column is a real candidate.

    Returns:
        ``(B,)`` int64 ranks: negatives not scoring strictly below the positive (ties and
        NaN count against it).
    """
    # "not below" rather than ">=": a NaN on either side then counts against the positive.
    against = ~(scores[:, 1:] < scores[:, :1])  # (B, C-1)
    if valid is not None:
        against &= valid[:, 1:]
    return against.sum(dim=1).to(torch.int64)


def ranks_from_full_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each target among all columns of ``scores``.

    Masked items (padding, the user's history) must already hold ``-inf``: they then never
    count against a target with a finite score.

    Args:
        scores: ``(B, N)`` scores over all items.
        targets: ``(B,)`` int64 column of each user's target.

    Returns:
        ``(B,)`` int64 ranks: other columns not scoring strictly below the target (ties and NaN
        count against it).
    """
    positive = scores.gather(1, targets.view(-1, 1))  # (B, 1)
    below = torch.empty(scores.shape[0], dtype=torch.int32, device=scores.device)  # (B,)
    # Blocks of whole rows (contiguous) keep the temporaries small: at 256 x 349K a single
    # comparison makes an 89 MB bool and the sum casts it to a 357 MB int32, both freshly
    # page-faulted on every batch; in blocks the CPU time halves.
    step = max(1, _COMPARE_BLOCK // max(1, scores.shape[1]))
    for start in range(0, scores.shape[0], step):
        rows = slice(start, start + step)
        below[rows] = (scores[rows] < positive[rows]).sum(dim=1, dtype=torch.int32)
    return (scores.shape[1] - 1 - below).to(torch.int64)


def hit_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user Hit@K (1.0 when the 0-based rank is below K)."""
    return (np.asarray(ranks) < k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@K with one relevant item: ``1/log2(rank+2)`` when rank < K, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def reciprocal_rank(ranks: np.ndarray) -> np.ndarray:
    """Per-user 1/(rank+1)."""
    return 1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0)


def confidence_interval_95(values: np.ndarray) -> tuple[float, float]:
    """Normal-approximation 95% interval of the mean: mean ± 1.96·std/√n (std with ddof=1).

    One value gives a zero-width interval; no values give (nan, nan).
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return (math.nan, math.nan)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n)
    return (mean - half, mean + half)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] | Iterable[int] = (1, 5, 10, 20)) -> dict:
    """Aggregate metrics of a set of users.

    Args:
        ranks: 0-based rank of each user's positive.
        ks: cut-offs for HR@K and NDCG@K.

    Returns:
        ``{"HR@K": ..., "NDCG@K": ..., "MRR": ..., "num_users": n, "NDCG@10_ci95": [lo, hi]}``
        (means over users; NaN for no users).
    """
    ranks = np.asarray(ranks)
    n = len(ranks)
    out: dict = {}
    ks = sorted(set(int(k) for k in ks))
    for k in ks:
        out[f"HR@{k}"] = float(hit_at_k(ranks, k).mean()) if n else math.nan
    for k in ks:
        out[f"NDCG@{k}"] = float(ndcg_at_k(ranks, k).mean()) if n else math.nan
    out["MRR"] = float(reciprocal_rank(ranks).mean()) if n else math.nan
    out["num_users"] = int(n)
    out["NDCG@10_ci95"] = list(confidence_interval_95(ndcg_at_k(ranks, 10)))
    return out
