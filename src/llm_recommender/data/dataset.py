"""The processed dataset on disk (see docs/data_format.md), and what training reads from it.

``ProcessedData`` memory-maps the arrays written by preprocessing; it is the one object
training, evaluation and serving use to reach sequences, splits and id maps.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import DataError

PROCESSED_FORMAT_VERSION = 1

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}

REQUIRED_FILES = (
    "meta.json",
    "user_ids.txt",
    "item_ids.txt",
    "seq_offsets.npy",
    "seq_items.npy",
    "seq_timestamps.npy",
    "seq_split.npy",
)


def _read_ids(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if not text:
        return []
    if not text.endswith("\n"):
        raise DataError(f"{path}: truncated id file (no final newline)")
    return text[:-1].split("\n")


class ProcessedData:
    """A processed dataset folder, memory-mapped.

    Args:
        path: folder written by ``llmrec preprocess``.
        mmap: memory-map the arrays (default) instead of reading them into RAM.
        train_through: ``train`` (default) or ``valid``: the latter is the view of a refit
            (``stage_a.refit_on_valid``): validation events count as training events, and
            the validation split can no longer be evaluated.
    """

    def __init__(self, path: str | Path, mmap: bool = True, train_through: str = "train") -> None:
        if train_through not in ("train", "valid"):
            raise ValueError(f"train_through must be 'train' or 'valid', got {train_through!r}")
        self.train_through = train_through
        self._train_max_label = SPLIT_CODES[train_through]
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: processed data folder not found (run llmrec preprocess)")
        missing = [name for name in REQUIRED_FILES if not (self.path / name).is_file()]
        if missing:
            raise DataError(
                f"{self.path}: not a processed dataset (missing {', '.join(missing)}); "
                "run llmrec preprocess"
            )
        try:
            self.meta: dict = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.path / 'meta.json'}: corrupt ({exc})") from None
        version = self.meta.get("format_version")
        if version != PROCESSED_FORMAT_VERSION:
            raise DataError(
                f"{self.path / 'meta.json'}: format_version {version!r}, this package reads "
                f"{PROCESSED_FORMAT_VERSION}; preprocess the data again"
            )
        mode = "r" if mmap else None
        try:
            self.offsets = np.load(self.path / "seq_offsets.npy", mmap_mode=mode)
            self.items = np.load(self.path / "seq_items.npy", mmap_mode=mode)
            self.timestamps = np.load(self.path / "seq_timestamps.npy", mmap_mode=mode)
            self.split_labels = np.load(self.path / "seq_split.npy", mmap_mode=mode)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{self.path}: corrupt array file ({exc})") from None
        self.num_users = int(self.meta["num_users"])
        self.num_items = int(self.meta["num_items"])
        self.num_interactions = int(self.meta["num_interactions"])
        if (
            len(self.offsets) != self.num_users + 2
            or len(self.items) != self.num_interactions
            or len(self.timestamps) != self.num_interactions
            or len(self.split_labels) != self.num_interactions
            or int(self.offsets[-1]) != self.num_interactions
        ):
            raise DataError(f"{self.path}: array sizes disagree with meta.json (corrupt folder)")

    # ---------------------------------------------------------------- sequences and splits

    @cached_property
    def lengths(self) -> np.ndarray:
        """Events per user, indexed by user (entry 0 is the empty unknown user)."""
        return np.diff(np.asarray(self.offsets)).astype(np.int64)

    @cached_property
    def train_mask(self) -> np.ndarray:
        """True for every training event, flat (validation events too in a ``train_through="valid"`` view)."""
        return np.asarray(self.split_labels) <= self._train_max_label

    @cached_property
    def train_lengths(self) -> np.ndarray:
        """Training events per user (a prefix of each user's sequence; validation events too
        in a ``train_through="valid"`` view)."""
        cumulative = np.concatenate([[0], np.cumsum(self.train_mask, dtype=np.int64)])
        offsets = np.asarray(self.offsets)
        return cumulative[offsets[1:]] - cumulative[offsets[:-1]]

    def sequence(self, user: int) -> np.ndarray:
        """All of a user's item indices in time order."""
        return np.asarray(self.items[self.offsets[user] : self.offsets[user + 1]])

    def train_sequence(self, user: int) -> np.ndarray:
        """A user's training items (the prefix labelled train)."""
        start = int(self.offsets[user])
        return np.asarray(self.items[start : start + int(self.train_lengths[user])])

    def eval_examples(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Users evaluated on ``split`` and the flat position of each one's target.

        The target is the user's first event labelled ``split`` that has an earlier event;
        the history is ``items[offsets[user]:position]``.

        Returns:
            (users, positions): int64 arrays of equal length, users ascending.
        """
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        code = SPLIT_CODES[split]
        if code <= self._train_max_label:
            raise DataError(f"{self.path}: the {split!r} events are training events in this view (a refit)")
        labels = np.asarray(self.split_labels)
        offsets = np.asarray(self.offsets)
        positions = np.flatnonzero(labels == code)
        if len(positions) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        owners = np.searchsorted(offsets, positions, side="right") - 1
        # First labelled event of each user (positions ascending, owners ascending).
        first = np.ones(len(positions), dtype=bool)
        first[1:] = owners[1:] != owners[:-1]
        positions, owners = positions[first], owners[first]
        has_history = positions > offsets[owners]
        return owners[has_history].astype(np.int64), positions[has_history].astype(np.int64)

    def item_popularity(self, include_valid: bool = False) -> np.ndarray:
        """Interaction counts per item (index 0 is padding, count 0) over training events
        (and validation events with ``include_valid``)."""
        labels = np.asarray(self.split_labels)
        keep = labels <= max(self._train_max_label, 1 if include_valid else 0)
        counts = np.bincount(np.asarray(self.items)[keep], minlength=self.num_items + 1)
        counts[0] = 0
        return counts.astype(np.int64)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of what a model trained on this folder depends on: the id maps (which index is
        which user and item), every user's event sequence and every event's split label.

        Preprocessing the same raw file with another split, k-core or evaluation threshold
        changes it; moving or copying the folder does not. Checkpoints record it, and
        evaluation, recommendation and serving refuse a folder whose fingerprint differs
        (test events of one folder can be training events of the other).
        """
        digest = hashlib.sha256()
        for array in (self.offsets, self.items, self.split_labels):
            array = np.ascontiguousarray(array)
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(memoryview(array).cast("B"))
        for name in ("user_ids.txt", "item_ids.txt"):
            digest.update(name.encode())
            digest.update((self.path / name).read_bytes())
        return digest.hexdigest()

    # ---------------------------------------------------------------- id maps

    @cached_property
    def user_ids(self) -> list[str]:
        """Original user ids; ``user_ids[u - 1]`` is user index ``u``."""
        ids = _read_ids(self.path / "user_ids.txt")
        if len(ids) != self.num_users:
            raise DataError(f"{self.path / 'user_ids.txt'}: {len(ids)} ids, meta.json says {self.num_users}")
        return ids

    @cached_property
    def item_ids(self) -> list[str]:
        """Original item ids; ``item_ids[i - 1]`` is item index ``i``."""
        ids = _read_ids(self.path / "item_ids.txt")
        if len(ids) != self.num_items:
            raise DataError(f"{self.path / 'item_ids.txt'}: {len(ids)} ids, meta.json says {self.num_items}")
        return ids

    @cached_property
    def user_index(self) -> dict[str, int]:
        """Original user id → user index (1-based)."""
        return {uid: i + 1 for i, uid in enumerate(self.user_ids)}

    @cached_property
    def item_index(self) -> dict[str, int]:
        """Original item id → item index (1-based)."""
        return {iid: i + 1 for i, iid in enumerate(self.item_ids)}


# ---------------------------------------------------------------------------------- training


class TrainWindows:
    """Training examples: windows of each user's training prefix, built in whole batches.

    Each example is one user and the end of a window over the user's training events. The
    most recent window ends at the last training event; with ``windows_per_user > 1`` earlier,
    non-overlapping windows are added (long histories otherwise see only their tail).

    A window ``w_1..w_n`` (n <= max_seq_len + 1) becomes, right-padded with item 0:

    - with the user token: ``item_seq = w_1..w_{n-1}``, ``targets = w_1..w_n``: the user
      position predicts ``w_1``, item position j predicts ``w_{j+1}``;
    - without: ``item_seq = w_1..w_{n-1}``, ``targets = w_2..w_n``.

    Args:
        data: the processed dataset.
        max_seq_len: most input items per example.
        use_user_token: whether the model prepends a user token.
        windows_per_user: windows per user (the most recent first); ``None``: all of them, so
            every training event of every user is a target once per epoch.
        shuffle_ties: training events of one user with the same timestamp have no known order
            (MovieLens logs half of its events in the same second as the previous one; the
            file order decides): :meth:`set_epoch` gives each such group a new random order
            every epoch instead of the file's. Validation and test events never move.
        deletion_prob: data augmentation: each event of a window but its last is deleted with
            this probability, anew in every epoch (:meth:`set_epoch`) and batch, and the rest
            close up: a shorter history of the same user in the same order. One input always
            stays, so every example keeps a target.
        substitution_prob: data augmentation: each input item (never a target) is replaced
            with this probability by an item drawn uniformly from ``1..data.num_items``, anew
            in every epoch and batch, after the deletions.
        reversal_prob: data augmentation: each window is read in reverse order (after the
            deletions) with this probability, anew in every epoch and batch.
        reversal_flags: batches also carry ``reversed`` (B,): 1 for a window read in reverse,
            else 0 (all 0 without ``reversal_prob``), for ``model.direction_token``.
        same_target_positives: batches also carry ``positive_seq`` (B, T), ``positive_users``
            (B,) and (with ``reversal_flags``) ``positive_reversed`` (B,): for each row, the
            training prefix of another user that ends just before an event of the row's last
            target item (DuoRec's supervised positive: its most recent items, as many as the
            batch's inputs are wide, right-padded, from the file's order), drawn anew in every
            epoch and batch; a row whose item no other user has gets its own input instead.
        tie_groups: batches also carry ``target_groups``: for each target, the id of its run of
            same-timestamp events (a user's events with one timestamp share an id; every other
            event has its own), so the loss can treat a run's order as unknown
            (``stage_a.ce.tied_targets``).
    """

    def __init__(
        self,
        data: ProcessedData,
        max_seq_len: int,
        use_user_token: bool = True,
        windows_per_user: int | None = 1,
        shuffle_ties: bool = False,
        deletion_prob: float = 0.0,
        substitution_prob: float = 0.0,
        tie_groups: bool = False,
        reversal_prob: float = 0.0,
        reversal_flags: bool = False,
        same_target_positives: bool = False,
    ) -> None:
        self.max_seq_len = int(max_seq_len)
        self.use_user_token = bool(use_user_token)
        self.deletion_prob = float(deletion_prob)
        self.substitution_prob = float(substitution_prob)
        self.reversal_prob = float(reversal_prob)
        self.reversal_flags = bool(reversal_flags)
        self.num_items = int(data.num_items)
        self.epoch_seed: tuple[int, int] = (0, 0)
        self.file_items = np.asarray(data.items)
        self.tied = _tied_training_events(data) if shuffle_ties else None
        # 1-based so that 0 marks padding in target_groups.
        self.event_groups = _event_groups(data) + 1 if tie_groups else None
        # With ties, a private copy whose tied positions set_epoch rewrites in place.
        self.items = self.file_items.copy() if self.num_tied_events else self.file_items
        starts = np.asarray(data.offsets)[:-1].astype(np.int64)
        ends = starts + data.train_lengths
        # A user needs one training event with the user token (it predicts it from the user
        # alone), two without (an input and a target).
        min_len = 1 if self.use_user_token else 2
        users, window_ends = [], []
        span = self.max_seq_len + 1
        if windows_per_user is None:  # enough windows to cover the longest prefix
            longest = int((ends - starts).max(initial=0))
            windows_per_user = max(1, -(-longest // span))
        for k in range(windows_per_user):
            end = ends - k * span
            ok = (end - starts) >= min_len
            ok[0] = False  # user 0 (unknown) has no events
            if k > 0:
                # Earlier windows only where the user has that many events left.
                ok &= (ends - starts) > k * span
            users.append(np.flatnonzero(ok))
            window_ends.append(end[ok])
        self.users = np.concatenate(users).astype(np.int64)
        self.window_ends = np.concatenate(window_ends).astype(np.int64)
        self.window_starts = np.maximum(starts[self.users], self.window_ends - span)
        if len(self.users) == 0:
            raise DataError(f"{data.path}: no user has enough training events to train on")
        self.user_starts = starts
        self.positives = _prefix_ends_by_item(starts, ends, self.file_items, self.num_items) if same_target_positives else None

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_tied_events(self) -> int:
        """Training events whose order :meth:`set_epoch` shuffles (0 without ``shuffle_ties``)."""
        return 0 if self.tied is None else len(self.tied[0])

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Enter epoch ``epoch``: every group of tied training events gets that epoch's order
        and deletions (``deletion_prob``) that epoch's draws, functions of (seed, epoch) and the
        batch only, so a resumed run, and every process, sees the same data."""
        self.epoch_seed = (int(seed), int(epoch))
        if not self.num_tied_events:
            return
        positions, groups = self.tied
        rng = np.random.default_rng([seed, epoch, 0x71E5])
        self.items[positions] = self.file_items[reorder_within_groups(positions, groups, rng)]

    @property
    def lengths(self) -> np.ndarray:
        """Events in each example's window (input items + 1), before any deletion."""
        return self.window_ends - self.window_starts

    @property
    def expected_targets(self) -> np.ndarray:
        """Expected target positions of each example, deletions included."""
        inputs = (self.lengths - 1) * (1.0 - self.deletion_prob)
        return inputs + (1.0 if self.use_user_token else 0.0)

    def _batch_rng(self, stream: int, indices: np.ndarray) -> np.random.Generator:
        """One generator per (seed, epoch, batch) and augmentation ``stream``: a resumed epoch
        draws what the first run drew, and each augmentation draws independently."""
        return np.random.default_rng([*self.epoch_seed, stream, int(indices[0]), len(indices)])

    def _delete_events(self, indices: np.ndarray, window: np.ndarray, length: np.ndarray, groups=None):
        """Delete each event but the last of every row with ``deletion_prob``; close up
        (``groups``, the window's run ids, if given, the same way)."""
        rng = self._batch_rng(0xDE1E7E, indices)
        column = np.arange(window.shape[1])[None, :]
        keep = (rng.random(window.shape) >= self.deletion_prob) | (column == (length - 1)[:, None])
        keep &= column < length[:, None]
        no_input = keep.sum(axis=1) < 2
        keep[no_input, np.maximum(length[no_input] - 2, 0)] = True  # the event before the last
        order = np.argsort(~keep, axis=1, kind="stable")  # kept events first, in order
        dropped = np.sort(~keep, axis=1)
        window = np.where(dropped, 0, np.take_along_axis(window, order, axis=1))
        if groups is not None:
            groups = np.where(dropped, 0, np.take_along_axis(groups, order, axis=1))
        return window, keep.sum(axis=1), groups

    def _reverse_windows(self, indices: np.ndarray, window: np.ndarray, length: np.ndarray, groups=None):
        """Reverse the events of each row with ``reversal_prob`` (padding stays at the end;
        ``groups``, if given, the same way); also returns which rows were reversed (B,)."""
        rng = self._batch_rng(0x4E7E, indices)
        flip = rng.random(len(indices)) < self.reversal_prob  # (B,)
        column = np.arange(window.shape[1])[None, :]
        source = np.where(flip[:, None] & (column < length[:, None]), length[:, None] - 1 - column, column)
        window = np.take_along_axis(window, source, axis=1)
        if groups is not None:
            groups = np.take_along_axis(groups, source, axis=1)
        return window, groups, flip

    def _substitute_inputs(self, indices: np.ndarray, item_seq: np.ndarray) -> np.ndarray:
        """Replace each input item (padding stays padding) with ``substitution_prob`` by a
        uniformly drawn item."""
        rng = self._batch_rng(0x5B57, indices)
        swap = (rng.random(item_seq.shape) < self.substitution_prob) & (item_seq > 0)
        drawn = rng.integers(1, self.num_items + 1, size=item_seq.shape)
        return np.where(swap, drawn, item_seq)

    def _same_target_positives(self, indices: np.ndarray, last_targets: np.ndarray, batch: dict) -> dict:
        """DuoRec's supervised positives for :meth:`batch` (``same_target_positives``)."""
        positions, owners, item_offsets = self.positives
        own = batch["item_seq"]  # (B, T)
        out = {"positive_seq": own, "positive_users": batch["user_ids"]}  # each row's own input
        if self.reversal_flags:
            out["positive_reversed"] = batch["reversed"]
        if len(positions) == 0:  # no training event has an earlier one: nothing to draw
            return out
        rng = self._batch_rng(0x5A3E, indices)
        first = item_offsets[last_targets]  # (B,)
        count = item_offsets[last_targets + 1] - first  # (B,) events of each row's last target
        # Up to 4 draws per row, keeping the first from another user (a draw of the row's own
        # user is not a different sequence).
        draws = first[:, None] + (rng.random((len(indices), 4)) * count[:, None]).astype(np.int64)  # (B, 4)
        draws = np.minimum(draws, len(positions) - 1)
        other = (owners[draws] != batch["user_ids"][:, None]) & (count[:, None] > 0)  # (B, 4)
        pick = draws[np.arange(len(indices)), other.argmax(axis=1)]  # (B,)
        found = other.any(axis=1)  # (B,)
        end, owner = positions[pick], owners[pick]  # (B,) the target event's position, its user
        width = own.shape[1]  # as long as the batch's own inputs: the second pass costs the first's
        start = np.maximum(self.user_starts[owner], end - width)  # (B,)
        length = np.where(found, end - start, 0)  # (B,) >= 1 where found
        column = np.arange(width)[None, :]  # (1, T)
        gather = np.minimum(start[:, None] + column, len(self.file_items) - 1)  # (B, T)
        prefix = np.where(column < length[:, None], self.file_items[gather], 0).astype(np.int64)
        out["positive_seq"] = np.where(found[:, None], prefix, own)
        out["positive_users"] = np.where(found, owner, batch["user_ids"])
        if self.reversal_flags:
            out["positive_reversed"] = np.where(found, 0.0, batch["reversed"]).astype(np.float32)
        return out

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Build one right-padded batch of examples ``indices`` (numpy, vectorised).

        Returns:
            ``user_ids`` (B,), ``item_seq`` (B, T), ``targets`` (B, S) with T <= max_seq_len
            the longest input in the batch, S = T + 1 with the user token, else T; int64.
            With ``reversal_flags`` also ``reversed`` (B,) float32, 1 for a reversed window.
            With ``tie_groups`` also ``target_groups`` (B, S): each target's run id, 0 where
            there is no target.
        """
        indices = np.asarray(indices, dtype=np.int64)
        span = self.max_seq_len + 1
        start = self.window_starts[indices]
        length = self.window_ends[indices] - start  # (B,) n, 1 <= n <= span
        column = np.arange(span)[None, :]  # (1, span)
        gather = np.minimum(start[:, None] + column, len(self.items) - 1)  # (B, span)
        window = np.where(column < length[:, None], self.items[gather], 0).astype(np.int64)
        groups = None
        if self.event_groups is not None:
            groups = np.where(column < length[:, None], self.event_groups[gather], 0).astype(np.int64)
        if self.deletion_prob > 0:
            window, length, groups = self._delete_events(indices, window, length, groups)
        flip = np.zeros(len(indices), dtype=bool)
        if self.reversal_prob > 0:
            window, groups, flip = self._reverse_windows(indices, window, length, groups)
        # item_seq: w_1..w_{n-1}; position n-1 (the last item) is never an input.
        item_seq = np.where(column[:, :-1] < (length - 1)[:, None], window[:, :-1], 0)
        targets = window if self.use_user_token else window[:, 1:]
        if self.substitution_prob > 0:
            item_seq = self._substitute_inputs(indices, item_seq)
        # Trim the padding columns no row uses: short-sequence data (Amazon: median 6 items)
        # then costs the backbone the batch's longest row, not max_seq_len.
        longest = int(length.max())
        item_seq = item_seq[:, : max(1, longest - 1)]
        targets = targets[:, : item_seq.shape[1] + (1 if self.use_user_token else 0)]
        batch = {"user_ids": self.users[indices].copy(), "item_seq": item_seq, "targets": targets}
        if self.reversal_flags:
            batch["reversed"] = flip.astype(np.float32)
        if self.positives is not None:
            last_targets = window[np.arange(len(indices)), length - 1]  # (B,)
            batch.update(self._same_target_positives(indices, last_targets, batch))
        if groups is not None:
            target_groups = groups if self.use_user_token else groups[:, 1:]
            batch["target_groups"] = np.where(targets > 0, target_groups[:, : targets.shape[1]], 0)
        return batch


def _prefix_ends_by_item(starts: np.ndarray, ends: np.ndarray, items: np.ndarray, num_items: int):
    """Training events with at least one earlier training event of their user, grouped by
    item: ``(positions, users, item_offsets)``, the positions of item i's events being
    ``positions[item_offsets[i]:item_offsets[i + 1]]`` (their users alongside)."""
    counts = np.maximum(ends - starts - 1, 0)  # (U,) events with an earlier one
    users = np.repeat(np.arange(len(starts)), counts)
    first = np.repeat(starts + 1 - np.cumsum(counts) + counts, counts)
    positions = first + np.arange(int(counts.sum()))
    order = np.argsort(items[positions], kind="stable")
    positions, users = positions[order], users[order]
    item_offsets = np.searchsorted(items[positions], np.arange(num_items + 2))
    return positions.astype(np.int64), users.astype(np.int64), item_offsets.astype(np.int64)


def timestamp_runs(timestamps: np.ndarray, starts: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Each event's run id (0-based, increasing): consecutive events with one timestamp, all
    ``inside`` or all not, and none at one of ``starts`` (a user's or a history's first event)
    but the first, share an id; every other event has its own."""
    timestamps = np.asarray(timestamps)
    starts = np.asarray(starts)
    new_group = np.ones(len(timestamps), dtype=bool)
    new_group[1:] = (timestamps[1:] != timestamps[:-1]) | (inside[1:] != inside[:-1])
    new_group[starts[starts < len(timestamps)]] = True
    return np.cumsum(new_group) - 1


def tied_events(timestamps: np.ndarray, starts: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of the ``inside`` events that share their run (:func:`timestamp_runs`)
    with another event, and the id of each one's run (runs are contiguous)."""
    groups = timestamp_runs(timestamps, starts, inside)
    positions = np.flatnonzero(inside & (np.bincount(groups)[groups] > 1))
    return positions, groups[positions]


def reorder_within_groups(positions: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``positions`` (grouped by ``groups``, contiguous runs) with each group's order drawn
    from ``rng``: ``items[positions] = items[result]`` gives every run a random order."""
    return positions[np.lexsort((rng.random(len(positions)), groups))]  # groups stay in place


def _event_groups(data: ProcessedData) -> np.ndarray:
    """Each event's run id: consecutive events of one user with one timestamp, all training
    or all not, share an id; every other event has its own."""
    return timestamp_runs(data.timestamps, np.asarray(data.offsets)[:-1], data.train_mask)


def _tied_training_events(data: ProcessedData) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of the training events that share their user and timestamp with another
    training event, and the id of each one's group (groups are contiguous runs)."""
    return tied_events(data.timestamps, np.asarray(data.offsets)[:-1], data.train_mask)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run
    sees exactly the order the uninterrupted run saw."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    return rng.permutation(num_examples)


def num_batches(num_examples: int, batch_size: int, fill_last: bool) -> int:
    """Batches in an epoch of ``num_examples``: rounded up with ``fill_last`` (at least one),
    down without it (the remainder skipped)."""
    if fill_last:
        return max(1, -(-num_examples // batch_size))
    return num_examples // batch_size


def epoch_batches(
    lengths: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    bucketing: bool,
    bucket_batches: int = 50,
    fill_last: bool = False,
) -> list[np.ndarray]:
    """The global batches of one epoch (full batches only), a function of (seed, epoch).

    With ``fill_last`` the epoch's partial last batch is completed with examples from the start
    of the shuffled order (cyclically, when there are fewer examples than one batch): every
    example is seen every epoch, a few twice. Without it the remainder is skipped (a different
    one every epoch): on 943 users at batch 512 that is 46% of the data per epoch.

    With ``bucketing``, the shuffled examples are cut into pools of ``bucket_batches``
    batches, each pool is sorted by window length and cut into batches, and the batch order
    is shuffled: batches hold similar lengths (little padding) yet every epoch differs.

    Args:
        lengths: window length of every example.
        batch_size: global batch size.
        seed: training seed.
        epoch: epoch number.
        bucketing: group similar lengths.
        bucket_batches: batches per sorting pool.
        fill_last: complete the last batch instead of skipping the remainder.
    """
    order = epoch_permutation(len(lengths), seed, epoch)
    count = num_batches(len(order), batch_size, fill_last)
    # Cyclic with fill_last: the start of the order fills the end; otherwise a truncation.
    order = np.resize(order, count * batch_size)
    if bucketing and count > 1:
        pool = batch_size * bucket_batches
        pieces = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            pieces.append(chunk[np.argsort(lengths[chunk], kind="stable")])
        order = np.concatenate(pieces)
    batches = order.reshape(count, batch_size)
    if bucketing and count > 1:
        rng = np.random.default_rng([seed, epoch, 0xB0C7])
        batches = batches[rng.permutation(count)]
    return list(batches)
