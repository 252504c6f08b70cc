"""The evaluator: candidates, masking, chunking, the command; on hand-made datasets."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_recommender.config import Config, EvaluationConfig
from llm_recommender.data.dataset import ProcessedData
from llm_recommender.errors import ConfigError, DataError
from llm_recommender.evaluation.evaluator import (
    candidates_path,
    deleted_histories,
    evaluate,
    get_candidates,
    input_sequences,
    load_candidates,
    run_evaluation_command,
    sample_candidates,
    save_candidates,
    tied_history_orders,
)
from processed_helpers import write_processed  # noqa: E402  (tests/ is on sys.path)


def random_data(folder: Path, num_users: int, num_items: int, seed: int = 0, max_len: int = 12) -> ProcessedData:
    rng = np.random.default_rng(seed)
    sequences = [list(rng.integers(1, num_items + 1, size=rng.integers(3, max_len))) for _ in range(num_users)]
    return write_processed(folder, sequences, num_items)


class DotScorer(torch.nn.Module):
    """Random user/item vectors plus the mean of the input items: scores depend on all inputs."""

    def __init__(self, num_users: int, num_items: int, dim: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.users = torch.nn.Parameter(torch.randn(num_users + 1, dim, generator=generator))
        self.items = torch.nn.Parameter(torch.randn(num_items + 1, dim, generator=generator))
        self.seen_training: list[bool] = []

    def _query(self, user_ids, item_seq):
        self.seen_training.append(self.training)
        mask = (item_seq != 0).float().unsqueeze(-1)  # (B, T, 1)
        history = (self.items[item_seq] * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, d)
        return self.users[user_ids] + history  # (B, d)

    def full_sort_predict(self, user_ids, item_seq):
        return self._query(user_ids, item_seq) @ self.items.T  # (B, I+1)

    def predict_candidates(self, user_ids, item_seq, candidates):
        return torch.einsum("bd,bcd->bc", self._query(user_ids, item_seq), self.items[candidates])


class TableScorer:
    """Fixed score per item, the same for every user."""

    def __init__(self, item_scores):
        self.item_scores = torch.as_tensor(item_scores, dtype=torch.float32)

    def full_sort_predict(self, user_ids, item_seq):
        return self.item_scores.unsqueeze(0).repeat(len(user_ids), 1)

    def predict_candidates(self, user_ids, item_seq, candidates):
        return self.item_scores[candidates]


def strip_timing(result: dict) -> dict:
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in ("seconds", "users_per_second", "candidate_seconds")}
        out[key] = value
    return out


# ------------------------------------------------------------------------------ inputs


def test_input_sequences_are_the_last_items_right_padded(tmp_path):
    data = write_processed(tmp_path / "d", [[1, 2, 3, 4, 5, 6], [7, 8, 9]])
    users, positions = data.eval_examples("test")
    seq = input_sequences(np.asarray(data.items), np.asarray(data.offsets), users, positions, 3)
    assert seq.tolist() == [[3, 4, 5], [7, 8, 0]]
    users, positions = data.eval_examples("valid")
    seq = input_sequences(np.asarray(data.items), np.asarray(data.offsets), users, positions, 6)
    # As wide as the longest history (4), not max_seq_len (6).
    assert seq.tolist() == [[1, 2, 3, 4], [7, 0, 0, 0]]


# ------------------------------------------------------------------------------ candidates


@pytest.mark.parametrize("num_items", [25, 5000])  # mostly the exact path / the bulk path
@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_negatives_are_unseen_distinct_and_seeded(tmp_path, num_items, strategy):
    data = random_data(tmp_path / "d", 300, num_items, max_len=15)
    cands = sample_candidates(data, "test", 10, strategy, seed=3)
    users, positions = data.eval_examples("test")
    assert cands.shape == (len(users), 11) and cands.dtype == np.int32
    assert np.array_equal(cands[:, 0], np.asarray(data.items)[positions])
    for row, user in zip(cands, users):
        negatives = row[1:]
        assert len(set(negatives.tolist())) == 10  # distinct, no padding needed here
        assert not set(negatives.tolist()) & set(data.sequence(user).tolist())  # never seen
        assert negatives.min() >= 1 and negatives.max() <= num_items
    assert np.array_equal(cands, sample_candidates(data, "test", 10, strategy, seed=3))
    assert not np.array_equal(cands, sample_candidates(data, "test", 10, strategy, seed=4))


def test_uniform_negatives_cover_items_evenly(tmp_path):
    # Users who never saw items 21..40: each should be drawn about equally often.
    rng = np.random.default_rng(1)
    sequences = [list(rng.integers(1, 21, size=6)) for _ in range(2000)]
    data = write_processed(tmp_path / "d", sequences, num_items=40)
    cands = sample_candidates(data, "test", 5, "uniform", seed=0)
    counts = np.bincount(cands[:, 1:].ravel(), minlength=41)[21:]
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_popularity_negatives_follow_counts(tmp_path):
    # 3000 probe users saw items 1, 2, 3; item 4 is far more popular than items 5..9.
    sequences = [[1, 2, 3]] * 3000 + [[4] * 6, [4] * 6, [5, 6, 7], [8, 9, 4]]
    data = write_processed(tmp_path / "d", sequences, num_items=9)
    drawn = sample_candidates(data, "test", 1, "popularity", seed=0)[:3000, 1]
    counts = np.bincount(np.asarray(data.items), minlength=10).astype(float)
    expected = counts[4:] / counts[4:].sum()  # item 4: 13/18, items 5..9: 1/18 each
    observed = np.bincount(drawn, minlength=10)[4:] / len(drawn)
    assert set(drawn.tolist()) <= set(range(4, 10))
    assert np.abs(observed - expected).max() < 0.03


def test_popularity_negatives_follow_counts_in_bulk_sampling(tmp_path):
    # Short histories over 200 Zipf-popular items: the bulk (rejection) path.
    rng = np.random.default_rng(0)
    popularity = 1.0 / np.arange(1, 201)
    sequences = [list(rng.choice(np.arange(1, 201), size=4, p=popularity / popularity.sum())) for _ in range(4000)]
    data = write_processed(tmp_path / "d", sequences, num_items=200)
    drawn = sample_candidates(data, "test", 1, "popularity", seed=0)[:, 1]
    weights = np.bincount(np.asarray(data.items), minlength=201).astype(float)
    weights[0] = 0
    expected = np.zeros(201)
    for user in range(1, data.num_users + 1):  # P(item) = weight / the user's unseen mass
        unseen = weights.copy()
        unseen[data.sequence(user)] = 0
        expected += unseen / unseen.sum()
    observed = np.bincount(drawn, minlength=201)
    top = slice(1, 11)  # the ten most popular items carry enough draws to compare
    assert np.abs(observed[top] - expected[top]).max() < 4 * np.sqrt(expected[top]).max()
    assert abs(observed[11:].sum() - expected[11:].sum()) < 4 * np.sqrt(expected[11:].sum())


def test_user_with_few_unseen_items_gets_all_of_them(tmp_path):
    sequences = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3]]
    data = write_processed(tmp_path / "d", sequences, num_items=12)
    cands = sample_candidates(data, "test", 5, "uniform", seed=0)
    assert cands[0, 0] == 10 and sorted(cands[0, 1:3].tolist()) == [11, 12]
    assert cands[0, 3:].tolist() == [0, 0, 0]  # padding
    assert sorted(cands[1, 1:].tolist()) == sorted(set(cands[1, 1:].tolist()))
    # Ranking masks the padding: item 0 scores highest but does not count; 11 and 12 do.
    scores = np.zeros(13)
    scores[0], scores[11], scores[12], scores[10] = 100.0, 3.0, 1.0, 2.0
    config = EvaluationConfig(num_negatives=5)
    result = evaluate(TableScorer(scores), data, "test", config, 5, protocols=("sampled",), candidates=cands,
                      return_ranks=True)
    assert result["ranks"]["sampled"][0] == 1
    assert result["sampled"]["users_with_fewer_negatives"] == 1


def test_candidates_round_trip_and_refuse_other_data(tmp_path):
    data = random_data(tmp_path / "a", 50, 100)
    other = random_data(tmp_path / "b", 50, 100, seed=1)
    cands = sample_candidates(data, "test", 20, "uniform", seed=0)
    users, _ = data.eval_examples("test")
    path = tmp_path / "c.safetensors"
    save_candidates(path, users, cands, {"data_fingerprint": data.fingerprint, "split": "test"})
    users_back, cands_back, meta = load_candidates(path, data=data, split="test")
    assert np.array_equal(users_back, users) and np.array_equal(cands_back, cands)
    assert meta["split"] == "test"
    with pytest.raises(DataError, match="other data"):
        load_candidates(path, data=other)
    with pytest.raises(DataError, match="split"):
        load_candidates(path, split="valid")


def test_candidates_are_cached_in_the_data_folder(tmp_path):
    data = random_data(tmp_path / "d", 40, 60)
    config = EvaluationConfig(num_negatives=10, seed=7)
    scorer = DotScorer(data.num_users, data.num_items)
    first = evaluate(scorer, data, "test", config, 5, protocols=("sampled",))
    path = candidates_path(data, "test", "uniform", 10, 7)
    assert first["sampled"]["candidates_file"] == str(path) and path.is_file()
    stamp = path.stat().st_mtime_ns
    second = evaluate(scorer, data, "test", config, 5, protocols=("sampled",))
    assert path.stat().st_mtime_ns == stamp  # reused, not resampled
    assert strip_timing(first) == strip_timing(second)
    _, cached, _ = load_candidates(path, data=data, split="test")
    assert np.array_equal(cached, sample_candidates(data, "test", 10, "uniform", 7))


# ------------------------------------------------------------------------------ full ranking


def test_full_ranking_masks_history_but_not_the_target(tmp_path):
    # User 1: history [5, 4, 3], target 2. User 2 repeats: history [1, 2, 1], target 2.
    data = write_processed(tmp_path / "d", [[5, 4, 3, 1, 2], [1, 2, 1, 2]], num_items=6)
    scores = [50.0, 6.0, 1.0, 5.0, 4.0, 3.0, 2.0]  # item 0 (padding) scores highest
    config = EvaluationConfig()
    result = evaluate(TableScorer(scores), data, "test", config, 2, protocols=("full",), return_ranks=True)
    # User 1: history 5, 4, 3, 1 masked (not only the last 2 fed as input); 6 beats 2.
    # User 2: 1 masked; target 2 (score 1) is rankable although it occurs in the history:
    # 3, 4, 5, 6 beat it.
    assert result["ranks"]["full"].tolist() == [1, 4]
    assert result["full"]["HR@1"] == 0.0 and result["full"]["HR@5"] == 1.0


def test_chunking_over_users_gives_identical_results(tmp_path):
    data = random_data(tmp_path / "d", 37, 80)
    scorer = DotScorer(data.num_users, data.num_items)
    results = [
        strip_timing(evaluate(scorer, data, "test", EvaluationConfig(num_negatives=20, batch_size=size), 6,
                              cache_candidates=False, return_ranks=False))
        for size in (1, 5, 1000)
    ]
    assert results[0] == results[1] == results[2]
    assert 0 < results[0]["full"]["NDCG@10"] < 1 and results[0]["sampled"]["num_users"] == 37


def test_max_users_subsamples_with_the_seed(tmp_path):
    data = random_data(tmp_path / "d", 50, 80)
    scorer = DotScorer(data.num_users, data.num_items)
    config = EvaluationConfig(num_negatives=20)
    a = evaluate(scorer, data, "valid", config, 6, max_users=10, return_ranks=True, cache_candidates=False)
    b = evaluate(scorer, data, "valid", config, 6, max_users=10, return_ranks=True, cache_candidates=False)
    full = evaluate(scorer, data, "valid", config, 6, return_ranks=True, cache_candidates=False)
    assert a["num_users"] == 10 and a["sampled"]["num_users"] == 10
    assert np.array_equal(a["users"], b["users"])
    position = np.searchsorted(full["users"], a["users"])
    assert np.array_equal(a["ranks"]["full"], full["ranks"]["full"][position])
    assert np.array_equal(a["ranks"]["sampled"], full["ranks"]["sampled"][position])


def test_scorer_runs_in_eval_mode_and_gets_its_mode_back(tmp_path):
    data = random_data(tmp_path / "d", 10, 30)
    scorer = DotScorer(data.num_users, data.num_items)
    scorer.train()
    evaluate(scorer, data, "valid", EvaluationConfig(num_negatives=5), 4, cache_candidates=False)
    assert scorer.seen_training and not any(scorer.seen_training)
    assert scorer.training


def test_scores_of_the_wrong_width_are_an_error(tmp_path):
    data = random_data(tmp_path / "d", 10, 30)
    with pytest.raises(DataError, match="30 items"):
        evaluate(TableScorer(np.zeros(21)), data, "test", EvaluationConfig(), 4, protocols=("full",))


# ------------------------------------------------------------------------------ tied orders


class LastItemScorer:
    """Scores an item by its closeness to the last input item: the order of the input matters."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def _last(self, item_seq):
        lengths = (item_seq != 0).sum(1).clamp(min=1)  # (B,)
        return item_seq.gather(1, (lengths - 1).view(-1, 1)).float()  # (B, 1)

    def full_sort_predict(self, user_ids, item_seq):
        items = torch.arange(self.num_items + 1, dtype=torch.float32).view(1, -1)
        return -(items - self._last(item_seq)).abs()  # (B, I+1)

    def predict_candidates(self, user_ids, item_seq, candidates):
        return -(candidates.float() - self._last(item_seq)).abs()


