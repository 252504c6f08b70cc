"""Small processed datasets for tests, written directly in the format of docs/data_format.md
(so evaluator, baseline and serving tests do not depend on the preprocessing code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from llm_recommender.data.dataset import ProcessedData


def write_processed(
    folder: Path,
    sequences: Sequence[Sequence[int]],
    num_items: int | None = None,
    user_ids: Sequence[str] | None = None,
    item_ids: Sequence[str] | None = None,
    timestamps: Sequence[Sequence[int]] | None = None,
) -> ProcessedData:
    """A processed folder with leave-one-out labels (users with < 3 events: all training).

    Args:
        folder: where to write.
        sequences: item indices (1-based) of users 1..U, oldest first.
        num_items: catalogue size (default: the largest index used).
        user_ids / item_ids: original ids (default ``u1..``, ``i1..``).
        timestamps: per user, one per event (default: all distinct, increasing).
    """
    folder.mkdir(parents=True, exist_ok=True)
    num_items = num_items or max(max(s) for s in sequences)
    lengths = [0] + [len(s) for s in sequences]  # user 0 is empty
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences])
    labels = np.concatenate(
        [np.array([0] * (len(s) - 2) + [1, 2] if len(s) >= 3 else [0] * len(s), dtype=np.uint8) for s in sequences]
    )
    np.save(folder / "seq_offsets.npy", offsets)
    np.save(folder / "seq_items.npy", items)
    if timestamps is None:
        stamps = np.arange(len(items), dtype=np.int64)
    else:
        stamps = np.concatenate([np.asarray(t, dtype=np.int64) for t in timestamps])
    np.save(folder / "seq_timestamps.npy", stamps)
    np.save(folder / "seq_split.npy", labels)
    user_ids = user_ids or [f"u{i}" for i in range(1, len(sequences) + 1)]
    item_ids = item_ids or [f"i{i}" for i in range(1, num_items + 1)]
    (folder / "user_ids.txt").write_text("".join(f"{u}\n" for u in user_ids), encoding="utf-8")
    (folder / "item_ids.txt").write_text("".join(f"{i}\n" for i in item_ids), encoding="utf-8")
    meta = {
        "format_version": 1,
        "num_users": len(sequences),
        "num_items": num_items,
        "num_interactions": int(len(items)),
        "split": "leave_one_out",
        "source": {"sha256": "test-" + folder.name},
    }
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return ProcessedData(folder)
