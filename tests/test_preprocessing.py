"""Preprocessing: dedup, k-core, indices, splits and the processed folder, on hand-made
examples whose answers are worked out in the comments, and on the shared real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, shared_path
from llm_recommender.config import Config, DataConfig, load_config
from llm_recommender.data.dataset import REQUIRED_FILES, ProcessedData
from llm_recommender.data.preprocessing import (
    chronological_labels,
    duplicate_mask,
    first_appearance_index,
    k_core,
    leave_one_out_labels,
    run_preprocessing,
)
from llm_recommender.errors import DataError


def _config(path: Path, **data) -> Config:
    return Config(data=DataConfig(path=str(path), **data))


def _csv(tmp_path: Path, rows: list[tuple], name: str = "log.csv") -> Path:
    path = tmp_path / name
    lines = ["user,item,timestamp,rating"] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------ pure stages


def test_k_core_cascades_until_stable():
    # A 2x2 block {A,B}x{x,y} plus a chain C-x, C-z, D-z. With k=2:
    # pass 1 drops D (1 event) -> z has 1 event; pass 2 drops C-z -> C has 1 event;
    # pass 3 drops C-x; pass 4 finds everything stable. Only the block remains.
    users = np.array([0, 0, 1, 1, 2, 2, 3])  # A A B B C C D
    items = np.array([0, 1, 0, 1, 0, 2, 2])  # x y x y x z z
    keep, passes = k_core(users, items, 2)
    assert keep.tolist() == [True, True, True, True, False, False, False]
    assert passes == 4
    keep, passes = k_core(users, items, 1)
    assert keep.all() and passes == 0
    keep, _ = k_core(users, items, 3)
    assert not keep.any()


def test_duplicates_are_same_user_item_time_first_kept():
    users = np.array([0, 0, 0, 1, 0])
    items = np.array([5, 5, 5, 5, 6])
    stamps = np.array([10, 10, 11, 10, 10])
    # event 1 repeats event 0; event 2 is a later re-purchase; event 3 another user.
    assert duplicate_mask(users, items, stamps).tolist() == [False, True, False, False, False]


def test_first_appearance_index():
    codes = np.array([7, 3, 7, 9, 3])
    index, order = first_appearance_index(codes)
    assert index.tolist() == [1, 2, 1, 3, 2]
    assert order.tolist() == [7, 3, 9]


def test_leave_one_out_labels_and_short_users():
    # user 0 is the empty unknown user; users 1..3 have 5, 2 and 3 events.
    offsets = np.array([0, 0, 5, 7, 10])
    labels = leave_one_out_labels(offsets, min_events=3)
    assert labels.tolist() == [0, 0, 0, 1, 2] + [0, 0] + [0, 1, 2]


def test_chronological_labels_global_time_ties_in_file_order():
    # Ten events, times out of order, two ties at t=5 (rows 3 and 8: row 3 comes first).
    stamps = np.array([1, 9, 2, 5, 7, 3, 8, 4, 5, 10])
    rows = np.arange(10)
    labels = chronological_labels(stamps, rows, [0.8, 0.1, 0.1])
    # time order: rows 0(1) 2(2) 5(3) 7(4) 3(5) 8(5) 4(7) 6(8) | 1(9) | 9(10)
    assert labels.tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    labels = chronological_labels(stamps, rows, [0.6, 0.2, 0.2])
    # first 6 train: rows 0 2 5 7 3 8; next 2 valid: rows 4 6; last 2 test: rows 1 9
    assert labels.tolist() == [0, 2, 0, 0, 1, 0, 1, 0, 0, 2]


# ------------------------------------------------------------------------------ whole runs


HAND_MADE = [
    # user, item, timestamp, rating (file order)
    ("u2", "b", 100, 5),
    ("u1", "a", 50, 4),
    ("u2", "a", 90, 3),   # earlier than u2's first line: sorts before it
    ("u1", "c", 60, 2),
    ("u2", "a", 90, 3),   # exact duplicate of the line above
    ("u1", "b", 60, 5),   # same time as u1-c: file order keeps it after u1-c
    ("u3", "c", 10, 1),
    ("u1", "d", 70, 5),
]


def test_hand_made_run_indices_order_splits_and_id_maps(tmp_path, capsys):
    path = _csv(tmp_path, HAND_MADE)
    out = tmp_path / "proc"
    summary = run_preprocessing(_config(path, k_core=1), out)
    printed = capsys.readouterr().out
    assert "removed 1 duplicates" in printed and "p50" in printed and "seconds:" in printed

    data = ProcessedData(out)
    # first appearance in the file: users u2, u1, u3; items b, a, c, d
    assert data.user_ids == ["u2", "u1", "u3"]
    assert data.item_ids == ["b", "a", "c", "d"]
    assert (data.num_users, data.num_items, data.num_interactions) == (3, 4, 7)
    assert np.asarray(data.offsets).tolist() == [0, 0, 2, 6, 7]
    # u2: a(90) b(100); u1: a(50) c(60) b(60) d(70); u3: c(10)
    assert data.sequence(1).tolist() == [2, 1]
    assert data.sequence(2).tolist() == [2, 3, 1, 4]
    assert data.sequence(3).tolist() == [3]
    assert np.asarray(data.timestamps).tolist() == [90, 100, 50, 60, 60, 70, 10]
    # leave-one-out: u2 (2 events) and u3 (1) are too short: all training, not evaluated
    assert np.asarray(data.split_labels).tolist() == [0, 0, 0, 0, 1, 2, 0]
    users, positions = data.eval_examples("test")
    assert users.tolist() == [2] and positions.tolist() == [5]
    assert data.eval_examples("valid")[0].tolist() == [2]
    # id maps round trip: every original (user, item) pair comes back
    back = {
        (data.user_ids[u - 1], data.item_ids[i - 1])
        for u in range(1, data.num_users + 1)
        for i in data.sequence(u).tolist()
    }
    assert back == {(u, i) for u, i, _, _ in HAND_MADE}
    assert data.user_index["u1"] == 2 and data.item_index["d"] == 4

    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["duplicates_removed"] == 1
    assert meta["split_counts"] == {"train": 5, "valid": 1, "test": 1}
    assert meta["evaluated_users"] == {"valid": 1, "test": 1}
    assert meta["source"]["format"] == "csv" and len(meta["source"]["sha256"]) == 64
    assert meta["sequence_length"]["max"] == 4
    assert summary["num_interactions"] == 7 and set(summary["seconds"]) >= {"read", "k_core", "write"}
    assert sorted(p.name for p in out.iterdir()) == sorted((*REQUIRED_FILES, "config.yaml"))


def test_chronological_run(tmp_path):
    path = _csv(tmp_path, HAND_MADE)
    out = tmp_path / "proc"
    run_preprocessing(_config(path, k_core=1, split="chronological", split_ratios=[0.6, 0.2, 0.2]), out, verbose=False)
    data = ProcessedData(out)
    # 7 events by time: u3c(10) u1a(50) u1c(60) u1b(60) u1d(70) | u2a(90) | u2b(100)
    # round(7*0.6)=4 train, round(7*0.8)=6 -> 2 valid, 1 test
    labels = np.asarray(data.split_labels).tolist()
    assert labels == [1, 2, 0, 0, 0, 1, 0]
    for user in range(1, data.num_users + 1):  # labels never decrease along a user's time
        user_labels = labels[data.offsets[user] : data.offsets[user + 1]]
        assert user_labels == sorted(user_labels)


def test_min_rating_drops_low_ratings_after_dedup(tmp_path):
    path = _csv(tmp_path, HAND_MADE)
    out = tmp_path / "proc"
    summary = run_preprocessing(_config(path, k_core=1, min_rating=4.0), out, verbose=False)
    # below 4: u2-a (3), u1-c (2), u3-c (1); the duplicate u2-a was already removed by dedup
    assert summary["counts"]["below_min_rating_removed"] == 3
    assert summary["num_interactions"] == 4
    assert ProcessedData(out).user_ids == ["u2", "u1"]


def test_nothing_left_after_k_core_names_the_setting(tmp_path):
    path = _csv(tmp_path, HAND_MADE)
    with pytest.raises(DataError, match=r"log.csv: nothing left after the 5-core.*lower data.k_core"):
        run_preprocessing(_config(path), tmp_path / "proc", verbose=False)
    assert not (tmp_path / "proc").exists()


def test_reruns_are_byte_identical(tmp_path):
    path = _csv(tmp_path, HAND_MADE)
    first, second = tmp_path / "one", tmp_path / "two"
    run_preprocessing(_config(path, k_core=1), first, verbose=False)
    run_preprocessing(_config(path, k_core=1), second, verbose=False)
    for name in sorted(p.name for p in first.iterdir()):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_failed_run_keeps_previous_folder(tmp_path):
    path = _csv(tmp_path, HAND_MADE)
    out = tmp_path / "proc"
    run_preprocessing(_config(path, k_core=1), out, verbose=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken.csv"
    broken.write_text("user,item,timestamp\nu1,a,1\nu1,b,yesterday\n")
    with pytest.raises(DataError, match=r"broken.csv: line 3: timestamp 'yesterday' is not an integer"):
        run_preprocessing(_config(broken, k_core=1), out, verbose=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_folder_must_not_contain_the_input(tmp_path):
    path = _csv(tmp_path, HAND_MADE)
    with pytest.raises(DataError, match="would replace the input"):
        run_preprocessing(_config(path, k_core=1), tmp_path, verbose=False)


# ------------------------------------------------------------------------------ real data


def test_beauty_with_the_spec_config(tmp_path):
    path = shared_path("data", "amazon-beauty", "beauty_5core_sequences.txt")
    config = load_config(REPO_ROOT / "config" / "config.yaml", [f"data.path={path}"])
    out = tmp_path / "beauty"
    run_preprocessing(config, out, verbose=False)
    data = ProcessedData(out)
    assert (data.num_users, data.num_items, data.num_interactions) == (22_363, 12_101, 198_502)
    # S3-Rec numbered users and items 1.. in order of first appearance: indices = ids.
    assert data.user_ids[:3] == ["1", "2", "3"] and data.item_ids[-1] == "12101"
    assert data.sequence(1).tolist() == [1, 2, 3, 4, 5]
    users, _ = data.eval_examples("test")
    assert len(users) == 22_363  # every Beauty user has >= 5 events


@pytest.mark.parametrize(
    "name, users, items, events",
    [
        ("amazon2014_kindle_store_sample.csv.gz", 4_370, 4_444, 4_905),
        ("amazon2014_musical_instruments_5_head50.json", 49, 7, 50),
        # 1,108 events repeat an earlier (user, item, time): the same review listed under
        # two variants of a product, or the same record twice.
        ("amazon2018_all_beauty_5.json.gz", 991, 85, 4_161),
        ("amazon2023_all_beauty_5core_ratings.csv.gz", 253, 356, 2_535),
    ],
)
def test_every_raw_sample_preprocesses_with_k_core_1(tmp_path, name, users, items, events):
    path = shared_path("data", "raw-samples", name)
    out = tmp_path / "proc"
    run_preprocessing(_config(path, k_core=1), out, verbose=False)
    data = ProcessedData(out)
    assert (data.num_users, data.num_items, data.num_interactions) == (users, items, events)
    assert int(np.asarray(data.offsets)[-1]) == events


def test_movielens_100k_5_core(tmp_path):
    path = shared_path("data", "movielens-100k", "u.data")
    out = tmp_path / "ml"
    summary = run_preprocessing(_config(path), out, verbose=False)
    # every ML-100K user has >= 20 ratings; the 5-core drops the rarely rated movies
    assert summary["num_users"] == 943
    assert summary["num_items"] < 1_682
    assert summary["counts"]["k_core_removed"] == 100_000 - summary["num_interactions"]
    data = ProcessedData(out)
    stamps = np.asarray(data.timestamps)
    for user in (1, 500, 943):
        window = stamps[data.offsets[user] : data.offsets[user + 1]]
        assert (np.diff(window) >= 0).all()
