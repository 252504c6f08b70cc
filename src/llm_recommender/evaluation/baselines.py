"""Baselines that implement the scorer interface, evaluated by the same ``evaluate``.

* ``popularity``: an item's count over training events. ``popularity_with_valid`` also counts
  validation events, which is what is known when the test split is evaluated (the test input
  includes the validation item); it is refused for the validation split (it would count the
  targets).
* ``random``: a seeded hash of (user, item): the floor (sampled HR@10 ≈ 10/101).
* ``markov``: first-order transitions. The score of item j after a history ending in item i is
  the number of times j directly followed i in the training sequences, plus popularity / (max
  popularity + 1) so that popularity only breaks ties and ranks items never seen after i.
  Sparse (one CSR row per item), cheap, and strong on data with sequential structure.
  ``markov_with_valid`` also counts transitions into validation events (test split only).
* ``itemknn``: item co-occurrence neighbours (models/item_knn.py with ``model.item_knn``'s
  settings: either order within 10 events, cosine, the last 10 history items voting with
  decay 0.8), popularity breaking ties. The non-parametric half of a model trained with
  ``model.item_knn.enabled``. ``itemknn_with_valid`` also counts validation events.

Every ``full_sort_predict`` returns a new tensor (the evaluator masks it in place).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.dataset import ProcessedData
from ..errors import ConfigError
from ..models.item_knn import ItemCooccurrence


class PopularityBaseline:
    """Scores every item by its interaction count.

    Args:
        data: the processed dataset.
        include_valid: count validation events too (for the test split only).
    """

    def __init__(self, data: ProcessedData, include_valid: bool = False) -> None:
        self.include_valid = include_valid
        self.item_scores = torch.as_tensor(
            data.item_popularity(include_valid=include_valid), dtype=torch.float64
        ).float()  # (I+1,)

    def full_sort_predict(self, user_ids: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        scores = self.item_scores.to(user_ids.device)
        return scores.unsqueeze(0).repeat(len(user_ids), 1)  # (B, I+1)

    def predict_candidates(
        self, user_ids: torch.Tensor, item_seq: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        return self.item_scores.to(candidates.device)[candidates]  # (B, C)


class RandomBaseline:
    """Seeded random scores: a hash of (user, item, seed), identical in both protocols and
    independent of batching.

    Args:
        seed: the hash seed.
        num_items: catalogue size, needed by ``full_sort_predict``.
    """

    def __init__(self, seed: int = 0, num_items: int | None = None) -> None:
        self.seed = int(seed)
        self.num_items = num_items

    def _scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        mask = 0xFFFFFFFF
        x = (users * 0x9E3779B1 + items * 0x85EBCA77 + self.seed * 0xC2B2AE3D) & mask
        # murmur3-style finaliser: well-mixed 32 bits from nearby inputs.
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & mask
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & mask
        x = x ^ (x >> 16)
        return (x >> 8).float() / float(1 << 24)  # 24 bits: exact in float32

    def full_sort_predict(self, user_ids: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        if self.num_items is None:
            raise ValueError("RandomBaseline needs num_items for full ranking")
        items = torch.arange(self.num_items + 1, device=user_ids.device).view(1, -1)  # (1, I+1)
        return self._scores(user_ids.view(-1, 1).long(), items)  # (B, I+1)

    def predict_candidates(
        self, user_ids: torch.Tensor, item_seq: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        return self._scores(user_ids.view(-1, 1).long(), candidates.long())  # (B, C)


class _TableBaseline:
    """Scores of an item table (:class:`ItemCooccurrence`) over the last history items, plus a
    popularity ``backoff`` below the table's smallest value (ties only)."""

    table: ItemCooccurrence
    backoff: torch.Tensor  # (I+1,)

    def full_sort_predict(self, user_ids: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        return self.table.full_scores(item_seq) + self.backoff.to(item_seq.device)

    def predict_candidates(
        self, user_ids: torch.Tensor, item_seq: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        scores = self.table.candidate_scores(item_seq, candidates)
        return scores + self.backoff.to(candidates.device)[candidates]


class MarkovBaseline(_TableBaseline):
    """First-order transition counts from the last history item, backed off to popularity.

    Args:
        data: the processed dataset.
        include_valid: also count transitions into validation events (test split only).
    """

    def __init__(self, data: ProcessedData, include_valid: bool = False) -> None:
        self.include_valid = include_valid
        self.num_items = data.num_items
        stride = data.num_items + 1
        labels = np.asarray(data.split_labels)
        items = np.asarray(data.items).astype(np.int64)
        offsets = np.asarray(data.offsets)
        allowed = labels <= (1 if include_valid else 0)
        # Pair (j, j+1) when both belong to the same user and the later one is allowed
        # (allowed events are a prefix of each user's sequence).
        same_user = np.ones(len(items), dtype=bool)
        same_user[offsets[1:-1][offsets[1:-1] < len(items)]] = False  # first event of a user
        later = np.flatnonzero(same_user[1:] & allowed[1:]) + 1 if len(items) > 1 else np.zeros(0, np.int64)
        keys, counts = np.unique(items[later - 1] * stride + items[later], return_counts=True)
        # A neighbour table whose only voter is the last item and whose similarity is the
        # transition count: the same lookups as the fused item neighbours.
        self.table = ItemCooccurrence(torch.from_numpy(keys), torch.from_numpy(counts.astype(np.float32)),
                                      data.num_items, history=1, decay=1.0)
        popularity = data.item_popularity(include_valid=include_valid).astype(np.float64)
        self.backoff = torch.from_numpy(popularity / (popularity.max() + 1.0)).float()  # (I+1,) < 1


class ItemKNNBaseline(_TableBaseline):
    """Item co-occurrence neighbours of the last history items (see the module docstring).

    Args:
        data: the processed dataset.
        include_valid: also count validation events (test split only).
        settings: an :class:`~llm_recommender.config.ItemKNNConfig` (default settings if None).
    """

    def __init__(self, data: ProcessedData, include_valid: bool = False, settings=None) -> None:
        from ..config import ItemKNNConfig

        settings = settings or ItemKNNConfig()
        if settings.direction == "auto":
            raise ConfigError(
                "model.item_knn.direction=auto chooses on a trained model's validation; the itemknn "
                "baseline needs both or forward"
            )
        self.table = ItemCooccurrence.from_config(data, include_valid, settings)
        popularity = data.item_popularity(include_valid=include_valid).astype(np.float64)
        # Below the smallest similarity (log1p(scale * cosine) of one co-occurrence): ties only.
        self.backoff = torch.from_numpy(1e-6 * popularity / (popularity.max() + 1.0)).float()  # (I+1,)


BASELINES = (
    "popularity",
    "popularity_with_valid",
    "random",
    "markov",
    "markov_with_valid",
    "itemknn",
    "itemknn_with_valid",
)


def get_baseline(name: str, data: ProcessedData, split: str | None = None, **kwargs: Any):
    """Build a baseline by name.

    Args:
        name: one of ``BASELINES``.
        data: the processed dataset.
        split: the split it will be evaluated on (``*_with_valid`` refuse ``valid``).
        **kwargs: passed to the class (``seed`` for random).
    """
    if name.endswith("_with_valid") and split == "valid":
        raise ConfigError(
            f"--baseline {name} counts validation events: use it on the test split, or "
            f"{name.replace('_with_valid', '')} on valid"
        )
    if name == "popularity":
        return PopularityBaseline(data, **kwargs)
    if name == "popularity_with_valid":
        return PopularityBaseline(data, include_valid=True, **kwargs)
    if name == "markov":
        return MarkovBaseline(data, **kwargs)
    if name == "markov_with_valid":
        return MarkovBaseline(data, include_valid=True, **kwargs)
    if name == "itemknn":
        return ItemKNNBaseline(data, **kwargs)
    if name == "itemknn_with_valid":
        return ItemKNNBaseline(data, include_valid=True, **kwargs)
    if name == "random":
        return RandomBaseline(num_items=data.num_items, **kwargs)
    import difflib

    close = difflib.get_close_matches(name, BASELINES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown baseline {name!r}{hint}; choose one of {', '.join(BASELINES)}")