# User 1: events 1-4 in one second, then 5 (validation) and 6 (test) in later seconds.
# User 2: 7 and 8 in one second, 9 alone; its validation (10) and test (11) events share the
# second of 9, which must not let the targets move into or out of the history.
TIED_SEQUENCES = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]
TIED_STAMPS = [[10, 10, 10, 10, 20, 30], [5, 5, 6, 6, 6]]


def test_tied_orders_shuffle_only_tied_history_events(tmp_path):
    data = write_processed(tmp_path / "d", TIED_SEQUENCES, num_items=11, timestamps=TIED_STAMPS)
    users, positions = data.eval_examples("test")
    readings = tied_history_orders(data, users, positions, 40, seed=3)
    assert len(readings) == 40 and np.array_equal(readings[0], np.asarray(data.items))
    firsts = set()
    for reading in readings:
        assert sorted(reading[:4]) == [1, 2, 3, 4]  # user 1's tied group keeps its places ...
        assert reading[4:6].tolist() == [5, 6]  # ... and untied events theirs
        # User 2's test history [7, 8, 9, 10] has two tied pairs; its target 11 stays last.
        assert sorted(reading[6:8]) == [7, 8] and sorted(reading[8:10]) == [9, 10] and reading[10] == 11
        firsts.add(int(reading[0]))
    assert firsts == {1, 2, 3, 4}  # every order is drawn
    # Seeded: the same readings again; one reading is the file's only.
    again = tied_history_orders(data, users, positions, 40, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(readings, again))
    assert len(tied_history_orders(data, users, positions, 1, seed=3)) == 1


