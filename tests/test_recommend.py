"""Top-K recommendation (serving/recommend.py): known users, cold histories, all users.

Unit tests use a tiny deterministic fake model (scores computed by hand); the end-to-end tests
use a real checkpoint trained for one epoch on a tiny dataset (``tiny_checkpoint``, shared with
tests/test_server.py and tests/test_export.py through imports of this module's helpers).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from llm_recommender.serving.recommend import Recommender, UnknownIdError
from processed_helpers import write_processed as write_indexed  # noqa: E402  (tests/ is on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ helpers


def write_processed(folder: Path, sequences: dict[str, list[str]]) -> Path:
    """A processed dataset from {user id: [item ids, oldest first]}; users and items are
    numbered by first appearance, splits are leave-one-out."""
    item_index: dict[str, int] = {}
    for items in sequences.values():
        for item in items:
            item_index.setdefault(item, len(item_index) + 1)
    indexed = [[item_index[i] for i in items] for items in sequences.values()]
    write_indexed(folder, indexed, len(item_index), user_ids=list(sequences), item_ids=list(item_index))
    return folder


def cyclic_sequences(num_users: int = 60, num_items: int = 30, seed: int = 0) -> dict[str, list[str]]:
    """Users walking a cycle of items (item i is followed by i+1): real sequential structure."""
    rng = np.random.default_rng(seed)
    sequences = {}
    for user in range(num_users):
        start = int(rng.integers(num_items))
        length = int(rng.integers(5, 12))
        sequences[f"u{user}"] = [f"i{(start + step) % num_items}" for step in range(length)]
    return sequences


class FakeModel(nn.Module):
    """``user_state`` = user row + the last item's row (so scores are checkable by hand)."""

    def __init__(self, num_users: int, num_items: int, dim: int = 8, max_seq_len: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embeddings = nn.Module()
        self.embeddings.user_embeddings = nn.Embedding(num_users + 1, dim)
        self.embeddings.item_embeddings = nn.Embedding(num_items + 1, dim, padding_idx=0)
        with torch.no_grad():
            self.embeddings.user_embeddings.weight.copy_(torch.randn(num_users + 1, dim, generator=generator))
            self.embeddings.item_embeddings.weight.copy_(torch.randn(num_items + 1, dim, generator=generator))
            self.embeddings.item_embeddings.weight[0].zero_()
        self.config = SimpleNamespace(model=SimpleNamespace(max_seq_len=max_seq_len))
        self.num_users, self.num_items, self.max_seq_len = num_users, num_items, max_seq_len
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def user_state(self, user_ids: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        self.calls.append((user_ids.clone(), item_seq.clone()))
        lengths = (item_seq != 0).sum(dim=1)  # (B,)
        last = item_seq[torch.arange(len(item_seq)), (lengths - 1).clamp_min(0)]  # (B,)
        return self.embeddings.user_embeddings(user_ids) + self.embeddings.item_embeddings(last)


def fake_recommender(tmp_path: Path, score_budget: int | None = None) -> tuple[Recommender, dict]:
    from llm_recommender.data.dataset import ProcessedData

    sequences = {
        "alice": ["a", "b", "c", "d", "e", "f"],
        "bob": ["c", "a"],
        "carol": ["g", "h", "i", "j", "a", "b", "c"],
    }
    data = ProcessedData(write_processed(tmp_path / "processed", sequences))
    model = FakeModel(data.num_users, data.num_items)
    kwargs = {} if score_budget is None else {"score_budget": score_budget}
    return Recommender(model, data, checkpoint="fake", **kwargs), sequences


def expected_top(rec: Recommender, user: int, history: list[int], k: int, exclude: bool) -> list[int]:
    """Top-K by hand: user row + last item row, dot every item, drop padding (and history)."""
    table = rec.model.embeddings.item_embeddings.weight.detach().numpy()
    state = rec.model.embeddings.user_embeddings.weight.detach().numpy()[user] + table[history[-1]]
    scores = table @ state
    scores[0] = -np.inf
    if exclude:
        scores[history] = -np.inf
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


# ------------------------------------------------------------------------------ unit tests


def test_known_user_top_k_matches_hand_computation_and_excludes_history(tmp_path):
    rec, sequences = fake_recommender(tmp_path)
    alice = rec.user_to_index("alice")
    history = [rec.item_to_index(i) for i in sequences["alice"]]
    items, scores = rec.recommend_users(np.array([alice]), k=3)
    assert items.shape == (1, 3)
    assert items[0].tolist() == expected_top(rec, alice, history, 3, exclude=True)
    assert not set(items[0].tolist()) & set(history)
    assert np.all(np.diff(scores[0]) <= 0)
    # The model saw the last max_seq_len (4) items: c d e f.
    _, item_seq = rec.model.calls[-1]
    assert item_seq[0].tolist() == history[-4:]


def mean_state_scores(model, user: int, lasts: list[int], seen: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """FakeModel's query vector averaged over readings that end in ``lasts``, and its scores
    of every item with padding and ``seen`` at -inf: (state (d,), scores (I+1,))."""
    table = model.embeddings.item_embeddings.weight.detach().numpy()
    state = model.embeddings.user_embeddings.weight.detach().numpy()[user] + table[lasts].mean(axis=0)
    expected = table @ state
    expected[[0] + list(seen)] = -np.inf
    return state, expected


def test_known_user_scores_are_averaged_over_orders_of_tied_events(tmp_path):
    # Alice's last two events share a second: the model's last item is 5 or 6 by the order.
    from llm_recommender.evaluation.evaluator import tied_readings

    sequences = [[1, 2, 3, 4, 5, 6], [3, 1], [7, 8, 9, 10, 1, 2, 3]]
    stamps = [[1, 2, 3, 4, 9, 9], [1, 2], [1, 2, 3, 4, 5, 6, 7]]
    data = write_indexed(tmp_path / "d", sequences, 10, timestamps=stamps)
    model = FakeModel(data.num_users, data.num_items)
    plain = Recommender(model, data)
    rec = Recommender(model, data, tied_orders=16, tied_seed=5)
    lasts = [int(r[5]) for r in tied_readings(np.arange(1, 7), np.array(stamps[0]), [0], [6], 16, 5)]
    assert set(lasts) == {5, 6}  # both orders drawn; the file's first
    state, expected = mean_state_scores(model, 1, lasts, range(1, 7))
    items, scores = rec.recommend_users(np.array([1, 2, 3]), k=3)
    assert items[0].tolist() == [int(i) for i in np.argsort(-expected, kind="stable")[:3]]
    np.testing.assert_allclose(scores[0], np.sort(expected)[::-1][:3], rtol=1e-5)
    # Users without ties: exactly the plain scores; the query vectors score the same.
    plain_items, plain_scores = plain.recommend_users(np.array([2, 3]), k=3)
    assert np.array_equal(items[1:], plain_items) and np.allclose(scores[1:], plain_scores)
    states = rec.user_states(np.array([1]))
    np.testing.assert_allclose(states[0], state, rtol=1e-5, atol=1e-6)
    # A cold history carries no timestamps: read as given.
    cold, _ = rec.recommend_history(np.array([1, 2, 3, 4, 5, 6]), k=3)
    assert cold.tolist() == plain.recommend_history(np.array([1, 2, 3, 4, 5, 6]), k=3)[0].tolist()


def test_known_and_cold_scores_are_averaged_over_deletion_readings(tmp_path):
    from llm_recommender.evaluation.evaluator import deleted_histories

    sequences = [[1, 2, 3, 4, 5, 6], [3, 1], [7, 8, 9, 10, 1, 2, 3]]
    data = write_indexed(tmp_path / "d", sequences, 10)
    model = FakeModel(data.num_users, data.num_items)
    rec = Recommender(model, data, tied_seed=5, deletion_readings=16, deletion_prob=0.3)
    history = np.arange(1, 7)
    lasts = [6] + [int(deleted_histories(history, [0], [6], 0.3, 5, d)[0][-1]) for d in range(16)]
    assert len(set(lasts)) > 1
    state, expected = mean_state_scores(model, 1, lasts, history)
    items, scores = rec.recommend_users(np.array([1, 2, 3]), k=3)
    assert items[0].tolist() == [int(i) for i in np.argsort(-expected, kind="stable")[:3]]
    np.testing.assert_allclose(scores[0], np.sort(expected)[::-1][:3], rtol=1e-5)
    np.testing.assert_allclose(rec.user_states(np.array([1]))[0], state, rtol=1e-5, atol=1e-6)
    # A cold history is read with the same deletions (they need no timestamps).
    _, cold_expected = mean_state_scores(model, 0, lasts, history)  # row 0: the unknown user
    cold, _ = rec.recommend_history(history, k=3)
    assert cold.tolist() == [int(i) for i in np.argsort(-cold_expected, kind="stable")[:3]]


def test_served_scores_can_average_the_readings_probabilities(tmp_path):
    from llm_recommender.errors import ConfigError
    from llm_recommender.evaluation.evaluator import deleted_histories

    data = write_indexed(tmp_path / "d", [[1, 2, 3, 4, 5, 6], [3, 1]], 10)
    model = FakeModel(data.num_users, data.num_items)
    rec = Recommender(model, data, tied_seed=5, deletion_readings=16, deletion_prob=0.3,
                      reading_average="probabilities")
    history = np.arange(1, 7)
    lasts = [6] + [int(deleted_histories(history, [0], [6], 0.3, 5, d)[0][-1]) for d in range(16)]
    rows = [mean_state_scores(model, 1, [last], [])[1][1:] for last in lasts]  # each reading's item scores
    probabilities = np.mean([np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in rows], axis=0)
    expected = np.concatenate([[-np.inf], np.log(probabilities)])
    expected[[1, 2, 3, 4, 5, 6]] = -np.inf
    items, scores = rec.recommend_users(np.array([1]), k=3)
    assert items[0].tolist() == [int(i) for i in np.argsort(-expected, kind="stable")[:3]]
    np.testing.assert_allclose(scores[0], np.sort(expected)[::-1][:3], rtol=1e-4)
    with pytest.raises(ConfigError, match="evaluation.reading_average"):
        rec.user_states(np.array([1]))  # no query vector gives a mixture's scores


def test_keep_seen_includes_history_items(tmp_path):
    rec, sequences = fake_recommender(tmp_path)
    carol = rec.user_to_index("carol")
    history = [rec.item_to_index(i) for i in sequences["carol"]]
    items, _ = rec.recommend_users(np.array([carol]), k=10, exclude_seen=False)
    assert items[0].tolist() == expected_top(rec, carol, history, 10, exclude=False)
    assert 0 not in items[0].tolist()  # padding is never recommended


def test_batch_with_different_lengths_equals_one_by_one(tmp_path):
    rec, _ = fake_recommender(tmp_path)
    users = np.array([1, 2, 3])
    together, together_scores = rec.recommend_users(users, k=4)
    for row, user in enumerate(users):
        alone, alone_scores = rec.recommend_users(np.array([user]), k=4)
        assert together[row].tolist() == alone[0].tolist()
        np.testing.assert_allclose(together_scores[row], alone_scores[0], rtol=1e-6)
    # Right padding: bob (2 items) is padded with zeros after his items.
    user_ids, item_seq = rec.model.calls[0]
    bob = user_ids.tolist().index(rec.user_to_index("bob"))
    assert item_seq[bob].tolist() == [rec.item_to_index("c"), rec.item_to_index("a"), 0, 0]


def test_length_groups_are_trimmed_and_states_come_back_in_order(tmp_path, monkeypatch):
    import llm_recommender.serving.recommend as recommend

    rec, _ = fake_recommender(tmp_path)
    expected, expected_scores = rec.recommend_users(np.array([3, 1, 2]), k=5)
    monkeypatch.setattr(recommend, "STATE_GROUP_ROWS", 1)
    rec.model.calls.clear()
    got, got_scores = rec.recommend_users(np.array([3, 1, 2]), k=5)
    assert got.tolist() == expected.tolist()
    np.testing.assert_allclose(got_scores, expected_scores, rtol=1e-6)
    # Shortest history first, each pass only as wide as its own history.
    assert [tuple(seq.shape) for _, seq in rec.model.calls] == [(1, 2), (1, 4), (1, 4)]


def test_chunking_by_score_budget_gives_the_same_answer(tmp_path):
    rec, _ = fake_recommender(tmp_path)
    small, _ = fake_recommender(tmp_path / "small", score_budget=1)  # one user per chunk
    assert small.users_per_chunk() == 1
    expected, _ = rec.recommend_users(np.array([1, 2, 3]), k=5)
    got, _ = small.recommend_users(np.array([1, 2, 3]), k=5)
    assert got.tolist() == expected.tolist()
    assert len(small.model.calls) == 3


def test_cold_history_uses_unknown_user_row_and_excludes_history(tmp_path):
    rec, _ = fake_recommender(tmp_path)
    history = [rec.item_to_index(i) for i in ["g", "h"]]
    items, scores = rec.recommend_history(np.array(history), k=5)
    assert items.tolist() == expected_top(rec, 0, history, 5, exclude=True)
    user_ids, _ = rec.model.calls[-1]
    assert user_ids.tolist() == [0]


def test_k_larger_than_candidates_pads_with_item_zero(tmp_path):
    rec, sequences = fake_recommender(tmp_path)
    carol = rec.user_to_index("carol")  # 7 distinct items of 10 seen: 3 candidates left
    items, scores = rec.recommend_users(np.array([carol]), k=50)
    assert items.shape == (1, 10)  # clamped to the catalogue
    assert (items[0] != 0).sum() == 3
    assert np.isneginf(scores[0][3:]).all()
    assert len(rec.items_to_ids(items[0], scores[0])) == 3


def test_unknown_ids_and_history_mapping(tmp_path):
    rec, _ = fake_recommender(tmp_path)
    with pytest.raises(UnknownIdError, match="unknown user_id 'nobody'"):
        rec.user_to_index("nobody")
    with pytest.raises(UnknownIdError, match="unknown item_id 'zzz'"):
        rec.item_to_index("zzz")
    indices, ignored = rec.history_to_indices(["a", "zzz", "b"], unknown="ignore")
    assert indices.tolist() == [rec.item_to_index("a"), rec.item_to_index("b")] and ignored == ["zzz"]
    with pytest.raises(UnknownIdError, match="'zzz' in history"):
        rec.history_to_indices(["a", "zzz"], unknown="error")


def test_similar_items_is_cosine_excluding_itself(tmp_path):
    rec, _ = fake_recommender(tmp_path)
    table = rec.model.embeddings.item_embeddings.weight.detach().numpy()
    normed = table[1:] / np.linalg.norm(table[1:], axis=1, keepdims=True)
    cosine = normed @ normed[2]  # item 3 (row 2)
    cosine[2] = -np.inf
    expected = (np.argsort(-cosine, kind="stable")[:4] + 1).tolist()
    items, scores = rec.similar_items(3, k=4)
    assert items.tolist() == expected
    np.testing.assert_allclose(scores, np.sort(cosine)[::-1][:4], rtol=1e-5)


def test_recommend_all_parquet_and_jsonl_match_recommend_users(tmp_path):
    import pyarrow.parquet as pq

    rec, _ = fake_recommender(tmp_path, score_budget=11)  # one user (11 items) per chunk
    expected, expected_scores = rec.recommend_users(np.arange(1, 4), k=3)
    summary = rec.recommend_all(tmp_path / "out.parquet", k=3, batch_size=2)
    assert summary["users"] == 3 and summary["rows"] == 9
    parquet = pq.ParquetFile(tmp_path / "out.parquet")
    assert parquet.metadata.num_row_groups == 3  # streamed: one row group per chunk
    table = parquet.read().to_pylist()
    assert [row["user_id"] for row in table] == ["alice"] * 3 + ["bob"] * 3 + ["carol"] * 3
    assert [row["rank"] for row in table[:3]] == [1, 2, 3]
    assert [row["item_id"] for row in table] == [rec.item_ids[i - 1] for i in expected.ravel()]
    np.testing.assert_allclose([row["score"] for row in table], expected_scores.ravel(), rtol=1e-6)

    rec.recommend_all(tmp_path / "out.jsonl", k=3)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["user_id"] for line in lines] == ["alice", "bob", "carol"]
    assert [item["item_id"] for item in lines[1]["items"]] == [rec.item_ids[i - 1] for i in expected[1]]
    assert not list(tmp_path.glob(".out.*"))  # no temporaries left


def test_recommend_all_rejects_unknown_format_and_leaves_no_file(tmp_path):
    from llm_recommender.errors import LLMRecError

    rec, _ = fake_recommender(tmp_path)
    with pytest.raises(LLMRecError, match=r"must end in \.parquet or \.jsonl"):
        rec.recommend_all(tmp_path / "out.csv", k=3)
    assert not (tmp_path / "out.csv").exists()


def test_model_data_size_mismatch_is_a_clear_error(tmp_path):
    from llm_recommender.data.dataset import ProcessedData
    from llm_recommender.errors import DataError

    data = ProcessedData(write_processed(tmp_path / "p", {"u": ["a", "b", "c"]}))
    with pytest.raises(DataError, match="the model has 5 / 9"):
        Recommender(FakeModel(5, 9), data)


# ------------------------------------------------------------------------------ real checkpoint


TINY_OVERRIDES = [
    "model.random_init_stage_a_llm=true",
    "model.base_llm=gpt2",
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.embedding_dim=16",
    "model.max_seq_len=8",
    "model.unknown_user_prob=0.1",
    "stage_a.epochs=1",
    "stage_a.batch_size=32",
    "stage_a.eval_protocol=sampled",
    "evaluation.num_negatives=10",
    "runtime.device=cpu",
    "runtime.num_threads=1",
]


def build_tiny_checkpoint(base: Path, overrides: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A processed dataset and a 1-epoch tiny GPT-2 checkpoint under ``base`` (cached there),
    with ``overrides`` on top of ``TINY_OVERRIDES``.

    Returns:
        (checkpoint folder ``best_model``, processed data folder)
    """
    data_dir = base / "processed"
    checkpoint = base / "run" / "best_model"
    if (checkpoint / "checkpoint.json").is_file():
        return checkpoint, data_dir
    pytest.importorskip("llm_recommender.models.stage_a_model")
    from llm_recommender.config import load_config
    from llm_recommender.trainers.stage_a_trainer import train_stage_a

    write_processed(data_dir, cyclic_sequences())
    config = load_config(None, [*TINY_OVERRIDES, *overrides])
    train_stage_a(config, data_dir, base / "run")
    assert (checkpoint / "checkpoint.json").is_file()
    return checkpoint, data_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.getbasetemp() / "tiny_serving_checkpoint"
    return build_tiny_checkpoint(base)


def test_real_checkpoint_matches_full_sort_predict(tiny_checkpoint):
    checkpoint, data_dir = tiny_checkpoint
    rec = Recommender.from_checkpoint(checkpoint)
    assert str(rec.data.path) == str(data_dir.resolve())
    users = np.arange(1, rec.num_users + 1)
    items, scores = rec.recommend_users(users, k=5)
    # The same ranking as the model's own full_sort_predict with history items masked.
    for user in users[:10]:
        history = rec.history_of(int(user))
        seq = torch.from_numpy(history[-rec.max_seq_len :])[None, :]
        reference = rec.model.full_sort_predict(torch.tensor([int(user)]), seq)[0]
        reference[torch.from_numpy(history)] = float("-inf")
        top = torch.topk(reference, 5)
        assert items[user - 1].tolist() == top.indices.tolist()
        np.testing.assert_allclose(scores[user - 1], top.values.numpy(), rtol=1e-5, atol=1e-6)
        assert not set(items[user - 1].tolist()) & set(history.tolist())


def test_served_scores_and_query_vectors_mix_in_the_item_readings(tmp_path_factory):
    """A checkpoint whose evaluation has ``item_readings`` is served as it was evaluated: the
    recommendations and the exported query vectors are the model's with its last items read
    alone mixed in."""
    checkpoint, _ = build_tiny_checkpoint(
        tmp_path_factory.getbasetemp() / "tiny_item_readings_checkpoint",
        ("evaluation.item_readings=2", "evaluation.item_readings_weight=0.5"),
    )
    rec = Recommender.from_checkpoint(checkpoint)
    assert (rec.model.item_readings, rec.model.item_readings_weight) == (2, 0.5)
    users = np.arange(1, 11)
    items, scores = rec.recommend_users(users, k=5)
    states = rec.user_states(users)
    for user in users:
        history = rec.history_of(int(user))
        seq = torch.from_numpy(history[-rec.max_seq_len :])[None, :]
        with torch.inference_mode():
            state = rec.model.user_state(torch.tensor([int(user)]), seq)[0]
            rec.model.item_readings = 0
            plain = rec.model.user_state(torch.tensor([int(user)]), seq)[0]
            rec.model.item_readings = 2
            last_two = [rec.model.user_state(torch.tensor([int(user)]), torch.tensor([[i]]))[0] for i in history[-2:]]
        assert torch.allclose(state, 0.5 * plain + 0.25 * (last_two[0] + last_two[1]), atol=1e-5)
        np.testing.assert_allclose(states[user - 1], state.numpy(), rtol=1e-4, atol=1e-5)
        reference = (state @ rec.item_table.T).clone()
        reference[0] = float("-inf")
        reference[torch.from_numpy(history)] = float("-inf")
        assert items[user - 1].tolist() == torch.topk(reference, 5).indices.tolist()


def test_length_grouped_states_equal_one_padded_forward(tiny_checkpoint, monkeypatch):
    import llm_recommender.serving.recommend as recommend

    rec = Recommender.from_checkpoint(tiny_checkpoint[0])
    users = np.arange(1, rec.num_users + 1)
    monkeypatch.setattr(recommend, "STATE_GROUP_ROWS", 7)
    grouped = rec.user_states(users)
    # Reference: one batch right-padded to the longest history, straight through the model.
    histories = [rec.history_of(int(u))[-rec.max_seq_len :] for u in users]
    padded = np.zeros((len(users), max(len(h) for h in histories)), dtype=np.int64)
    for row, history in enumerate(histories):
        padded[row, : len(history)] = history
    with torch.inference_mode():
        reference = rec.model.user_state(torch.from_numpy(users), torch.from_numpy(padded)).numpy()
    np.testing.assert_allclose(grouped, reference, rtol=1e-4, atol=1e-5)


def test_missing_data_folder_says_pass_data_dir(tiny_checkpoint, tmp_path):
    import shutil

    from llm_recommender.errors import DataError

    checkpoint, _ = tiny_checkpoint
    moved = tmp_path / "best_model"
    shutil.copytree(checkpoint, moved)
    info = json.loads((moved / "checkpoint.json").read_text())
    info["data_dir"] = str(tmp_path / "gone")
    # checkpoint.json is not in its own file list, so editing it keeps the hashes valid.
    (moved / "checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="pass --data_dir"):
        Recommender.from_checkpoint(moved)


def _llmrec(capsys, *args: str) -> SimpleNamespace:
    """Run ``llmrec ARGS`` in this process (a subprocess costs ~7 s of imports each)."""
    from llm_recommender.cli import main

    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        code = main(list(args))
    finally:
        torch.set_num_threads(threads)  # the command applies runtime.num_threads
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def test_cli_recommend_user_history_and_all_users(tiny_checkpoint, tmp_path, capsys):
    checkpoint, data_dir = tiny_checkpoint
    rec = Recommender.from_checkpoint(checkpoint)
    expected, _ = rec.recommend_users(np.array([1]), k=4)
    done = _llmrec(capsys, "recommend", "--checkpoint", str(checkpoint), "--user", "u0", "--k", "4")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert [item["item_id"] for item in answer["items"]] == [rec.item_ids[i - 1] for i in expected[0]]

    done = _llmrec(capsys, "recommend", "--checkpoint", str(checkpoint), "--history", "i3,i4,nope", "--k", "3")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ignored_items"] == ["nope"] and len(answer["items"]) == 3
    assert {"i3", "i4"}.isdisjoint(item["item_id"] for item in answer["items"])
    assert "ignored 1 unknown item id" in done.stderr

    out = tmp_path / "all.parquet"
    done = _llmrec(capsys, "recommend", "--checkpoint", str(checkpoint), "--all-users", "--output", str(out), "--k", "2")
    assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 2 * rec.num_users

    done = _llmrec(capsys, "recommend", "--checkpoint", str(checkpoint), "--user", "nobody")
    assert done.returncode == 2 and done.stderr.strip() == "error: unknown user_id 'nobody'"
    done = _llmrec(capsys, "recommend", "--checkpoint", str(checkpoint), "--all-users")
    assert done.returncode == 2 and "needs --output" in done.stderr
    done = _llmrec(capsys, "recommend", "--checkpoint", str(checkpoint), "--user", "u0", "--set", "model.num_layers=3")
    assert done.returncode == 2 and "only serving.* and runtime.*" in done.stderr
