"""Item co-occurrence neighbours: a non-parametric item-kNN scorer, fused with the model.

Two items are neighbours when they occur within ``window`` events of each other in some
user's sequence, in either order (``direction: forward``: ``i`` is a neighbour of ``h`` only
where it came after ``h``; ``auto`` lets validation choose). Their similarity is the cosine of the co-occurrence
counts, ``c_ij / sqrt((n_i + 1)(n_j + 1))``, stored as ``log1p(scale * cosine)``. A user with
history ``h_1..h_T`` scores item ``i`` as

    knn(i) = sum_{k=0}^{history-1} decay**k * sim(h_{T-k}, i)

(the last ``history`` items, the most recent weighted most). The fused score of
:class:`~llm_recommender.models.stage_a_model.StageAModel` is ``logits + weight * knn``;
the weight is chosen on validation (``model.item_knn.weight: null``). Which direction
suits a log depends on how much its order says: on Beauty forward-only neighbours score
0.0547 full NDCG@10 alone against 0.0460 both ways; on MovieLens-100k, whose rating sessions
have little order, 0.1088 against 0.1189.

Why it is here: on sparse data (Amazon Beauty: 8.9 events per user) the next-item model
learns the order of events well and their co-occurrence poorly; review order within a
basket is noise. Measured on Beauty (docs/results.md): the neighbours alone rank as well
as SASRec on the sampled protocol, and fused with the model they add ~0.04 test NDCG@10.

The table is a sorted array of pair keys ``src * (I + 1) + dst`` (int64) and their
similarities (float32): scoring candidates is a binary search, scoring the catalogue an
indexed scatter of each history item's neighbour row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError


DIRECTIONS = ("both", "forward")


def history_tail(item_seq: torch.Tensor, count: int) -> torch.Tensor:
    """The last ``count`` items of each padded row, most recent first: ``(B, T)`` -> ``(B, count)``.

    Works for left and right padding (item 0); short rows end with 0.
    """
    mask = item_seq != 0  # (B, T)
    from_end = mask.flip(1).long().cumsum(1).flip(1) - 1  # (B, T) 0 = last visible item
    keep = mask & (from_end < count)
    rows, cols = keep.nonzero(as_tuple=True)
    tail = torch.zeros(item_seq.shape[0], count, dtype=torch.long, device=item_seq.device)
    tail[rows, from_end[rows, cols]] = item_seq[rows, cols].long()
    return tail


def _pairs_within_window(
    items: np.ndarray, owners: np.ndarray, allowed: np.ndarray, window: int, stride: int, both_orders: bool = True
):
    """Unique (src, dst) keys of items within ``window`` events of each other, both orders
    (``both_orders=False``: only src earlier than dst), with their counts. One int64 per pair
    occurrence, sorted in place: Kindle scale (8M events, window 10: 150M occurrences, 74M
    distinct pairs) peaks at ~3 GiB."""
    pieces = []
    for gap in range(1, window + 1):
        first = np.arange(len(items) - gap)
        second = first + gap
        ok = (owners[first] == owners[second]) & allowed[first] & allowed[second]
        a, b = items[first[ok]], items[second[ok]]
        distinct = a != b  # an item repeated within a window is not its own neighbour
        a, b = a[distinct], b[distinct]
        pieces += [a * stride + b, b * stride + a] if both_orders else [a * stride + b]
    keys = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    del pieces
    keys.sort()
    if len(keys) == 0:
        return keys, np.zeros(0, np.int64)
    new_run = np.empty(len(keys), dtype=bool)
    new_run[0] = True
    np.not_equal(keys[1:], keys[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    del new_run
    counts = np.diff(np.append(starts, len(keys)))
    return keys[starts], counts


def _similarities(keys: np.ndarray, counts: np.ndarray, occurrences: np.ndarray, stride: int, scale: float,
                  chunk: int = 1 << 23) -> np.ndarray:
    """``log1p(scale * c_ij / sqrt(n_i n_j))`` as float32, in chunks (bounded temporaries)."""
    values = np.empty(len(keys), dtype=np.float32)
    for start in range(0, len(keys), chunk):
        part = keys[start : start + chunk]
        cosine = counts[start : start + chunk] / np.sqrt(occurrences[part // stride] * occurrences[part % stride])
        values[start : start + chunk] = np.log1p(scale * cosine)
    return values


class ItemCooccurrence:
    """Item neighbours by windowed co-occurrence (see the module docstring).

    Args:
        keys: (P,) sorted int64 pair keys ``src * (num_items + 1) + dst``.
        values: (P,) float32 similarities.
        num_items: items I (ids 1..I).
        history: most recent history items that vote.
        decay: weight ratio between consecutive history items.
        info: provenance (events counted, window, ...), saved with the table.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        num_items: int,
        history: int,
        decay: float,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.keys = keys.long().contiguous()
        self.values = values.float().contiguous()
        self.num_items = int(num_items)
        self.history = int(history)
        self.decay = float(decay)
        self.info = dict(info or {})
        self.stride = self.num_items + 1
        # Row r of the table is keys[row_starts[r]:row_starts[r + 1]].
        self.row_starts = torch.searchsorted(self.keys, torch.arange(self.stride + 1) * self.stride)
        self.weights = self.decay ** torch.arange(self.history, dtype=torch.float32)  # (H,)

    @classmethod
    def from_data(
        cls,
        data,
        include_valid: bool,
        window: int = 10,
        history: int = 10,
        decay: float = 0.8,
        scale: float = 10.0,
        max_neighbors: int | None = None,
        direction: str = "both",
    ) -> "ItemCooccurrence":
        """Count co-occurrences in a :class:`~llm_recommender.data.dataset.ProcessedData`.

        Args:
            data: the processed dataset.
            include_valid: also count validation events (for scoring the test split and for
                serving; never when the validation split is being scored).
            window: events apart that still co-occur.
            history: see the class.
            decay: see the class.
            scale: similarity is ``log1p(scale * cosine)``.
            max_neighbors: keep each item's most similar neighbours only (``None``: all).
            direction: ``both``: a history item votes for the items near it in either order;
                ``forward``: only for those that came after it in other sequences.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        items = np.asarray(data.items).astype(np.int64)
        offsets = np.asarray(data.offsets).astype(np.int64)
        labels = np.asarray(data.split_labels)
        allowed = labels <= (1 if include_valid else 0)
        owners = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        stride = data.num_items + 1
        keys, counts = _pairs_within_window(items, owners, allowed, int(window), stride, direction == "both")
        occurrences = np.bincount(items[allowed], minlength=stride).astype(np.float64) + 1.0  # smoothed
        values = _similarities(keys, counts, occurrences, stride, scale)
        del counts
        if max_neighbors is not None and len(keys):
            src = keys // stride
            order = np.lexsort((-values, src))  # by row, most similar first
            row_start = np.searchsorted(src[order], src[order])
            keep = np.sort(order[(np.arange(len(order)) - row_start) < max_neighbors])
            keys, values = keys[keep], values[keep]
        info = {
            "events": "train+valid" if include_valid else "train",
            "window": int(window),
            "direction": direction,
            "scale": float(scale),
            "max_neighbors": max_neighbors,
            "pairs": int(len(keys)),
        }
        return cls(torch.from_numpy(keys), torch.from_numpy(values), data.num_items,
                   history, decay, info)

    @classmethod
    def from_config(cls, data, include_valid: bool, settings, direction: str | None = None) -> "ItemCooccurrence":
        """:meth:`from_data` with an :class:`~llm_recommender.config.ItemKNNConfig`'s settings;
        ``direction`` overrides ``settings.direction`` (required when that is ``auto``)."""
        direction = direction or settings.direction
        if direction == "auto":
            raise ValueError("model.item_knn.direction=auto: give the direction validation chose")
        return cls.from_data(data, include_valid, window=settings.window, history=settings.history,
                             decay=settings.decay, scale=settings.scale, max_neighbors=settings.max_neighbors,
                             direction=direction)

    @property
    def counts_validation_events(self) -> bool:
        return self.info.get("events") == "train+valid"

    # ---- scoring -------------------------------------------------------------------------

    def candidate_scores(self, item_seq: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` padded histories, ``(B, C)`` candidate ids -> ``(B, C)`` float32."""
        device = candidates.device
        tail = history_tail(item_seq.cpu(), self.history)  # (B, H)
        candidates = candidates.cpu().long()
        scores = torch.zeros(candidates.shape, dtype=torch.float32)
        if len(self.keys) == 0:
            return scores.to(device)
        queries = tail[:, :, None] * self.stride + candidates[:, None, :]  # (B, H, C)
        index = torch.searchsorted(self.keys, queries).clamp_(max=len(self.keys) - 1)
        found = (self.keys[index] == queries) & (tail[:, :, None] > 0)
        similarity = torch.where(found, self.values[index], torch.zeros((), dtype=torch.float32))
        scores = (similarity * self.weights[None, :, None]).sum(1)  # (B, C)
        return scores.to(device)

    def full_scores(self, item_seq: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` padded histories -> ``(B, I+1)`` float32 scores of every item."""
        tail = history_tail(item_seq.cpu(), self.history)  # (B, H)
        return self.scores_of_tails(tail).to(item_seq.device)

    def scores_of_tails(self, tail: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` last items (most recent first, 0 = none) -> ``(B, I+1)`` float32."""
        batch = tail.shape[0]
        scores = torch.zeros(batch, self.stride, dtype=torch.float32)
        rows_b, slots = (tail > 0).nonzero(as_tuple=True)  # (M,) (M,)
        if len(rows_b) == 0 or len(self.keys) == 0:
            return scores
        sources = tail[rows_b, slots]  # (M,)
        starts, ends = self.row_starts[sources], self.row_starts[sources + 1]  # (M,)
        lengths = ends - starts
        total = int(lengths.sum())
        if total == 0:
            return scores
        owner = torch.repeat_interleave(torch.arange(len(sources)), lengths)  # (P_b,)
        first = torch.cumsum(lengths, 0) - lengths
        flat = torch.repeat_interleave(starts - first, lengths) + torch.arange(total)  # (P_b,)
        columns = self.keys[flat] - sources[owner] * self.stride
        weighted = self.values[flat] * self.weights[slots[owner]]
        scores.index_put_((rows_b[owner], columns), weighted, accumulate=True)
        return scores

    # ---- persistence ---------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        import json

        from safetensors.torch import save_file

        meta = {"num_items": str(self.num_items), "history": str(self.history), "decay": repr(self.decay),
                "info": json.dumps(self.info, sort_keys=True)}
        save_file({"keys": self.keys, "values": self.values}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ItemCooccurrence":
        import json

        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                keys, values = handle.get_tensor("keys"), handle.get_tensor("values")
            table = cls(keys, values, int(meta["num_items"]), int(meta["history"]), float(meta["decay"]),
                        json.loads(meta.get("info", "{}")))
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable item neighbour table ({exc})") from None
        if keys.shape != values.shape or keys.ndim != 1:
            raise CheckpointError(f"{path}: keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree")
        return table