def test_tied_orders_never_move_the_target_or_later_events(tmp_path):
    # User 2's validation target (10) shares the second of 9, the last history event: the
    # history [7, 8, 9] has one tied group (7, 8), and 9, 10, 11 stay where they are.
    data = write_processed(tmp_path / "d", TIED_SEQUENCES, num_items=11, timestamps=TIED_STAMPS)
    users, positions = data.eval_examples("valid")
    for reading in tied_history_orders(data, users, positions, 20, seed=0):
        assert reading[8:].tolist() == [9, 10, 11]
        assert sorted(reading[:4]) == [1, 2, 3, 4] and reading[4:6].tolist() == [5, 6]


def test_evaluation_averages_scores_over_tied_orders(tmp_path):
    # User 1's tested history [1, 2, 3, 4] has no tie. User 2's, [6, 2, 8], ends in a tie
    # (2 and 8 in one second): read as the file has it, the last item is 8 and target 7 ranks
    # behind 9 only; read [6, 8, 2], it ranks behind 1, 3, 4 and 5.
    sequences = [[1, 2, 3, 4, 9], [6, 2, 8, 7]]
    stamps = [[1, 2, 3, 4, 5], [1, 2, 2, 3]]
    data = write_processed(tmp_path / "d", sequences, num_items=9, timestamps=stamps)
    scorer = LastItemScorer(data.num_items)
    config = EvaluationConfig(num_negatives=3, tied_orders=64)
    one = evaluate(scorer, data, "test", EvaluationConfig(num_negatives=3), 3, return_ranks=True)
    many = evaluate(scorer, data, "test", config, 3, return_ranks=True)
    assert one["tied_orders"] == 1 and many["tied_orders"] == 64
    assert one["ranks"]["full"].tolist() == [4, 1]  # user 1: 5, 6, 7, 8 are nearer 4 than 9
    assert many["ranks"]["full"][0] == 4  # no tie, no change
    # User 2's scores are the mean over the drawn readings: a share p ends in 8, the rest in 2.
    readings = tied_history_orders(data, *data.eval_examples("test"), 64, seed=config.seed)
    last = [int(r[7]) for r in readings]  # the flat position of user 2's third event
    assert set(last) == {2, 8}
    p = last.count(8) / len(last)
    items = np.arange(data.num_items + 1)
    expected = -(p * np.abs(items - 8) + (1 - p) * np.abs(items - 2))
    expected[[0, 6, 2, 8]] = -np.inf  # padding and the history are masked
    ahead = int((expected >= expected[7]).sum()) - 1  # ties count against the target
    assert many["ranks"]["full"][1] == ahead
    assert ahead != one["ranks"]["full"][1]


