"""The evaluator: one function, ``evaluate``, for every split, model and baseline.

Two protocols, run on every evaluated user of a split (no cap unless ``max_users`` is given):

* **sampled** (SASRec's): the held-out item plus ``num_negatives`` (100) negatives drawn from
  the items the user never interacted with (the whole sequence, all splits), seeded, without
  repeats. Uniform by default; ``negative_sampling: popularity`` draws in proportion to each
  item's count over all events (Krichene and Rendle's "popularity-100"). A user with fewer
  unseen items than ``num_negatives`` gets all of them; the rest of the row is padded with
  item 0, which is masked in ranking, and such users are counted (``users_with_fewer_negatives``).
  The candidates are cached in ``DATA/candidates/`` so every model evaluated on the same data
  and seed ranks the same lists.
  Unlike SASRec's script, negatives of one user are distinct (its loop may draw one twice);
  with a catalogue much larger than 100 the difference is negligible.
* **full**: the target's rank among all items. Padding (item 0) and every item of the user's
  input history (all events before the target, not only the last ``max_seq_len``) are masked,
  except the target itself: when a user consumes an item again (repeat consumption, e.g.
  Wikipedia edits) the target stays rankable, while the other history items stay masked.
  Users are scored in chunks of ``evaluation.batch_size``, so no users × items matrix exists.

Ranks count ties against the positive (see ``metrics.py``).

A *scorer* is any object with
``full_sort_predict(user_ids (B,), item_seq (B, T)) -> (B, num_items + 1)`` and
``predict_candidates(user_ids (B,), item_seq (B, T), candidates (B, C)) -> (B, C)``;
``item_seq`` holds the most recent ``max_seq_len`` history items, right-padded with 0.
The evaluator writes masks into the tensor ``full_sort_predict`` returns, so a scorer must
return a new tensor on every call (not a view of a cached one).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..config import EvaluationConfig
from ..data.dataset import ProcessedData, reorder_within_groups, tied_events
from ..errors import CheckpointError, ConfigError, DataError, LLMRecError, one_line
from ..io_utils import atomic_write_bytes, atomic_write_json
from .metrics import NEG_INF, metrics_from_ranks, ranks_from_candidate_scores, ranks_from_full_scores

CANDIDATES_FORMAT_VERSION = 1
CANDIDATES_KIND = "llmrec_eval_candidates"
# Changing the sampling algorithm changes the candidates of a seed: bump this with it.
SAMPLER_VERSION = 1
METRICS_FORMAT_VERSION = 1
PROTOCOLS = ("sampled", "full")

# Users per block of the rejection sampler. Fixed, because the candidates of a seed depend on
# how the random stream is cut into blocks.
_REJECTION_BLOCK = 8192
# Users × items cells per block of the exact (dense) sampler.
_DENSE_CELLS = 1 << 24
_MAX_REJECTION_ROUNDS = 20


# --------------------------------------------------------------------------------------------
# Users, histories and model inputs
# --------------------------------------------------------------------------------------------


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l), without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # Offset of each range's first element in the output, repeated over the range.
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(total, dtype=np.int64)


def input_sequences(
    items: np.ndarray, offsets: np.ndarray, users: np.ndarray, positions: np.ndarray, max_seq_len: int
) -> np.ndarray:
    """Model inputs: the last ``max_seq_len`` items before each target, right-padded with 0.

    Args:
        items: flat item array of the dataset.
        offsets: per-user offsets into ``items``.
        users: ``(B,)`` user indices.
        positions: ``(B,)`` flat position of each user's target.
        max_seq_len: T.

    Returns:
        ``(B, T)`` int64, T = the longest kept history (at most ``max_seq_len``).
    """
    positions = np.asarray(positions, dtype=np.int64)
    history_lengths = positions - np.asarray(offsets)[users]  # (B,)
    kept = np.minimum(history_lengths, max_seq_len)  # (B,)
    # As wide as the longest kept history: no column of padding only.
    width = max(1, int(kept.max())) if len(kept) else 1
    columns = np.arange(width, dtype=np.int64)  # (T,)
    flat = (positions - kept)[:, None] + columns[None, :]  # (B, T)
    inside = columns[None, :] < kept[:, None]  # (B, T)
    seq = np.where(inside, np.asarray(items)[np.where(inside, flat, 0)], 0)
    return seq.astype(np.int64)


def history_items(
    items: np.ndarray, offsets: np.ndarray, users: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every event before each target: (row in the batch, item), flat, for masking."""
    starts = np.asarray(offsets)[users].astype(np.int64)
    lengths = np.asarray(positions, dtype=np.int64) - starts
    rows = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
    return rows, np.asarray(items)[_concat_ranges(starts, lengths)].astype(np.int64)


