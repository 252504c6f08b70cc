"""Generated interaction logs with real structure, written in the raw formats users have.

The logs are for demos, tests and scale benchmarks, so they must carry the structure a
sequential recommender learns and a popularity baseline cannot:

- **Zipf-like item popularity**: item weights ``1 / rank**alpha`` over a random ranking.
- **Taste clusters**: every item and every user belongs to one of ``C`` clusters; a user's
  fresh picks come from the popularity of the items of their cluster (a few, ``noise_prob``,
  from the whole catalogue).
- **Item-to-item transitions**: every item has ``K`` "next" items in its own cluster; with
  probability ``follow_prob`` the next event follows one of them (the first is the most
  likely), otherwise it is a fresh pick. This is what a sequence model can learn.
- **Heavy-tailed lengths** (log-normal, at least 5 events per user when the budget allows,
  so a 5-core keeps nearly everyone) and **strictly increasing timestamps** per user.
- **Optional catalogue floor** (``min_item_events``): a Zipf tail over a large catalogue is
  mostly never drawn (100K users, 8M events, 349K items: only ~216K items survive a 5-core).
  With a floor of ``m``, every item gets at least ``m`` events: events of items above the
  floor, chosen at random, are given to the items below it. Those events are noise picks
  (random user and position, outside the taste clusters and transitions); the users, lengths,
  timestamps and ratings are those of the log without the floor.

Everything is vectorised numpy: the one Python loop runs over sequence positions (all
users at once), so the spec's Kindle scale (100K users, 349K items, 8M events) takes
seconds to generate; writing the text and compressing it is most of the time.
Same arguments and seed give the same bytes (the gzip header carries no time or name).
"""

from __future__ import annotations

import gzip
import io
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import DataError

FORMATS = ("amazon2018", "amazon2014", "amazon2023", "amazon2023_jsonl", "csv")

# 2010-01-01 .. about 2014-01-01 for the users' first events (seconds since the epoch).
_START_TIME = 1_262_304_000
_START_SPAN = 4 * 365 * 86_400
_MAX_USER_SPAN = 6 * 365 * 86_400
_MEAN_GAP = 3 * 86_400

# Short review texts, with the commas and escaped quotes a reader must skip over.
_REVIEW_TEXTS = (
    "Great read.",
    "Could not put it down, loved it!",
    "Not my kind of book.",
    "Five stars, would buy again",
    'The \\"twist\\" at the end was predictable.',
    "Good value; arrived quickly.",
    "Meh.",
    "Second in the series, as good as the first, maybe better.",
)
_SUMMARIES = ("Five Stars", "Four Stars", "Good", "Okay", "Loved it")

# Amazon rating distribution: mostly 5s.
_RATING_PROBS = np.array([0.05, 0.05, 0.10, 0.25, 0.55])


@dataclass
class SyntheticLog:
    """A generated log as arrays (one entry per event), plus the structure behind it.

    Events are grouped by user and in time order within each user.
    """

    users: np.ndarray
    """int32 user number (0-based) of each event."""
    items: np.ndarray
    """int32 item number (0-based) of each event."""
    timestamps: np.ndarray
    """int64 seconds since the epoch, strictly increasing within a user."""
    ratings: np.ndarray
    """int8 star rating 1..5."""
    user_cluster: np.ndarray
    """int32 cluster of every user."""
    item_cluster: np.ndarray
    """int32 cluster of every item."""
    item_weight: np.ndarray
    """float64 Zipf popularity weight of every item."""
    transitions: np.ndarray
    """int32 (num_items, K): the "next" items of every item, most likely first."""
    num_clusters: int
    """Number of taste clusters."""


def default_num_clusters(num_items: int) -> int:
    """Clusters when none are given: grows with the catalogue (2 .. 64)."""
    return int(min(64, max(2, round(np.sqrt(num_items) / 4))))