def test_evaluation_without_ties_ignores_tied_orders(tmp_path):
    data = random_data(tmp_path / "d", 30, 60)
    scorer = DotScorer(data.num_users, data.num_items)
    base = EvaluationConfig(num_negatives=20)
    one = strip_timing(evaluate(scorer, data, "test", base, 6, cache_candidates=False))
    many = strip_timing(evaluate(scorer, data, "test", EvaluationConfig(num_negatives=20, tied_orders=8), 6,
                                 cache_candidates=False))
    assert many.pop("tied_orders") == 1 and one.pop("tied_orders") == 1
    assert one == many


def test_deleted_histories_depend_on_the_history_alone():
    items = np.arange(1, 41)
    # One history of 12 events at two places of a flat array, beside others.
    first = deleted_histories(items, [0, 20], [12, 32], 0.3, seed=7, draw=3)
    second = deleted_histories(items, [5, 28], [9, 40], 0.3, seed=7, draw=3)
    kept_a = first[0][first[1][0] : first[2][0]]
    kept_b = second[0][second[1][1] : second[2][1]]
    assert kept_b.tolist() == (kept_a + 28).tolist()  # the same distances from the end kept
    assert np.all(np.diff(kept_a) > 0) and set(kept_a) <= set(range(1, 13))  # in order, a subset
    lengths = []
    for draw in range(200):
        flat, starts, ends = deleted_histories(items, [0, 39], [12, 40], 0.3, seed=7, draw=draw)
        lengths.append(ends[0] - starts[0])
        assert ends[1] - starts[1] == 1 and flat[starts[1]] == 40  # a history never empties
    assert 0.6 < np.mean(lengths) / 12 < 0.8  # about 1 - 0.3 of the events kept


