"""Generated logs: the structure is really there (Zipf, clusters, transitions a sequence
model can use), the counts are exact, and the same seed writes the same bytes."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from llm_recommender.config import Config, DataConfig
from llm_recommender.data.dataset import ProcessedData
from llm_recommender.data.preprocessing import run_preprocessing
from llm_recommender.data.readers import read_interactions
from llm_recommender.data.synthetic import FORMATS, generate_interactions, write_synthetic_logs
from llm_recommender.errors import DataError

USERS, ITEMS, EVENTS = 2_000, 3_000, 60_000


@pytest.fixture(scope="module")
def log():
    return generate_interactions(USERS, ITEMS, EVENTS, seed=3)


def test_counts_lengths_and_time_order(log):
    assert len(log.items) == EVENTS
    lengths = np.bincount(log.users, minlength=USERS)
    assert lengths.min() >= 5 and lengths.sum() == EVENTS
    assert lengths.max() > 8 * np.median(lengths)  # heavy tail
    same_user = log.users[1:] == log.users[:-1]
    assert (np.diff(log.timestamps)[same_user] > 0).all()  # strictly increasing per user


def test_item_popularity_is_zipf_like(log):
    counts = np.sort(np.bincount(log.items, minlength=ITEMS))[::-1].astype(float)
    ranks = np.arange(1, ITEMS + 1)
    window = slice(9, 1000)  # ranks 10..1000, away from the head and the sparse tail
    slope = np.polyfit(np.log(ranks[window]), np.log(counts[window] + 1), 1)[0]
    assert -1.3 < slope < -0.4
    top_share = counts[: ITEMS // 100].sum() / counts.sum()
    assert top_share > 0.10  # the top 1% of items take far more than 1% of events


def test_users_stay_in_their_taste_cluster(log):
    in_cluster = log.item_cluster[log.items] == log.user_cluster[log.users]
    # ~95% of fresh picks and all transitions stay in the cluster; chance is 1/C
    assert in_cluster.mean() > 0.85
    assert 1 / log.num_clusters < 0.2


def test_transitions_make_next_item_predictable_beyond_popularity(log):
    # Hold out each user's last event; predict it from the training events with
    # (a) the 10 most popular items and (b) the 10 most frequent successors of the
    # previous item (a first-order Markov chain). Sequence structure must win clearly.
    last = np.r_[log.users[1:] != log.users[:-1], True]
    train_pairs = ~last[:-1] & ~last[1:] & (log.users[1:] == log.users[:-1])
    prev, nxt = log.items[:-1][train_pairs], log.items[1:][train_pairs]
    popular = np.argsort(-np.bincount(log.items[~last], minlength=ITEMS))[:10]
    successor_counts: dict[int, np.ndarray] = {}
    order = np.lexsort((nxt, prev))
    prev, nxt = prev[order], nxt[order]
    starts = np.r_[0, np.flatnonzero(prev[1:] != prev[:-1]) + 1, len(prev)]
    for a, b in zip(starts[:-1], starts[1:]):
        successor_counts[int(prev[a])] = nxt[a:b]
    targets = log.items[last]
    previous = log.items[np.flatnonzero(last) - 1]
    hits_pop = np.isin(targets, popular).mean()
    hits_markov = np.mean(
        [
            t in np.argsort(-np.bincount(successor_counts.get(int(p), np.zeros(0, int)), minlength=ITEMS))[:10]
            for t, p in zip(targets, previous)
        ]
    )
    assert hits_markov > 2 * hits_pop
    assert hits_markov > 0.3


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    paths = [tmp_path / "a.json.gz", tmp_path / "b.json.gz", tmp_path / "c.json.gz"]
    for path, seed in zip(paths, (1, 1, 2)):
        write_synthetic_logs(path, 300, 200, 3_000, "amazon2018", seed=seed, verbose=False, chunk_rows=700)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert digests[0] == digests[1] != digests[2]


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("amazon2018", "amazon_json"),
        ("amazon2014", "amazon_json"),
        ("amazon2023", "amazon2023_csv"),
        ("amazon2023_jsonl", "amazon2023_jsonl"),
        ("csv", "csv"),
    ],
)
def test_every_format_reads_back(tmp_path, fmt, expected):
    path = tmp_path / f"gen_{fmt}.gz"
    info = write_synthetic_logs(path, 200, 150, 2_500, fmt, seed=5, verbose=False)
    frame, report = read_interactions(path, DataConfig())
    assert report.format == expected and report.engine == "polars"
    assert frame.height == 2_500 and frame.get_column("user").n_unique() == 200
    assert frame.get_column("item").n_unique() == info["num_items_in_file"]
    assert report.timestamp_unit == ("ms" if fmt.startswith("amazon2023") else "s")
    stamps = frame.get_column("timestamp")
    assert 1_262_304_000 <= stamps.min() and stamps.max() < 1_262_304_000 + 11 * 365 * 86_400


def test_five_core_keeps_nearly_everyone(tmp_path):
    path = tmp_path / "gen.json"
    write_synthetic_logs(path, 1_000, 800, 30_000, "amazon2018", seed=0, verbose=False)
    summary = run_preprocessing(Config(data=DataConfig(path=str(path))), tmp_path / "proc", verbose=False)
    assert summary["num_users"] >= 990
    assert summary["num_interactions"] >= 0.95 * 30_000
    assert ProcessedData(tmp_path / "proc").eval_examples("test")[0].size == summary["num_users"]


def test_bad_sizes_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="--interactions=5: must be >= --users=10"):
        write_synthetic_logs(tmp_path / "x.json", 10, 10, 5, verbose=False)
    with pytest.raises(DataError, match="--format='parquet'"):
        write_synthetic_logs(tmp_path / "x.json", 10, 10, 50, fmt="parquet", verbose=False)
    assert set(FORMATS) == {"amazon2018", "amazon2014", "amazon2023", "amazon2023_jsonl", "csv"}


def test_cli_generate_is_reproducible(tmp_path):
    outputs = []
    for name in ("one.csv.gz", "two.csv.gz"):
        result = subprocess.run(
            [sys.executable, "-m", "llm_recommender.cli", "generate", "--users", "50", "--items", "40",
             "--interactions", "500", "--format", "amazon2023", "--seed", "9", "--output", str(tmp_path / name)],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "wrote" in result.stdout and "500 interactions" in result.stdout
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]


def test_item_floor_covers_the_catalogue_and_changes_nothing_else():
    # A catalogue much larger than the events reach: most of the Zipf tail is never drawn.
    users, items, events = 500, 4_000, 30_000
    plain = generate_interactions(users, items, events, seed=4)
    floored = generate_interactions(users, items, events, seed=4, min_item_events=5)
    before = np.bincount(plain.items, minlength=items)
    after = np.bincount(floored.items, minlength=items)
    assert (before < 5).sum() > 1_000  # the problem the floor solves
    assert after.min() >= 5 and after.sum() == events
    # Only the missing events moved, and only away from items above the floor.
    moved = plain.items != floored.items
    assert moved.sum() == np.maximum(5 - before, 0).sum()
    assert (before[plain.items[moved]] > 5).all()
    for name in ("users", "timestamps", "ratings", "user_cluster", "item_cluster"):
        assert np.array_equal(getattr(plain, name), getattr(floored, name)), name
    again = generate_interactions(users, items, events, seed=4, min_item_events=5)
    assert np.array_equal(again.items, floored.items)


def test_item_floor_keeps_every_item_through_five_core(tmp_path):
    path = tmp_path / "gen.csv"
    info = write_synthetic_logs(path, 400, 3_000, 20_000, "csv", seed=1, verbose=False, min_item_events=5)
    assert info["num_items_in_file"] == 3_000
    summary = run_preprocessing(Config(data=DataConfig(path=str(path))), tmp_path / "proc", verbose=False)
    assert (summary["num_users"], summary["num_items"], summary["num_interactions"]) == (400, 3_000, 20_000)


def test_item_floor_needs_enough_events(tmp_path):
    with pytest.raises(DataError, match=r"--min-item-events=5: needs --interactions >= --items x 5 = 500 \(got 400\)"):
        write_synthetic_logs(tmp_path / "x.json", 10, 100, 400, min_item_events=5, verbose=False)
    result = subprocess.run(
        [sys.executable, "-m", "llm_recommender.cli", "generate", "--users", "20", "--items", "30",
         "--interactions", "400", "--min-item-events", "5", "--format", "csv", "--output", str(tmp_path / "f.csv")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "30 items" in result.stdout