def generate_interactions(
    num_users: int,
    num_items: int,
    num_interactions: int,
    seed: int = 0,
    num_clusters: int | None = None,
    zipf_alpha: float = 0.8,
    follow_prob: float = 0.6,
    noise_prob: float = 0.05,
    transition_weights: tuple[float, ...] = (0.5, 0.25, 0.15, 0.10),
    min_length: int = 5,
    length_sigma: float = 1.2,
    min_item_events: int = 0,
) -> SyntheticLog:
    """Generate a structured interaction log in memory.

    Args:
        num_users: users (each gets at least one event).
        num_items: catalogue size.
        num_interactions: total events (exact).
        seed: random seed; same arguments and seed give the same log.
        num_clusters: taste clusters (``None``: :func:`default_num_clusters`).
        zipf_alpha: popularity exponent (weight of the item ranked r is ``r**-alpha``).
        follow_prob: probability that an event follows a transition from the previous item.
        noise_prob: probability that a fresh pick ignores the user's cluster (global popularity).
        transition_weights: probabilities of the 1st, 2nd, ... "next" item of a transition.
        min_length: shortest user sequence when ``num_interactions`` allows it.
        length_sigma: log-normal spread of the extra events per user (heavy tail).
        min_item_events: give every item at least this many events (0: no floor), taking
            them from items above the floor (see the module docstring); needs
            ``num_interactions >= num_items * min_item_events``.
    """
    _check_sizes(num_users, num_items, num_interactions, min_item_events)
    rng = np.random.default_rng(seed)
    num_clusters = int(num_clusters or default_num_clusters(num_items))
    num_clusters = max(1, min(num_clusters, num_items))

    # ---- items: clusters (all non-empty) and Zipf popularity over a random ranking
    item_cluster = rng.permutation(np.arange(num_items) % num_clusters).astype(np.int32)
    rank = rng.permutation(num_items)
    item_weight = 1.0 / np.power(rank + 1.0, zipf_alpha)
    sampler = _ClusterSampler(item_cluster, item_weight, num_clusters)
    global_cdf = np.cumsum(item_weight) / item_weight.sum()

    # ---- transitions: K next items per item, drawn from its own cluster by popularity
    num_next = len(transition_weights)
    transitions = sampler.sample(np.repeat(item_cluster, num_next), rng).reshape(num_items, num_next)
    for _ in range(8):  # no self-loops: redraw the few "next" items equal to their item
        loops = np.flatnonzero(transitions == np.arange(num_items)[:, None])
        if len(loops) == 0:
            break
        transitions.flat[loops] = sampler.sample(item_cluster[loops // num_next], rng)
    transitions = transitions.astype(np.int32)
    next_cdf = np.cumsum(np.asarray(transition_weights, dtype=np.float64))
    next_cdf /= next_cdf[-1]

    # ---- users: a cluster each, and a heavy-tailed length summing to num_interactions
    user_cluster = rng.integers(0, num_clusters, num_users).astype(np.int32)
    lengths = _user_lengths(num_users, num_interactions, min_length, length_sigma, rng)

    # ---- sequences: one vectorised step per position, over the users still active
    by_length = np.argsort(-lengths, kind="stable")  # longest first: active users are a prefix
    sorted_lengths = lengths[by_length]
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    starts = offsets[:-1][by_length]
    clusters = user_cluster[by_length]
    items = np.empty(num_interactions, dtype=np.int32)
    previous = np.zeros(num_users, dtype=np.int32)
    # active[t] = number of users with length > t (lengths sorted descending)
    active_counts = np.searchsorted(-sorted_lengths, -np.arange(int(sorted_lengths[0])), side="left")
    for position, active in enumerate(active_counts):
        active = int(active)
        fresh = sampler.sample(clusters[:active], rng)
        noise = rng.random(active) < noise_prob
        if noise.any():
            drawn = np.searchsorted(global_cdf, rng.random(int(noise.sum())), side="right")
            fresh[noise] = np.minimum(drawn, num_items - 1)
        if position > 0:
            follow = rng.random(active) < follow_prob
            choice = np.searchsorted(next_cdf, rng.random(active), side="right")
            choice = np.minimum(choice, num_next - 1)
            followed = transitions[previous[:active], choice]
            fresh = np.where(follow, followed, fresh)
        previous[:active] = fresh
        items[starts[:active] + position] = fresh

    users = np.repeat(np.arange(num_users, dtype=np.int32), lengths)

    # ---- timestamps: a start per user, then positive gaps (strictly increasing)
    span_per_event = np.minimum(_MEAN_GAP, _MAX_USER_SPAN // np.maximum(lengths, 1))
    gaps = 1 + (rng.exponential(1.0, num_interactions) * span_per_event[users]).astype(np.int64)
    first = offsets[:-1]
    gaps[first[lengths > 0]] = 0
    cumulative = np.cumsum(gaps)
    user_start = _START_TIME + rng.integers(0, _START_SPAN, num_users)
    timestamps = cumulative - cumulative[first][users] + user_start[users]

    ratings = (rng.choice(5, size=num_interactions, p=_RATING_PROBS) + 1).astype(np.int8)
    if min_item_events > 0:
        # Its own random stream: everything above is the same with and without the floor.
        _raise_item_floor(items, num_items, min_item_events, np.random.default_rng([seed, 2]))
    return SyntheticLog(
        users=users,
        items=items,
        timestamps=timestamps.astype(np.int64),
        ratings=ratings,
        user_cluster=user_cluster,
        item_cluster=item_cluster,
        item_weight=item_weight,
        transitions=transitions,
        num_clusters=num_clusters,
    )


class _ClusterSampler:
    """Draw items from the popularity of one cluster per draw, for many draws at once.

    Items are laid out cluster by cluster; the key of an item is ``cluster + (cumulative
    weight within the cluster)``, so one ``searchsorted`` serves every cluster.
    """

    def __init__(self, item_cluster: np.ndarray, item_weight: np.ndarray, num_clusters: int):
        self.order = np.argsort(item_cluster, kind="stable")
        clusters_sorted = item_cluster[self.order]
        weights = item_weight[self.order]
        totals = np.bincount(clusters_sorted, weights=weights, minlength=num_clusters)
        ends = np.cumsum(np.bincount(clusters_sorted, minlength=num_clusters))
        cumulative = np.cumsum(weights)
        before = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
        self.keys = clusters_sorted + (cumulative - before[clusters_sorted]) / totals[clusters_sorted]
        self.last = ends - 1  # last position of each cluster (guards float round-off)

    def sample(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        position = np.searchsorted(self.keys, clusters + rng.random(len(clusters)), side="right")
        return self.order[np.minimum(position, self.last[clusters])]


def _raise_item_floor(items: np.ndarray, num_items: int, floor: int, rng: np.random.Generator) -> None:
    """Give every item at least ``floor`` events (in place), taken from items above the floor.

    Each item above the floor offers its surplus (``count - floor``) events, picked at random
    among its own; the events to reassign are drawn uniformly from those offers, so no donor
    drops below the floor and the head items, which hold most of the surplus, give the most.
    """
    counts = np.bincount(items, minlength=num_items)
    deficit = np.maximum(floor - counts, 0)
    needed = int(deficit.sum())
    if needed == 0:
        return
    surplus = np.maximum(counts - floor, 0)
    shuffled = rng.permutation(len(items))
    by_item = shuffled[np.argsort(items[shuffled], kind="stable")]  # grouped by item, random within
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_item = np.arange(len(items)) - np.repeat(starts, counts)
    offered = by_item[rank_in_item < np.repeat(surplus, counts)]
    taken = rng.choice(offered, size=needed, replace=False)
    items[taken] = rng.permutation(np.repeat(np.arange(num_items, dtype=items.dtype), deficit))


def _user_lengths(
    num_users: int, total: int, min_length: int, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    base = min(min_length, total // num_users)
    extra = total - base * num_users
    weights = rng.lognormal(0.0, sigma, num_users)
    share = weights / weights.sum() * extra
    lengths = base + np.floor(share).astype(np.int64)
    missing = total - int(lengths.sum())
    if missing > 0:
        lengths[rng.choice(num_users, size=missing, replace=False)] += 1
    return lengths


def _check_sizes(num_users: int, num_items: int, num_interactions: int, min_item_events: int = 0) -> None:
    if num_users < 1:
        raise DataError(f"--users={num_users}: must be >= 1")
    if num_items < 2:
        raise DataError(f"--items={num_items}: must be >= 2")
    if num_interactions < num_users:
        raise DataError(
            f"--interactions={num_interactions}: must be >= --users={num_users} (one event per user at least)"
        )
    if min_item_events < 0:
        raise DataError(f"--min-item-events={min_item_events}: must be >= 0")
    if num_interactions < num_items * min_item_events:
        raise DataError(
            f"--min-item-events={min_item_events}: needs --interactions >= --items x {min_item_events} "
            f"= {num_items * min_item_events} (got {num_interactions})"
        )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _base36_ids(numbers: np.ndarray, prefix: str, width: int, offset: int) -> pl.Series:
    """Distinct, Amazon-looking ids (``prefix`` + ``width`` base-36 characters).

    ``number * multiplier + offset (mod 36**width)`` with a multiplier coprime to 36 is a
    bijection, so ids never collide; a multiplier near 0.618 * modulus spreads them out.
    """
    modulus = 36**width
    multiplier = int(modulus * 0.6180339887) | 1
    while multiplier % 3 == 0:
        multiplier += 2
    values = (numbers.astype(object) * multiplier + offset) % modulus  # exact big-int maths
    values = values.astype(np.uint64)
    alphabet = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
    digits = np.empty((len(numbers), width), dtype=np.uint8)
    for column in range(width - 1, -1, -1):
        digits[:, column] = alphabet[(values % 36).astype(np.int64)]
        values //= 36
    text = digits.view(f"S{width}").ravel().astype(str)
    return pl.Series(text).str.replace(r"^", prefix)


def _id_tables(num_users: int, num_items: int) -> tuple[pl.Series, pl.Series]:
    users = _base36_ids(np.arange(num_users), "A", 12, 7_777_777)
    items = _base36_ids(np.arange(num_items), "B0", 8, 12_345)
    return users, items


def _lines(frame: pl.DataFrame, fmt: str) -> pl.Series:
    """One text line per event (with its newline), built with vectorised string ops."""
    rating = pl.col("rating").cast(pl.String)
    ts = pl.col("timestamp").cast(pl.String)
    if fmt == "amazon2018":
        parts = [
            pl.lit('{"overall": '), rating, pl.lit('.0, "verified": true, "reviewerID": "'),
            pl.col("user"), pl.lit('", "asin": "'), pl.col("item"),
            pl.lit('", "reviewText": "'), pl.col("text"), pl.lit('", "summary": "'),
            pl.col("summary"), pl.lit('", "unixReviewTime": '), ts, pl.lit("}\n"),
        ]
    elif fmt == "amazon2014":
        parts = [
            pl.lit('{"reviewerID": "'), pl.col("user"), pl.lit('", "asin": "'), pl.col("item"),
            pl.lit('", "helpful": [0, 0], "reviewText": "'), pl.col("text"),
            pl.lit('", "overall": '), rating, pl.lit('.0, "summary": "'), pl.col("summary"),
            pl.lit('", "unixReviewTime": '), ts, pl.lit("}\n"),
        ]
    elif fmt == "amazon2023_jsonl":
        parts = [
            pl.lit('{"rating": '), rating, pl.lit('.0, "title": "'), pl.col("summary"),
            pl.lit('", "text": "'), pl.col("text"), pl.lit('", "asin": "'), pl.col("item"),
            pl.lit('", "parent_asin": "'), pl.col("item"), pl.lit('", "user_id": "'),
            pl.col("user"), pl.lit('", "timestamp": '), pl.col("timestamp_ms").cast(pl.String),
            pl.lit(', "verified_purchase": true}\n'),
        ]
    elif fmt == "amazon2023":
        parts = [
            pl.col("user"), pl.lit(","), pl.col("item"), pl.lit(","), rating, pl.lit(".0,"),
            pl.col("timestamp_ms").cast(pl.String), pl.lit("\n"),
        ]
    else:  # csv
        parts = [
            pl.col("user"), pl.lit(","), pl.col("item"), pl.lit(","), rating, pl.lit(","), ts,
            pl.lit("\n"),
        ]
    return frame.select(pl.concat_str(parts).alias("line")).to_series()


_HEADERS = {"amazon2023": "user_id,parent_asin,rating,timestamp\n", "csv": "user,item,rating,timestamp\n"}


def _series_bytes(lines: pl.Series) -> bytes:
    """The concatenated text of a string column (each value ends with its newline)."""
    array = lines.rechunk().to_arrow().cast("large_string")
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    return data_buffer.to_pybytes()[int(offsets[0]) : int(offsets[-1])]


class _BackgroundWriter:
    """Compress and write chunks in a thread while the next chunk is built (2 cores)."""

    def __init__(self, handle: io.BufferedWriter, compress: bool) -> None:
        self._sink = (
            gzip.GzipFile(filename="", mode="wb", fileobj=handle, compresslevel=1, mtime=0)
            if compress
            else handle
        )
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if self._error is None:
                try:
                    self._sink.write(chunk)  # zlib releases the GIL while it compresses
                except BaseException as exc:  # re-raised in the caller's thread by close()
                    self._error = exc

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if isinstance(self._sink, gzip.GzipFile):
            self._sink.close()


def write_synthetic_logs(
    path: str | Path,
    num_users: int,
    num_items: int,
    num_interactions: int,
    fmt: str = "amazon2018",
    seed: int = 0,
    num_clusters: int | None = None,
    verbose: bool = True,
    chunk_rows: int = 1_000_000,
    min_item_events: int = 0,
) -> dict:
    """Generate a structured log and write it as a raw file (``.gz``: gzip level 1).

    Args:
        path: output file; a name ending in ``.gz`` is gzip-compressed.
        num_users: users.
        num_items: catalogue size (items never drawn do not appear in the file).
        num_interactions: events written (exact).
        fmt: ``amazon2018`` / ``amazon2014`` (JSON lines: reviewerID, asin, overall,
            unixReviewTime and review text), ``amazon2023`` (CSV user_id, parent_asin, rating,
            timestamp in ms), ``amazon2023_jsonl``, or ``csv`` (user,item,rating,timestamp).
        seed: random seed; same arguments give the same bytes.
        num_clusters: taste clusters (``None``: grows with the catalogue).
        verbose: print what was written and how long it took.
        chunk_rows: events turned into text at a time (bounds memory).
        min_item_events: every item gets at least this many events (0: no floor; see
            :func:`generate_interactions`).

    Returns:
        dict with the counts, the file size and the seconds spent.
    """
    if fmt not in FORMATS:
        raise DataError(f"--format={fmt!r}: must be one of {', '.join(FORMATS)}")
    path = Path(path)
    started = time.perf_counter()
    log = generate_interactions(
        num_users, num_items, num_interactions, seed, num_clusters, min_item_events=min_item_events
    )
    generated = time.perf_counter()

    # Amazon 2014/2018 files are grouped by product; the 2023 and plain CSV ones by user.
    if fmt in ("amazon2018", "amazon2014"):
        order = np.lexsort((log.timestamps, log.items))
    else:
        order = np.arange(num_interactions)
    user_ids, item_ids = _id_tables(num_users, num_items)
    rng = np.random.default_rng([seed, 1])
    texts = pl.Series(_REVIEW_TEXTS)
    summaries = pl.Series(_SUMMARIES)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    compress = path.suffix == ".gz"
    try:
        with open(tmp, "wb") as handle:
            writer = _BackgroundWriter(handle, compress)
            try:
                if fmt in _HEADERS:
                    writer.write(_HEADERS[fmt].encode())
                for start in range(0, num_interactions, chunk_rows):
                    index = order[start : start + chunk_rows]
                    timestamps = log.timestamps[index]
                    frame = pl.DataFrame(
                        {
                            "user": user_ids.gather(log.users[index]),
                            "item": item_ids.gather(log.items[index]),
                            "rating": log.ratings[index],
                            "timestamp": timestamps,
                            # Amazon'23 times are milliseconds; add a sub-second part.
                            "timestamp_ms": timestamps * 1000 + rng.integers(0, 1000, len(index)),
                            "text": texts.gather(rng.integers(0, len(texts), len(index))),
                            "summary": summaries.gather(rng.integers(0, len(summaries), len(index))),
                        }
                    )
                    writer.write(_series_bytes(_lines(frame, fmt)))
            finally:
                writer.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finished = time.perf_counter()
    summary = {
        "path": str(path),
        "format": fmt,
        "num_users": num_users,
        "num_items_in_file": int(np.unique(log.items).size),
        "num_interactions": num_interactions,
        "num_clusters": log.num_clusters,
        "min_item_events": min_item_events,
        "size_bytes": path.stat().st_size,
        "seconds_generate": round(generated - started, 2),
        "seconds_write": round(finished - generated, 2),
    }
    if verbose:
        print(
            f"wrote {path}: {num_interactions:,} interactions, {num_users:,} users, "
            f"{summary['num_items_in_file']:,} items ({fmt}, {summary['size_bytes'] / 2**20:,.1f} MiB) "
            f"in {finished - started:.1f} s (generate {generated - started:.1f} s, "
            f"write {finished - generated:.1f} s)"
        )
    return summary