def test_evaluation_averages_scores_over_deletion_readings(tmp_path):
    # User 2's tested history [6, 2, 8]: a reading ends in 8, in 2 (8 deleted) or in 6 (both).
    sequences = [[1, 2, 3, 4, 9], [6, 2, 8, 7]]
    data = write_processed(tmp_path / "d", sequences, num_items=9)
    scorer = LastItemScorer(data.num_items)
    config = EvaluationConfig(num_negatives=3, deletion_readings=64, deletion_prob=0.4)
    one = evaluate(scorer, data, "test", EvaluationConfig(num_negatives=3), 3, return_ranks=True)
    many = evaluate(scorer, data, "test", config, 3, return_ranks=True)
    assert one["ranks"]["full"].tolist() == [4, 1]
    users, positions = data.eval_examples("test")
    starts = np.asarray(data.offsets)[users]
    for row, user_items in enumerate([[1, 2, 3, 4], [6, 2, 8]]):
        lasts = [user_items[-1]]  # the reading as given, then the 64 with deletions
        for draw in range(64):
            flat, _, e = deleted_histories(data.items, starts, positions, 0.4, config.seed, draw)
            lasts.append(int(flat[e[row] - 1]))
        assert len(set(lasts)) > 1
        items = np.arange(data.num_items + 1)
        expected = -np.mean([np.abs(items - last) for last in lasts], axis=0)
        expected[[0] + user_items] = -np.inf
        target = sequences[row][len(user_items)]
        assert many["ranks"]["full"][row] == int((expected >= expected[target]).sum()) - 1


