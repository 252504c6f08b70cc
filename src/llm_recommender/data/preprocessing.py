"""Raw logs → the processed dataset folder of ``docs/data_format.md``.

``run_preprocessing(config, output_dir)`` runs these stages, each vectorised (polars for
strings, numpy for integer codes; no Python object per event or per user):

1. **read** (``readers.read_interactions``): any supported format, only the needed columns;
2. **encode**: user and item ids → integer codes (one hash pass per column);
3. **dedup**: drop exact duplicate events, same (user, item, timestamp), keeping the first
   in file order (``data.dedup``);
4. **min_rating**: drop events rated below ``data.min_rating`` (and unrated ones);
5. **k-core**: iteratively drop users and items with fewer than ``data.k_core`` events until
   none is left to drop (Amazon's "5-core" files are this with k=5);
6. **index**: users ``1..U`` and items ``1..I`` in order of first appearance in the file
   among the events that survived (deterministic, and for SASRec-style files whose ids are
   already 1-based in first-appearance order, index = original id);
7. **sort and split**: each user's events stably sorted by time (ties keep file order),
   then ``leave_one_out`` (default; the protocol the evaluation reports) or
   ``chronological`` labels (see docs/data_format.md for the rules on short users);
8. **write**: everything into a temporary folder renamed into place at the end, so a crash or
   ``kill -9`` leaves the previous complete folder or the new one. ``meta.json`` holds no
   times or dates: same input and config give byte-identical folders.

A summary (counts, density, sequence-length percentiles, seconds per stage) is printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..config import Config, save_config
from ..errors import DataError
from ..io_utils import atomic_directory, clean_stale_temporaries, sha256_file
from .dataset import PROCESSED_FORMAT_VERSION, SPLIT_CODES
from .readers import ReadReport, read_interactions


def run_preprocessing(config: Config, output_dir: str | Path, verbose: bool = True) -> dict[str, Any]:
    """Read ``config.data.path``, clean, index, split and write the processed folder.

    Args:
        config: the resolved configuration (its ``data`` section drives everything).
        output_dir: the folder to produce (replaced atomically if it exists).
        verbose: print the summary.

    Returns:
        The ``meta.json`` content, plus ``seconds`` (per stage) and ``output_dir``.
    """
    data_config = config.data
    if data_config.path is None:
        raise DataError("data.path is not set: give --input FILE or --set data.path=FILE")
    source = Path(data_config.path)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir}: exists and is not a folder")
    if output_dir.resolve() == source.resolve() or source.resolve().is_relative_to(output_dir.resolve()):
        raise DataError(f"{output_dir}: the output folder would replace the input {source}")
    # A previous run killed mid-write leaves temporaries (and, at the worst moment, the old
    # folder renamed aside): put the old folder back and remove the rest.
    clean_stale_temporaries(output_dir.parent, output_dir.name)

    timer = _StageTimer()
    frame, report = read_interactions(source, data_config)
    timer.done("read")

    result = clean_and_index(frame, report, config, timer)
    del frame

    meta = _meta(config, source, report, result)
    with atomic_directory(output_dir) as tmp:
        _write_folder(tmp, config, meta, result)
    timer.done("write")

    summary = dict(meta)
    summary["seconds"] = timer.seconds
    summary["output_dir"] = str(output_dir)
    if verbose:
        print(format_summary(summary, report))
    return summary


# --------------------------------------------------------------------------------------------
# Cleaning, indexing, splitting (pure: arrays in, arrays out)
# --------------------------------------------------------------------------------------------


class _StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now


def _encode(column: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """Integer codes (first appearance order) and the distinct values they stand for."""
    values = column.unique(maintain_order=True)
    codes = column.cast(pl.Enum(values)).to_physical().to_numpy().astype(np.int32)
    return codes, values


def duplicate_mask(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """True for every event whose (user, item, timestamp) appeared earlier in the arrays.

    A 64-bit row hash finds the few candidate events cheaply; only those are compared
    exactly, so hash collisions cannot drop an event.
    """
    frame = pl.DataFrame({"u": users, "i": items, "t": timestamps})
    hashes = frame.hash_rows(seed=0).to_numpy()
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    duplicate = np.zeros(len(users), dtype=bool)
    if len(repeated) == 0:
        return duplicate
    candidates = np.flatnonzero(np.isin(hashes, repeated))  # every event of a repeated hash
    first = frame[candidates].select(pl.struct("u", "i", "t").is_first_distinct()).to_series().to_numpy()
    duplicate[candidates[~first]] = True
    return duplicate


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Iterative k-core: the mask of events kept, and the number of passes.

    Every kept user and item has at least ``k`` kept events; passes repeat until stable.

    Args:
        users: integer user code of every event.
        items: integer item code of every event.
        k: minimum events per user and per item (1 keeps everything).
    """
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep, 0
    passes = 0
    index = np.arange(len(users))
    u, i = users, items
    while True:
        passes += 1
        user_counts = np.bincount(u)
        item_counts = np.bincount(i)
        ok = (user_counts[u] >= k) & (item_counts[i] >= k)
        if ok.all():
            break
        index, u, i = index[ok], u[ok], i[ok]
        if len(index) == 0:
            break
    keep[:] = False
    keep[index] = True
    return keep, passes