def tied_readings(
    items: np.ndarray,
    timestamps: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    num_orders: int,
    seed: int,
) -> list[np.ndarray]:
    """A flat item array in ``num_orders`` readings: as given, then ``num_orders - 1`` seeded
    random orders of every group of tied events inside a history.

    A history is ``items[starts[i]:ends[i]]`` (distinct, non-overlapping ranges); a group is a
    run of its consecutive events with one timestamp. Events outside every history never move
    (an evaluated user's target and later events), so no timestamp outside a history is read.
    Without ties the given reading alone comes back. Each further reading is a full copy of
    ``items`` (Kindle's 8M events: 32 MB of int32 each).
    """
    items = np.asarray(items)
    if num_orders <= 1 or len(starts) == 0:
        return [items]
    starts = np.asarray(starts, dtype=np.int64)
    marks = np.zeros(len(items) + 1, dtype=np.int64)  # +1 where a history starts, -1 where it ends
    np.add.at(marks, starts, 1)
    np.add.at(marks, np.asarray(ends, dtype=np.int64), -1)
    in_history = np.cumsum(marks[:-1]) > 0
    positions, groups = tied_events(timestamps, starts, in_history)
    if len(positions) == 0:
        return [items]
    readings = [items]
    for draw in range(1, num_orders):
        reading = items.copy()
        rng = np.random.default_rng([seed, draw, 0x71E5])
        reading[positions] = items[reorder_within_groups(positions, groups, rng)]
        readings.append(reading)
    return readings


def _item_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Softmax of full score rows over the items (column 0, padding, gets none)."""
    scores = scores.float().clone()
    scores[:, 0] = float("-inf")
    return torch.softmax(scores, dim=1)


def mean_over_readings(inputs: list[np.ndarray], score: Any, average: str = "scores") -> torch.Tensor:
    """The mean of ``score`` over readings of one batch of histories.

    Args:
        inputs: per reading, the ``(B, W)`` model input of each row (the first reading's rows
            are scored whole; a later reading only for the rows whose input it changes).
        score: ``score(rows_input (C, W), rows)`` -> ``(C, N)`` scores, ``rows`` the int64 row
            indices of ``rows_input`` (None: all rows).
        average: ``scores``, or ``probabilities``: each reading's full score rows (column 0
            padding) are a softmax over the items, and the log of their mean comes back.

    Returns:
        ``(B, N)``, a new tensor.
    """
    base = score(inputs[0], None)
    if len(inputs) == 1:
        return base
    norm = _item_probabilities if average == "probabilities" else (lambda x: x)
    base = norm(base)
    total = base.clone()
    for reading in inputs[1:]:
        changed = np.flatnonzero((reading != inputs[0]).any(axis=1))
        scores = base
        if len(changed):
            scores = base.clone()  # rows replaced, never base - base: a scorer's -inf stays -inf
            scores[torch.from_numpy(changed).to(base.device)] = norm(score(reading[changed], changed))
        total += scores
    total = total / len(inputs)
    return total.log() if average == "probabilities" else total


def _uniform(seed: int, draw: int, keys: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats, a function of (seed, draw, key) only (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):
        x = np.asarray(keys, dtype=np.int64).astype(np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15) * np.uint64((int(draw) + 1) & 0xFFFFFFFF)
        x = x ^ (np.uint64(int(seed) & 0xFFFFFFFF) << np.uint64(32))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def deleted_histories(
    items: np.ndarray, starts: np.ndarray, ends: np.ndarray, prob: float, seed: int, draw: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One reading of ``items[starts[i]:ends[i]]`` with each event deleted with ``prob``.

    Whether an event goes is a function of ``(seed, draw, its distance from the history's
    end)`` alone, so a history gets the same reading wherever it sits in a flat array (the
    evaluator's data, a served batch). A non-empty history that would lose every event keeps
    its most recent one.

    Returns:
        ``(flat, new_starts, new_ends)``: the kept events, oldest first, history after history.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    lengths = ends - starts
    positions = _concat_ranges(starts, lengths)
    rows = np.repeat(np.arange(len(starts), dtype=np.int64), lengths)
    distance = np.repeat(ends, lengths) - 1 - positions  # 0: the most recent event
    keep = _uniform(seed, draw, distance) >= prob
    emptied = (np.bincount(rows[keep], minlength=len(starts)) == 0) & (lengths > 0)
    keep |= emptied[rows] & (distance == 0)
    new_ends = np.cumsum(np.bincount(rows[keep], minlength=len(starts))).astype(np.int64)
    new_starts = np.concatenate([[0], new_ends[:-1]]).astype(np.int64)
    return np.asarray(items)[positions[keep]], new_starts, new_ends


def deletion_inputs(
    readings: list[np.ndarray],
    starts: np.ndarray,
    ends: np.ndarray,
    num_readings: int,
    prob: float,
    seed: int,
    tails: Any,
) -> list[np.ndarray]:
    """``num_readings`` further model inputs of the histories ``[starts, ends)``: reading ``k``
    is ``readings[k % len(readings)]`` (a tied order) with deletions drawn by ``(seed, k)``
    (:func:`deleted_histories`); ``tails(flat, lengths)`` makes a model input of histories
    given flat."""
    out = []
    for draw in range(num_readings):
        flat, new_starts, new_ends = deleted_histories(
            readings[draw % len(readings)], starts, ends, prob, seed, draw
        )
        out.append(tails(flat, new_ends - new_starts))
    return out


def pad_columns(inputs: np.ndarray, width: int) -> np.ndarray:
    """``inputs`` right-padded with 0 to ``width`` columns (never cut)."""
    return np.pad(inputs, ((0, 0), (0, max(0, width - inputs.shape[1]))))


def tied_history_orders(
    data: ProcessedData, users: np.ndarray, positions: np.ndarray, num_orders: int, seed: int
) -> list[np.ndarray]:
    """``data.items`` in ``num_orders`` readings (:func:`tied_readings`): the file's, then
    random orders of the same-timestamp groups of each user's history before ``positions``.
    The target's own timestamp is never read."""
    if num_orders <= 1 or len(users) == 0:
        return [np.asarray(data.items)]
    starts = np.asarray(data.offsets)[np.asarray(users)]
    return tied_readings(data.items, data.timestamps, starts, positions, num_orders, seed)