def test_evaluation_can_average_the_readings_probabilities(tmp_path):
    sequences = [[1, 2, 3, 4, 9], [6, 2, 8, 7]]
    data = write_processed(tmp_path / "d", sequences, num_items=9)
    scorer = LastItemScorer(data.num_items)
    config = EvaluationConfig(num_negatives=3, deletion_readings=64, deletion_prob=0.4, reading_average="probabilities")
    many = evaluate(scorer, data, "test", config, 3, return_ranks=True)
    users, positions = data.eval_examples("test")
    starts = np.asarray(data.offsets)[users]
    candidates, _ = get_candidates(data, "test", 3, "uniform", config.seed)
    items = np.arange(1, data.num_items + 1)
    for row, user_items in enumerate([[1, 2, 3, 4], [6, 2, 8]]):
        lasts = [user_items[-1]]
        for draw in range(64):
            flat, _, e = deleted_histories(data.items, starts, positions, 0.4, config.seed, draw)
            lasts.append(int(flat[e[row] - 1]))
        odds = [np.exp(-np.abs(items - last)) for last in lasts]
        expected = np.concatenate([[-np.inf], np.log(np.mean([o / o.sum() for o in odds], axis=0))])
        target = sequences[row][len(user_items)]
        # The sampled protocol ranks its candidates by the same mixture of all items' probabilities.
        drawn = candidates[row][candidates[row] > 0]
        assert many["ranks"]["sampled"][row] == int((expected[drawn] >= expected[target]).sum()) - 1
        expected[user_items] = -np.inf
        assert many["ranks"]["full"][row] == int((expected >= expected[target]).sum()) - 1


def test_item_readings_score_the_model_with_its_recent_items_read_alone_and_leave_it_as_it_was(tmp_path):
    """``evaluation.item_readings`` gives the model its item readings for the evaluation only
    (both protocols, every reading), and a baseline is scored as it is."""
    from llm_recommender.config import load_config
    from llm_recommender.models.stage_a_model import build_model

    data = random_data(tmp_path / "d", num_users=12, num_items=15)
    torch.manual_seed(0)
    config = load_config(None, ["model.random_init_stage_a_llm=true", "model.num_layers=1", "model.hidden_size=16",
                                "model.num_heads=2", "model.embedding_dim=8", "model.max_seq_len=6",
                                "model.use_user_token=false", "embeddings.init_std=0.3"])
    model = build_model(config, data.num_users, data.num_items).eval()
    readings = EvaluationConfig(num_negatives=5, item_readings=2, item_readings_weight=0.9, deletion_readings=3)
    mixed = evaluate(model, data, "test", readings, 6, return_ranks=True)
    assert (model.item_readings, model.item_readings_weight) == (0, 0.0)  # restored
    plain = evaluate(model, data, "test", EvaluationConfig(num_negatives=5, deletion_readings=3), 6, return_ranks=True)
    model.item_readings, model.item_readings_weight = 2, 0.9  # what the evaluation set, by hand:
    delegate = types.SimpleNamespace(full_sort_predict=model.full_sort_predict, predict_candidates=model.predict_candidates)
    by_hand = evaluate(delegate, data, "test", EvaluationConfig(num_negatives=5, deletion_readings=3), 6, return_ranks=True)
    for protocol in ("sampled", "full"):
        assert mixed["ranks"][protocol].tolist() == by_hand["ranks"][protocol].tolist()
    assert mixed["ranks"]["full"].tolist() != plain["ranks"]["full"].tolist()
    scorer = LastItemScorer(data.num_items)
    base = evaluate(scorer, data, "test", EvaluationConfig(num_negatives=5), 6, return_ranks=True)
    same = evaluate(scorer, data, "test", EvaluationConfig(num_negatives=5, item_readings=3), 6, return_ranks=True)
    assert base["ranks"]["full"].tolist() == same["ranks"]["full"].tolist()
    with pytest.raises(ConfigError, match="evaluation.item_readings"):
        EvaluationConfig(item_readings=-1)
    with pytest.raises(ConfigError, match="evaluation.item_readings_weight"):
        EvaluationConfig(item_readings_weight=0)