def first_appearance_index(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-index codes 1..n in order of first appearance in the array.

    Returns:
        (index of every entry, 1-based; the original code of index 1, 2, ...).
    """
    size = int(codes.max()) + 1 if len(codes) else 1
    first = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(codes), dtype=np.int64))
    present = np.flatnonzero(first < np.iinfo(np.int64).max)
    order = present[np.argsort(first[present], kind="stable")]
    remap = np.zeros(size, dtype=np.int32)
    remap[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return remap[codes], order


def _sort_by_user_then_time(user_index: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Stable order by (user, timestamp); ties keep the current (file) order."""
    if len(timestamps) == 0:
        return np.zeros(0, dtype=np.int64)
    low = int(timestamps.min())
    span = int(timestamps.max()) - low + 1
    if span * (int(user_index.max()) + 1) < 2**62:  # one int64 key: one stable sort
        key = user_index.astype(np.int64) * span + (timestamps - low)
        return np.argsort(key, kind="stable")
    return np.lexsort((timestamps, user_index))


def leave_one_out_labels(offsets: np.ndarray, min_events: int) -> np.ndarray:
    """Split labels per event: each user's last event 2 (test), the one before 1
    (validation), the rest 0; users with fewer than ``min_events`` events: all 0."""
    lengths = np.diff(offsets)
    total = int(offsets[-1])
    owner = np.repeat(np.arange(len(lengths)), lengths)
    from_end = (offsets[1:][owner] - 1) - np.arange(total)  # 0 for a user's last event
    labels = np.zeros(total, dtype=np.uint8)
    evaluated = lengths[owner] >= min_events
    labels[evaluated & (from_end == 0)] = SPLIT_CODES["test"]
    labels[evaluated & (from_end == 1)] = SPLIT_CODES["valid"]
    return labels


def chronological_labels(timestamps: np.ndarray, rows: np.ndarray, ratios: list[float]) -> np.ndarray:
    """Split labels by global time: the first ``ratios[0]`` of events (by time, ties in file
    order) train, the next ``ratios[1]`` validation, the rest test."""
    total = len(timestamps)
    order = np.lexsort((rows, timestamps))
    cut_train = int(round(total * ratios[0]))
    cut_valid = int(round(total * (ratios[0] + ratios[1])))
    ranked = np.zeros(total, dtype=np.uint8)
    ranked[cut_train:cut_valid] = SPLIT_CODES["valid"]
    ranked[cut_valid:] = SPLIT_CODES["test"]
    labels = np.empty(total, dtype=np.uint8)
    labels[order] = ranked
    return labels


def clean_and_index(frame: pl.DataFrame, report: ReadReport, config: Config, timer: _StageTimer | None = None) -> dict:
    """Dedup, filter, k-core, index, sort and split a frame from ``read_interactions``.

    Returns:
        dict with ``offsets, items, timestamps, split`` (the arrays of the folder),
        ``user_ids, item_ids`` (original ids in index order) and ``counts``.
    """
    data_config = config.data
    timer = timer or _StageTimer()
    path = report.path
    counts: dict[str, int] = {"read": frame.height, "bad_lines_skipped": report.bad_lines}

    user_codes, user_values = _encode(frame.get_column("user"))
    item_codes, item_values = _encode(frame.get_column("item"))
    timestamps = frame.get_column("timestamp").to_numpy().astype(np.int64)
    rows = frame.get_column("row").to_numpy().astype(np.int64)
    ratings = frame.get_column("rating")
    counts["raw_users"] = len(user_values)
    counts["raw_items"] = len(item_values)
    timer.done("encode")

    keep = np.ones(frame.height, dtype=bool)
    if data_config.dedup:
        keep &= ~duplicate_mask(user_codes, item_codes, timestamps)
    counts["duplicates_removed"] = int(frame.height - keep.sum())
    timer.done("dedup")

    if data_config.min_rating is not None:
        if not report.has_ratings:
            raise DataError(f"{path}: data.min_rating is set but the file has no rating column")
        rated = ratings.fill_null(-np.inf).to_numpy() >= data_config.min_rating
        counts["below_min_rating_removed"] = int((keep & ~rated).sum())
        keep &= rated
    else:
        counts["below_min_rating_removed"] = 0
    if not keep.any():
        raise DataError(f"{path}: no interactions left after data.min_rating={data_config.min_rating}")
    user_codes, item_codes = user_codes[keep], item_codes[keep]
    timestamps, rows = timestamps[keep], rows[keep]
    timer.done("filter")

    core, passes = k_core(user_codes, item_codes, data_config.k_core)
    counts["k_core_removed"] = int(len(core) - core.sum())
    counts["k_core_passes"] = passes
    if not core.any():
        raise DataError(
            f"{path}: nothing left after the {data_config.k_core}-core (every user or item has "
            f"fewer than {data_config.k_core} events once the others are removed); lower data.k_core "
            f"(e.g. --set data.k_core={max(1, data_config.k_core // 2)}, or 1 to disable it)"
        )
    user_codes, item_codes = user_codes[core], item_codes[core]
    timestamps, rows = timestamps[core], rows[core]
    timer.done("k_core")

    user_index, user_order = first_appearance_index(user_codes)
    item_index, item_order = first_appearance_index(item_codes)
    num_users, num_items = len(user_order), len(item_order)
    order = _sort_by_user_then_time(user_index, timestamps)  # arrays are in file order
    items = item_index[order].astype(np.int32)
    timestamps = timestamps[order]
    rows = rows[order]
    per_user = np.bincount(user_index, minlength=num_users + 1)  # entry 0: the unknown user
    offsets = np.zeros(num_users + 2, dtype=np.int64)
    np.cumsum(per_user, out=offsets[1:])
    timer.done("index_sort")

    if data_config.split == "leave_one_out":
        split = leave_one_out_labels(offsets, data_config.min_user_interactions_for_eval)
    else:
        split = chronological_labels(timestamps, rows, data_config.split_ratios)
    timer.done("split")

    counts["interactions"] = len(items)
    return {
        "offsets": offsets,
        "items": items,
        "timestamps": timestamps,
        "split": split,
        "user_ids": user_values.gather(user_order),
        "item_ids": item_values.gather(item_order),
        "num_users": num_users,
        "num_items": num_items,
        "counts": counts,
    }


# --------------------------------------------------------------------------------------------
# Writing and reporting
# --------------------------------------------------------------------------------------------


def _percentiles(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    return {
        "min": int(lengths.min()),
        "p50": float(np.percentile(lengths, 50)),
        "p90": float(np.percentile(lengths, 90)),
        "p99": float(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 4),
    }


def _meta(config: Config, source: Path, report: ReadReport, result: dict) -> dict[str, Any]:
    data_config = config.data
    offsets, split = result["offsets"], result["split"]
    lengths = np.diff(offsets)[1:]
    num_users, num_items, total = result["num_users"], result["num_items"], len(result["items"])
    split_counts = {name: int((split == code).sum()) for name, code in SPLIT_CODES.items()}
    owners = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    evaluated = {}
    for name in ("valid", "test"):
        # The evaluation target is a user's first event of the split with an earlier event.
        positions = np.flatnonzero(split == SPLIT_CODES[name])
        users_with = np.unique(owners[positions[positions > offsets[owners[positions]]]])
        evaluated[name] = int(len(users_with))
    return {
        "format_version": PROCESSED_FORMAT_VERSION,
        "num_users": num_users,
        "num_items": num_items,
        "num_interactions": total,
        "density": round(total / (num_users * num_items), 8),
        "split": data_config.split,
        "split_ratios": list(data_config.split_ratios) if data_config.split == "chronological" else None,
        "split_counts": split_counts,
        "evaluated_users": evaluated,
        "min_user_interactions_for_eval": data_config.min_user_interactions_for_eval,
        "source": {
            "path": str(source),
            "sha256": sha256_file(source),
            "format": report.format,
            "size_bytes": source.stat().st_size,
            "columns": {k: str(v) for k, v in report.columns.items()},
            "timestamp_unit": report.timestamp_unit,
        },
        "cleaning": {
            "dedup": data_config.dedup,
            "min_rating": data_config.min_rating,
            "k_core": data_config.k_core,
            "normalize_ids": data_config.normalize_ids,
            "skip_bad_lines": data_config.skip_bad_lines,
        },
        "counts": result["counts"],
        "sequence_length": _percentiles(lengths),
        "has_timestamps": report.has_timestamps,
    }


def _id_text(ids: pl.Series) -> bytes:
    if len(ids) == 0:
        return b""
    return ("\n".join(ids.to_list()) + "\n").encode("utf-8")


def _write_folder(folder: Path, config: Config, meta: dict, result: dict) -> None:
    np.save(folder / "seq_offsets.npy", result["offsets"].astype(np.int64))
    np.save(folder / "seq_items.npy", result["items"].astype(np.int32))
    np.save(folder / "seq_timestamps.npy", result["timestamps"].astype(np.int64))
    np.save(folder / "seq_split.npy", result["split"].astype(np.uint8))
    (folder / "user_ids.txt").write_bytes(_id_text(result["user_ids"]))
    (folder / "item_ids.txt").write_bytes(_id_text(result["item_ids"]))
    save_config(config, folder / "config.yaml")
    # meta.json last: a folder with meta.json has everything else.
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def format_summary(summary: dict, report: ReadReport | None = None) -> str:
    """Human-readable end-of-run summary."""
    counts = summary["counts"]
    lengths = summary.get("sequence_length", {})
    lines = [
        f"preprocessed {summary['source']['path']} ({summary['source']['format']}, "
        f"engine {report.engine if report else '?'}) -> {summary.get('output_dir', '?')}",
        f"  read {counts['read']:,} events, {counts['raw_users']:,} users, {counts['raw_items']:,} items",
    ]
    if counts.get("bad_lines_skipped"):
        first = f" (first: {report.first_bad_line})" if report and report.first_bad_line else ""
        lines.append(f"  skipped {counts['bad_lines_skipped']:,} bad lines{first}")
    lines += [
        f"  removed {counts['duplicates_removed']:,} duplicates, "
        f"{counts['below_min_rating_removed']:,} below min_rating, "
        f"{counts['k_core_removed']:,} by the {summary['cleaning']['k_core']}-core "
        f"({counts['k_core_passes']} passes)",
        f"  kept {summary['num_interactions']:,} interactions, {summary['num_users']:,} users, "
        f"{summary['num_items']:,} items; density {summary['density']:.6f}",
        f"  sequence length: p50 {lengths.get('p50', 0):g}, p90 {lengths.get('p90', 0):g}, "
        f"p99 {lengths.get('p99', 0):g}, max {lengths.get('max', 0)}, mean {lengths.get('mean', 0):g}",
        f"  split {summary['split']}: train {summary['split_counts']['train']:,}, "
        f"valid {summary['split_counts']['valid']:,}, test {summary['split_counts']['test']:,} events; "
        f"evaluated users valid {summary['evaluated_users']['valid']:,}, "
        f"test {summary['evaluated_users']['test']:,}",
    ]
    if not summary.get("has_timestamps", True):
        lines.append("  no timestamps in this format: file order is time order")
    seconds = summary.get("seconds", {})
    if seconds:
        stages = ", ".join(f"{name} {value:.2f}" for name, value in seconds.items())
        lines.append(f"  seconds: {stages}; total {sum(seconds.values()):.2f}")
    return "\n".join(lines)