# --------------------------------------------------------------------------------------------
# Negative candidates
# --------------------------------------------------------------------------------------------


def _item_weights(data: ProcessedData, strategy: str) -> np.ndarray:
    """Sampling weight of every item index (index 0, padding, has weight 0)."""
    if strategy == "uniform":
        weights = np.ones(data.num_items + 1, dtype=np.float64)
    elif strategy == "popularity":
        # Counts over all events: the protocol's notion of popularity, not a model's input.
        weights = np.bincount(np.asarray(data.items), minlength=data.num_items + 1).astype(np.float64)
    else:
        raise ConfigError(
            f"evaluation.negative_sampling={strategy!r} must be 'uniform' or 'popularity'"
        )
    weights[0] = 0.0
    return weights


def _first_occurrence(values: np.ndarray) -> np.ndarray:
    """``(R, K)`` bool: True where a value is not repeated earlier in its row."""
    order = np.argsort(values, axis=1, kind="stable")  # (R, K)
    ordered = np.take_along_axis(values, order, axis=1)
    repeat = np.zeros(values.shape, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    # A stable sort keeps equal values in row order: the first of a run is the earliest.
    first = np.empty(values.shape, dtype=bool)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first


def _contains(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Membership of ``queries`` in the sorted array ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(queries.shape, dtype=bool)
    idx = np.searchsorted(sorted_keys, queries)
    np.minimum(idx, len(sorted_keys) - 1, out=idx)
    return sorted_keys[idx] == queries


def _sample_negatives(
    data: ProcessedData, users: np.ndarray, num_negatives: int, strategy: str, seed: int
) -> np.ndarray:
    """``(n, num_negatives)`` int32 distinct negatives per user, 0-padded when too few exist.

    Users whose unseen items carry at least half the sampling mass take the rejection path:
    draws in bulk for a block of users, rejects seen items with a sorted (user, item) key
    lookup and repeats within a row, keeps the first ``num_negatives`` survivors, and draws
    again for the rows still short. The others (users who saw most of a small catalogue) take
    the exact path: one random key per unseen item and the ``num_negatives`` smallest.
    Both give the same distribution: uniform subsets, or successive sampling in proportion
    to the weights without replacement (exponential keys / weight).
    """
    n = len(users)
    stride = data.num_items + 1
    weights = _item_weights(data, strategy)
    offsets = np.asarray(data.offsets, dtype=np.int64)
    all_items = np.asarray(data.items)

    # Sorted (row, item) keys of everything each evaluated user interacted with.
    starts = offsets[users]
    lengths = offsets[users + 1] - starts
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    seen_keys = rows * stride + all_items[_concat_ranges(starts, lengths)]
    del rows
    # Sort and drop repeats (np.unique's hash path was 7x slower on 8M keys).
    seen_keys.sort()
    if len(seen_keys):
        seen_keys = seen_keys[np.concatenate([[True], seen_keys[1:] != seen_keys[:-1]])]
    seen_rows = seen_keys // stride
    seen_items = seen_keys - seen_rows * stride
    seen_count = np.bincount(seen_rows, minlength=n)
    seen_mass = np.bincount(seen_rows, weights=weights[seen_items], minlength=n)
    del seen_rows, seen_items
    pool = int((weights > 0).sum())
    total_mass = float(weights.sum())
    available = pool - seen_count  # every seen item occurred, so it has weight > 0
    unseen_fraction = 1.0 - seen_mass / total_mass

    rng = np.random.default_rng(seed)
    negatives = np.zeros((n, num_negatives), dtype=np.int32)
    cdf = np.cumsum(weights) / total_mass
    cdf[-1] = 1.0

    def draw(shape: tuple[int, int]) -> np.ndarray:
        if strategy == "uniform":
            return rng.integers(1, stride, size=shape, dtype=np.int64)
        return np.searchsorted(cdf, rng.random(size=shape), side="right").astype(np.int64)

    easy = np.flatnonzero((unseen_fraction >= 0.5) & (available >= 2 * num_negatives))
    exact = np.ones(n, dtype=bool)
    exact[easy] = False

    per_round = 2 * num_negatives + 16  # enough for one round when half the mass is unseen
    for block_start in range(0, len(easy), _REJECTION_BLOCK):
        block = easy[block_start : block_start + _REJECTION_BLOCK]
        accepted = np.zeros((len(block), num_negatives), dtype=np.int64)
        todo = np.arange(len(block))
        for _ in range(_MAX_REJECTION_ROUNDS):
            if len(todo) == 0:
                break
            combined = np.concatenate([accepted[todo], draw((len(todo), per_round))], axis=1)
            keys = block[todo][:, None].astype(np.int64) * stride + combined
            usable = (combined != 0) & ~_contains(seen_keys, keys) & _first_occurrence(combined)
            # First num_negatives usable columns, in draw order (earlier accepted ones first).
            order = np.argsort(~usable, axis=1, kind="stable")[:, :num_negatives]
            picked = np.take_along_axis(combined, order, axis=1)
            picked_usable = np.take_along_axis(usable, order, axis=1)
            picked[~picked_usable] = 0
            accepted[todo] = picked
            todo = todo[picked_usable.sum(axis=1) < num_negatives]
        negatives[block] = accepted
        exact[block[todo]] = True  # pathological rows: finish them exactly

    exact_rows = np.flatnonzero(exact)
    take = min(num_negatives, stride)
    chunk = max(1, _DENSE_CELLS // stride)
    zero_weight = weights == 0
    for chunk_start in range(0, len(exact_rows), chunk):
        block = exact_rows[chunk_start : chunk_start + chunk]
        if strategy == "uniform":
            keys = rng.random(size=(len(block), stride))
        else:
            with np.errstate(divide="ignore"):
                keys = rng.standard_exponential(size=(len(block), stride)) / weights
        keys[:, zero_weight] = np.inf
        lo = np.searchsorted(seen_keys, block * stride)
        hi = np.searchsorted(seen_keys, (block + 1) * stride)
        flat = _concat_ranges(lo, hi - lo)
        local = np.repeat(np.arange(len(block)), hi - lo)
        keys[local, seen_keys[flat] - block[local] * stride] = np.inf
        if take < stride:
            part = np.argpartition(keys, take - 1, axis=1)[:, :take]
        else:
            part = np.broadcast_to(np.arange(stride), keys.shape).copy()
        part_keys = np.take_along_axis(keys, part, axis=1)
        order = np.argsort(part_keys, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        part[~np.isfinite(np.take_along_axis(part_keys, order, axis=1))] = 0
        negatives[block] = 0
        negatives[block, :take] = part
    return negatives


def sample_candidates(
    data: ProcessedData, split: str, num_negatives: int = 100, strategy: str = "uniform", seed: int = 2024
) -> np.ndarray:
    """Candidate lists of every user evaluated on ``split`` (rows align with
    ``data.eval_examples(split)[0]``).

    Args:
        data: the processed dataset.
        split: ``valid`` or ``test``.
        num_negatives: negatives per user (N).
        strategy: ``uniform`` or ``popularity`` (count over all events, without replacement).
        seed: the same seed gives the same candidates.

    Returns:
        ``(n_users, 1 + N)`` int32: column 0 the target, columns 1.. distinct negatives the user
        never interacted with; a user with fewer than N unseen items has its row padded with 0
        (item 0 is padding and is masked in ranking).
    """
    if num_negatives < 1:
        raise ConfigError(f"evaluation.num_negatives={num_negatives!r} must be >= 1")
    users, positions = data.eval_examples(split)
    candidates = np.zeros((len(users), 1 + num_negatives), dtype=np.int32)
    candidates[:, 0] = np.asarray(data.items)[positions]
    if len(users):
        candidates[:, 1:] = _sample_negatives(data, users, num_negatives, strategy, seed)
    return candidates


def save_candidates(path: str | Path, users: np.ndarray, candidates: np.ndarray, meta: dict) -> None:
    """Write candidates as safetensors (atomically), with ``meta`` as JSON in the header.

    Args:
        path: output file.
        users: ``(n,)`` user indices of the rows.
        candidates: ``(n, 1 + N)`` int32 (see :func:`sample_candidates`).
        meta: JSON-serialisable description: data fingerprint, split, strategy, seed, ...
    """
    from safetensors.numpy import save

    header = {"format_version": CANDIDATES_FORMAT_VERSION, "kind": CANDIDATES_KIND, **meta}
    payload = save(
        {
            "users": np.ascontiguousarray(users, dtype=np.int64),
            "candidates": np.ascontiguousarray(candidates, dtype=np.int32),
        },
        metadata={"meta": json.dumps(header, sort_keys=True)},
    )
    atomic_write_bytes(path, payload)


def load_candidates(
    path: str | Path, data: ProcessedData | None = None, split: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read candidates written by :func:`save_candidates`.

    Args:
        path: the file.
        data: when given, the file must have been sampled from this dataset (same sequence
            arrays) and list its evaluated users; otherwise a ``DataError``.
        split: when given, the file must be for this split.

    Returns:
        (users, candidates, meta)
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: candidates file not found")
    try:
        with safe_open(str(path), framework="np") as handle:
            meta = json.loads((handle.metadata() or {})["meta"])
            users, candidates = handle.get_tensor("users"), handle.get_tensor("candidates")
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a candidates file ({one_line(str(exc), 120)})") from None
    if meta.get("kind") != CANDIDATES_KIND or meta.get("format_version") != CANDIDATES_FORMAT_VERSION:
        raise DataError(f"{path}: not a candidates file of format {CANDIDATES_FORMAT_VERSION}")
    if candidates.ndim != 2 or len(users) != len(candidates):
        raise DataError(f"{path}: users and candidates disagree in length (corrupt file)")
    if split is not None and meta.get("split") != split:
        raise DataError(f"{path}: candidates for split {meta.get('split')!r}, not {split!r}")
    if data is not None:
        fingerprint = data.fingerprint
        if meta.get("data_fingerprint") != fingerprint:
            raise DataError(
                f"{path}: candidates were sampled from other data (fingerprint "
                f"{str(meta.get('data_fingerprint'))[:12]}, {data.path} is {fingerprint[:12]})"
            )
        if split is not None:
            expected_users, positions = data.eval_examples(split)
            if not np.array_equal(users, expected_users) or not np.array_equal(
                candidates[:, 0], np.asarray(data.items)[positions]
            ):
                raise DataError(f"{path}: users or targets differ from {data.path} split {split!r}")
    return users, candidates, meta


def candidates_path(data: ProcessedData, split: str, strategy: str, num_negatives: int, seed: int) -> Path:
    """Where the candidates of (data, split, strategy, N, seed) are cached."""
    return data.path / "candidates" / f"{split}_{strategy}_{num_negatives}_seed{seed}.safetensors"


def get_candidates(
    data: ProcessedData,
    split: str,
    num_negatives: int,
    strategy: str,
    seed: int,
    cache: bool = True,
) -> tuple[np.ndarray, Path | None]:
    """Cached candidates of a split: loaded when present and valid, else sampled and saved.

    A cache file that does not match the data (the folder's arrays were replaced in place) is
    resampled with a note on stderr. A folder that cannot be written is used without a cache,
    also with a note.

    Returns:
        (candidates, path of the cache file or None)
    """
    path = candidates_path(data, split, strategy, num_negatives, seed)
    if cache and path.is_file():
        try:
            _, candidates, meta = load_candidates(path, data=data, split=split)
        except DataError as exc:
            print(f"note: resampling evaluation candidates: {exc}", file=sys.stderr)
        else:
            if (
                meta.get("strategy") == strategy
                and meta.get("num_negatives") == num_negatives
                and meta.get("seed") == seed
                and meta.get("sampler_version") == SAMPLER_VERSION
            ):
                return candidates, path
            print(f"note: resampling evaluation candidates: {path} has other settings", file=sys.stderr)
    candidates = sample_candidates(data, split, num_negatives, strategy, seed)
    if not cache:
        return candidates, None
    users, _ = data.eval_examples(split)
    meta = {
        "data_fingerprint": data.fingerprint,
        "data_sha256": (data.meta.get("source") or {}).get("sha256"),
        "num_users": data.num_users,
        "num_items": data.num_items,
        "split": split,
        "strategy": strategy,
        "num_negatives": num_negatives,
        "seed": seed,
        "sampler_version": SAMPLER_VERSION,
    }
    try:
        save_candidates(path, users, candidates, meta)
    except OSError as exc:
        print(f"note: evaluation candidates not cached ({path}: {exc.strerror or exc})", file=sys.stderr)
        return candidates, None
    return candidates, path


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def _protocol_tuple(protocols: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(protocols, str):
        protocols = PROTOCOLS if protocols == "both" else (protocols,)
    chosen = tuple(dict.fromkeys(protocols))
    for protocol in chosen:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol {protocol!r} must be 'sampled', 'full' or 'both'")
    if not chosen:
        raise ConfigError("no evaluation protocol chosen")
    return chosen


class _TrainingModes:
    """Put a scorer in eval mode and restore every submodule's own mode afterwards."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.modes: list[tuple[Any, bool]] = []

    def __enter__(self) -> None:
        if isinstance(self.scorer, torch.nn.Module):
            self.modes = [(module, module.training) for module in self.scorer.modules()]
        if callable(getattr(self.scorer, "eval", None)):
            self.scorer.eval()

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes:
            module.training = mode


class ItemReadings:
    """Give a model ``evaluation.item_readings`` (its ``item_readings`` and
    ``item_readings_weight`` attributes) while it scores, and restore its own afterwards. A
    scorer without them (a baseline) is scored as it is."""

    def __init__(self, scorer: Any, count: int, weight: float) -> None:
        self.scorer = scorer
        self.setting = (int(count), float(weight))
        self.saved: tuple[int, float] | None = None

    def __enter__(self) -> "ItemReadings":
        if hasattr(self.scorer, "item_readings"):
            self.saved = (self.scorer.item_readings, self.scorer.item_readings_weight)
            self.scorer.item_readings, self.scorer.item_readings_weight = self.setting
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.scorer.item_readings, self.scorer.item_readings_weight = self.saved


def _check_scores(scores: Any, shape: tuple[int, int], method: str, data: ProcessedData) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise DataError(
            f"{method} returned scores of shape {got}, expected {shape}: was the model trained on "
            f"{data.path} ({data.num_items} items)?"
        )
    return scores


def evaluate(
    scorer: Any,
    data: ProcessedData,
    split: str,
    eval_config: EvaluationConfig,
    max_seq_len: int,
    protocols: str | Sequence[str] = ("sampled", "full"),
    candidates: np.ndarray | None = None,
    max_users: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    *,
    cache_candidates: bool = True,
    return_ranks: bool = False,
) -> dict[str, Any]:
    """Evaluate a scorer on one split with the sampled and/or full-ranking protocol.

    Args:
        scorer: a model or baseline (see the module docstring).
        data: the processed dataset.
        split: ``valid`` or ``test``.
        eval_config: number and kind of negatives, cut-offs, seed, users per batch.
        max_seq_len: history items fed to the scorer (the model's ``max_seq_len``).
        protocols: any of ``sampled``, ``full`` (or ``both``).
        candidates: ``(n_users, 1 + N)`` lists to rank, rows aligned with
            ``data.eval_examples(split)[0]``; ``None`` loads or samples (and caches) them.
        max_users: evaluate a seeded random subset of this many users (fast validation);
            the candidates of the others are unchanged.
        device: where the scorer's inputs go.
        progress: show a progress bar.
        cache_candidates: keep the candidates under ``DATA/candidates/``.
        return_ranks: also return ``ranks`` (per protocol, per user) and ``users``.

    Returns:
        ``{"sampled": {...}, "full": {...}, "num_users", "split", "seed", ...}``; each
        protocol maps ``HR@K``, ``NDCG@K``, ``MRR``, ``num_users``, ``NDCG@10_ci95``,
        ``users_per_second`` and ``seconds``; sampled adds ``users_with_fewer_negatives``.
    """
    protocols = _protocol_tuple(protocols)
    if max_seq_len < 1:
        raise ConfigError(f"max_seq_len={max_seq_len!r} must be >= 1")
    knn = getattr(scorer, "item_knn", None)
    if split == "valid" and knn is not None and knn.counts_validation_events:
        raise DataError(
            "this model's item neighbour table counts the validation events (a final model): "
            "evaluate it on the test split; its validation figures are in checkpoint.json"
        )
    users, positions = data.eval_examples(split)
    if len(users) == 0:
        raise DataError(f"{data.path}: no user has a {split!r} event to evaluate")
    items = np.asarray(data.items)
    offsets = np.asarray(data.offsets)
    targets = items[positions].astype(np.int64)

    selection = np.arange(len(users))
    if max_users is not None and max_users < len(users):
        # A fixed subset for a given seed: every epoch validates on the same users.
        rng = np.random.default_rng([eval_config.seed, 1])
        selection = np.sort(rng.choice(len(users), size=max_users, replace=False))

    result: dict[str, Any] = {
        "split": split,
        "seed": eval_config.seed,
        "num_users": int(len(selection)),
        "num_users_eligible": int(len(users)),
        "num_items": data.num_items,
        "max_seq_len": int(max_seq_len),
        "protocols": list(protocols),
    }
    candidate_file: Path | None = None
    candidate_seconds = 0.0
    if "sampled" in protocols:
        started = time.perf_counter()
        if candidates is None:
            candidates, candidate_file = get_candidates(
                data,
                split,
                eval_config.num_negatives,
                eval_config.negative_sampling,
                eval_config.seed,
                cache=cache_candidates,
            )
        candidates = np.asarray(candidates)
        if candidates.ndim != 2 or len(candidates) != len(users) or candidates.shape[1] < 2:
            raise DataError(
                f"candidates of shape {candidates.shape} do not fit the {len(users)} users of split {split!r}"
            )
        if not np.array_equal(candidates[:, 0], targets):
            raise DataError(f"candidates' column 0 is not the {split!r} targets of {data.path}")
        candidate_seconds = time.perf_counter() - started

    device = torch.device(device)
    batch_size = eval_config.batch_size
    all_ranks: dict[str, np.ndarray] = {}
    # Users are scored in order of history length, so a batch is as wide as its own longest
    # history (short Amazon histories then cost a fraction of max_seq_len). Ranks go back to
    # their users' slots, so the order changes nothing in the results.
    history_lengths = np.minimum(positions[selection] - offsets[users[selection]], max_seq_len)
    visit = np.argsort(history_lengths, kind="stable")
    readings = tied_history_orders(
        data, users[selection], positions[selection], eval_config.tied_orders, eval_config.seed
    )
    result["tied_orders"] = len(readings)

    def averaged(score: Any, batch_users: np.ndarray, batch_positions: np.ndarray) -> torch.Tensor:
        """``score(item_seq, rows)`` of the batch's histories averaged over the readings."""
        seqs = [input_sequences(r, offsets, batch_users, batch_positions, max_seq_len) for r in readings]
        if eval_config.deletion_readings:
            width = seqs[0].shape[1]

            def deleted_input(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
                ends = np.cumsum(lengths)
                rows = np.arange(len(lengths))
                return pad_columns(input_sequences(flat, ends - lengths, rows, ends, max_seq_len), width)

            seqs += deletion_inputs(
                readings,
                offsets[batch_users],
                batch_positions,
                eval_config.deletion_readings,
                eval_config.deletion_prob,
                eval_config.seed,
                deleted_input,
            )
        return mean_over_readings(
            seqs,
            lambda seq, rows: score(
                torch.from_numpy(seq).to(device), None if rows is None else torch.from_numpy(rows).to(device)
            ),
            eval_config.reading_average,
        )

    mixture = eval_config.reading_average == "probabilities" and (
        len(readings) > 1 or eval_config.deletion_readings > 0
    )
    with _TrainingModes(scorer), ItemReadings(
        scorer, eval_config.item_readings, eval_config.item_readings_weight
    ), torch.inference_mode():
        for protocol in protocols:
            ranks = np.empty(len(selection), dtype=np.int64)
            batches = range(0, len(selection), batch_size)
            if progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, desc=f"{split} {protocol}", unit="batch", leave=False)
            started = time.perf_counter()
            for start in batches:
                slots = visit[start : start + batch_size]
                rows = selection[slots]
                batch_users, batch_positions = users[rows], positions[rows]
                user_ids = torch.from_numpy(batch_users).to(device)  # (B,)
                full_scores = lambda item_seq, r: _check_scores(  # noqa: E731
                    scorer.full_sort_predict(user_ids if r is None else user_ids[r], item_seq),
                    (len(item_seq), data.num_items + 1),
                    "full_sort_predict",
                    data,
                )
                if protocol == "sampled":
                    batch_candidates = torch.from_numpy(candidates[rows].astype(np.int64)).to(device)  # (B, C)
                    if mixture:  # a mean of probabilities needs every item's score of every reading
                        scores = averaged(full_scores, batch_users, batch_positions).gather(1, batch_candidates)
                    else:
                        scores = averaged(
                            lambda item_seq, r: _check_scores(  # item_seq: (B or len(r), T)
                                scorer.predict_candidates(
                                    user_ids if r is None else user_ids[r],
                                    item_seq,
                                    batch_candidates if r is None else batch_candidates[r],
                                ),
                                (len(item_seq), batch_candidates.shape[1]),
                                "predict_candidates",
                                data,
                            ),
                            batch_users,
                            batch_positions,
                        )
                    batch_ranks = ranks_from_candidate_scores(scores, batch_candidates > 0)
                else:
                    scores = averaged(full_scores, batch_users, batch_positions)  # (B, I+1)
                    batch_targets = torch.from_numpy(targets[rows]).to(device).view(-1, 1)  # (B, 1)
                    target_scores = scores.gather(1, batch_targets).clone()  # (B, 1)
                    mask_rows, mask_items = history_items(items, offsets, batch_users, batch_positions)
                    scores[torch.from_numpy(mask_rows).to(device), torch.from_numpy(mask_items).to(device)] = NEG_INF
                    scores[:, 0] = NEG_INF
                    # Repeat consumption: the target stays rankable even if it is in the history.
                    scores.scatter_(1, batch_targets, target_scores)
                    batch_ranks = ranks_from_full_scores(scores, batch_targets.view(-1))
                ranks[slots] = batch_ranks.cpu().numpy()
            seconds = time.perf_counter() - started
            metrics = metrics_from_ranks(ranks, eval_config.ks)
            metrics["seconds"] = round(seconds, 3)
            metrics["users_per_second"] = round(len(selection) / seconds, 1) if seconds > 0 else None
            if protocol == "sampled":
                padded = (candidates[selection, 1:] == 0).any(axis=1)
                metrics["users_with_fewer_negatives"] = int(padded.sum())
                metrics["num_negatives"] = int(candidates.shape[1] - 1)
                metrics["negative_sampling"] = eval_config.negative_sampling
                metrics["candidates_file"] = str(candidate_file) if candidate_file else None
                metrics["candidate_seconds"] = round(candidate_seconds, 3)
            result[protocol] = metrics
            all_ranks[protocol] = ranks
    if return_ranks:
        result["ranks"] = all_ranks
        result["users"] = users[selection]
    return result


# --------------------------------------------------------------------------------------------
# The command (llmrec evaluate / scripts/predict.py)
# --------------------------------------------------------------------------------------------

# Sections a --config/--set may change when evaluating a checkpoint; the rest describes how the
# model was built and trained, which evaluation must not alter.
_EVAL_SECTIONS = ("evaluation", "runtime")


def _checkpoint_config(saved: Any, config_path: str | Path | None, overrides: list[str] | None):
    from ..config import apply_overrides, config_from_dict, parse_override, read_yaml

    raw = saved.to_dict()
    if config_path is not None:
        given = read_yaml(config_path)
        for section in _EVAL_SECTIONS:
            if isinstance(given.get(section), dict):
                raw[section] = {**raw.get(section, {}), **given[section]}
    for text in overrides or []:
        path, _ = parse_override(text)
        if path[0] not in _EVAL_SECTIONS:
            raise ConfigError(
                f"--set {text}: a checkpoint is evaluated with its own {path[0]} settings; "
                f"only {', '.join(s + '.*' for s in _EVAL_SECTIONS)} can be changed"
            )
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, "checkpoint config with --config/--set")


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={name!r}: CUDA is not available on this machine")
    return name


def format_table(result: dict[str, Any]) -> str:
    """A compact text table of a result of :func:`evaluate`."""
    protocols = [p for p in PROTOCOLS if isinstance(result.get(p), dict)]
    if not protocols:
        return "(no protocol run)"
    first = result[protocols[0]]
    keys = [k for k in first if k.startswith("HR@")] + [k for k in first if k.startswith("NDCG@") and "ci" not in k]
    keys.append("MRR")
    header = f"{'protocol':<9}" + "".join(f"{k:>9}" for k in keys) + f"{'users':>9}{'users/s':>10}"
    lines = [header]
    for protocol in protocols:
        m = result[protocol]
        row = f"{protocol:<9}" + "".join(f"{m[k]:>9.4f}" for k in keys)
        row += f"{m['num_users']:>9d}{(m.get('users_per_second') or 0):>10.0f}"
        lines.append(row)
    notes = []
    if "sampled" in protocols:
        s = result["sampled"]
        notes.append(
            f"sampled: 1+{s['num_negatives']} {s['negative_sampling']} negatives, seed {result['seed']}, "
            f"{s['users_with_fewer_negatives']} users with fewer"
        )
    for protocol in protocols:
        lo, hi = result[protocol]["NDCG@10_ci95"]
        notes.append(f"{protocol}: NDCG@10 95% CI [{lo:.4f}, {hi:.4f}]")
    return "\n".join(lines + notes)


def run_evaluation_command(
    checkpoint: str | Path | None = None,
    data_dir: str | Path | None = None,
    output_file: str | Path | None = None,
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    baseline: str | None = None,
    split: str | None = None,
    protocols: str | Sequence[str] = "both",
    item_knn: bool = True,
) -> dict[str, Any]:
    """``llmrec evaluate``: metrics of a checkpoint or a baseline, printed and written as JSON.

    Args:
        checkpoint: a checkpoint folder (``best_model/``); its config is used, with only the
            ``evaluation`` and ``runtime`` sections changeable by ``config_path``/``overrides``.
        data_dir: processed data; defaults to the folder the checkpoint was trained on.
            Required with ``baseline``.
        output_file: metrics JSON (written atomically); ``None`` prints only.
        config_path: YAML config (baselines: the whole config; checkpoints: see above).
        overrides: ``--set section.key=value`` strings.
        baseline: a name of ``baselines.BASELINES`` instead of a checkpoint.
        split: ``valid`` or ``test``; ``None`` takes ``evaluation.split``.
        protocols: ``both`` (sampled, plus full when ``evaluation.full_ranking``), ``sampled``,
            ``full``, or a sequence of them.
        item_knn: ``False`` scores a checkpoint's network alone, without the item neighbour
            table it fuses (``--without-item-knn``).

    Returns:
        The JSON payload written.
    """
    from .. import __version__
    from ..config import load_config
    from .baselines import get_baseline

    if (checkpoint is None) == (baseline is None):
        raise LLMRecError("give either --checkpoint DIR or --baseline NAME (exactly one)")
    if checkpoint is not None:
        from ..checkpoint import check_data, load_checkpoint

        model, saved_config, info = load_checkpoint(checkpoint, device="cpu")
        config = _checkpoint_config(saved_config, config_path, overrides)
        if data_dir is None:
            if not info.get("data_dir"):
                raise CheckpointError(f"{checkpoint}: no data_dir recorded; give --data_dir")
            data_dir = info["data_dir"]
        data = ProcessedData(data_dir)
        check_data(info, checkpoint, data)  # never other events: they may be training events
        if not item_knn:
            model.attach_item_knn(None, 0.0)
        scorer = model
    else:
        if data_dir is None:
            raise LLMRecError(f"--baseline {baseline} needs --data_dir (a processed data folder)")
        config = load_config(config_path, overrides)
        data = ProcessedData(data_dir)
        info = {}
    eval_config = config.evaluation
    split = split or eval_config.split
    if split == "valid" and info.get("trained_on") == "train+valid":
        raise DataError(
            f"{checkpoint}: a refit trained on the validation events (stage_a.refit_on_valid): "
            "evaluate it on the test split, or evaluate validated_model/ on valid"
        )
    if isinstance(protocols, str) and protocols == "both":
        protocols = PROTOCOLS if eval_config.full_ranking else ("sampled",)
    protocols = _protocol_tuple(protocols)
    if config.runtime.num_threads:
        torch.set_num_threads(config.runtime.num_threads)
    device = _resolve_device(config.runtime.device)
    if checkpoint is not None:
        scorer = scorer.to(device)
    else:
        extra = {"settings": config.model.item_knn} if baseline.startswith("itemknn") else {}
        scorer = get_baseline(baseline, data, split=split, **extra)

    result = evaluate(
        scorer,
        data,
        split,
        eval_config,
        config.model.max_seq_len,
        protocols=protocols,
        device=device,
        progress=sys.stderr.isatty(),
    )
    payload = {
        "format_version": METRICS_FORMAT_VERSION,
        "sampled": result.get("sampled"),
        "full": result.get("full"),
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        "baseline": baseline,
        "item_knn": (
            {"weight": scorer.item_knn_weight, **scorer.item_knn.info}
            if getattr(scorer, "item_knn", None) is not None
            else None
        ),
        "data_dir": str(Path(data_dir).resolve()),
        "data_sha256": (data.meta.get("source") or {}).get("sha256"),
        "data_fingerprint": data.fingerprint,
        "split": split,
        "seed": eval_config.seed,
        "num_users": result["num_users"],
        "num_items": data.num_items,
        "num_negatives": eval_config.num_negatives,
        "negative_sampling": eval_config.negative_sampling,
        "max_seq_len": config.model.max_seq_len,
        "tied_orders": result["tied_orders"],  # readings averaged: 1 without ties in the histories
        "deletion_readings": eval_config.deletion_readings,  # ... plus these, with deletions
        # ... each mixed with its last item_readings items read alone (a model's, not a baseline's)
        "item_readings": eval_config.item_readings if hasattr(scorer, "item_readings") else 0,
        "reading_average": eval_config.reading_average,
        "evaluation": dataclasses.asdict(eval_config),
        "package_version": __version__,
    }
    if checkpoint is not None:
        payload["checkpoint_epoch"] = info.get("epoch")
    what = f"checkpoint {checkpoint}" if checkpoint is not None else f"baseline {baseline}"
    print(f"{what} on {data_dir} split {split}: {result['num_users']} users")
    print(format_table(result))
    if output_file is not None:
        atomic_write_json(output_file, payload)
        print(f"wrote {output_file}")
    return payload