def test_tied_orders_must_be_positive():
    with pytest.raises(ConfigError, match="evaluation.tied_orders"):
        EvaluationConfig(tied_orders=0)
    with pytest.raises(ConfigError, match="evaluation.deletion_readings"):
        EvaluationConfig(deletion_readings=-1)
    with pytest.raises(ConfigError, match="evaluation.deletion_prob"):
        EvaluationConfig(deletion_prob=1.0)
    with pytest.raises(ConfigError, match="evaluation.reading_average"):
        EvaluationConfig(reading_average="logits")


# ------------------------------------------------------------------------------ the command


def test_command_with_a_baseline_writes_the_metrics_json(tmp_path, capsys):
    data = random_data(tmp_path / "d", 30, 50)
    out = tmp_path / "metrics.json"
    run_evaluation_command(data_dir=data.path, output_file=out, baseline="popularity",
                           overrides=["evaluation.num_negatives=10"], protocols="both")
    payload = json.loads(out.read_text())
    for key in ("sampled", "full", "checkpoint", "data_dir", "data_sha256", "split", "seed", "num_users",
                "negative_sampling", "package_version"):
        assert key in payload
    assert payload["split"] == "test" and payload["num_users"] == 30 and payload["data_sha256"] == "test-d"
    assert set(payload["sampled"]) >= {"HR@1", "HR@5", "HR@10", "HR@20", "NDCG@1", "NDCG@10", "MRR",
                                       "NDCG@10_ci95", "users_with_fewer_negatives", "users_per_second"}
    assert "NDCG@10" in capsys.readouterr().out
    with pytest.raises(Exception, match="--data_dir"):
        run_evaluation_command(baseline="popularity")


def test_command_with_a_checkpoint_applies_only_evaluation_overrides(tmp_path, monkeypatch):
    data = random_data(tmp_path / "d", 20, 40)
    scorer = DotScorer(data.num_users, data.num_items)
    calls = {}

    def load_checkpoint(path, device="cpu"):
        calls["path"] = path
        return scorer, Config(), {"data_dir": str(data.path), "num_items": data.num_items,
                                  "data_fingerprint": data.fingerprint}

    from llm_recommender.checkpoint import check_data

    monkeypatch.setitem(sys.modules, "llm_recommender.checkpoint",
                        types.SimpleNamespace(load_checkpoint=load_checkpoint, check_data=check_data))
    out = tmp_path / "m.json"
    payload = run_evaluation_command(checkpoint=tmp_path / "ckpt", output_file=out,
                                     overrides=["evaluation.seed=5", "evaluation.num_negatives=7"],
                                     split="valid", protocols="sampled")
    assert payload["seed"] == 5 and payload["sampled"]["num_negatives"] == 7 and payload["full"] is None
    assert payload["split"] == "valid" and payload["data_dir"] == str(data.path.resolve())
    with pytest.raises(ConfigError, match="only evaluation"):
        run_evaluation_command(checkpoint=tmp_path / "ckpt", overrides=["model.max_seq_len=3"])
