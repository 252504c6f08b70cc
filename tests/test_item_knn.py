"""Item co-occurrence neighbours (models/item_knn.py), their fusion into the model's scores,
the itemknn baseline, and the staged run (validated model, refit on validation events,
final model) of ``stage_a.refit_on_valid`` / ``model.item_knn.enabled``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from processed_helpers import write_processed
from test_trainer import _config, tiny_data  # noqa: F401  (the session fixture)

from llm_recommender.checkpoint import load_checkpoint
from llm_recommender.config import ItemKNNConfig, load_config
from llm_recommender.data.dataset import ProcessedData
from llm_recommender.errors import CheckpointError, ConfigError, DataError
from llm_recommender.evaluation.baselines import ItemKNNBaseline, PopularityBaseline, get_baseline
from llm_recommender.evaluation.evaluator import evaluate, run_evaluation_command
from llm_recommender.models.item_knn import ItemCooccurrence, history_tail
from llm_recommender.models.stage_a_model import StageAModel
from llm_recommender.serving.recommend import Recommender
from llm_recommender.trainers.stage_a_trainer import train_stage_a

# Users' sequences (leave-one-out: the last two events are validation and test).
SEQUENCES = [
    [1, 2, 3, 4, 5],  # train 1 2 3, valid 4, test 5
    [2, 3, 1, 6, 7],  # train 2 3 1, valid 6, test 7
    [1, 2, 3, 4, 8],  # train 1 2 3, valid 4, test 8
]


def _cosine_value(count: int, n_a: int, n_b: int, scale: float = 10.0) -> float:
    return math.log1p(scale * count / math.sqrt((n_a + 1) * (n_b + 1)))


def test_history_tail_reads_left_and_right_padding():
    right = torch.tensor([[5, 6, 7, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 5, 6, 7], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    expected = torch.tensor([[7, 6], [1, 0], [0, 0]])
    assert torch.equal(history_tail(right, 2), expected)
    assert torch.equal(history_tail(left, 2), expected)


def test_cooccurrence_counts_by_hand(tmp_path):
    data = write_processed(tmp_path / "d", SEQUENCES, num_items=8)
    table = ItemCooccurrence.from_data(data, include_valid=False, window=1, history=1, decay=1.0)
    # Training events: 1 2 3 | 2 3 1 | 1 2 3; adjacent pairs either order: {2,3} x3, {1,2} x2,
    # {1,3} x1. Every item occurs 3 times in training.
    got = {(int(k) // 9, int(k) % 9): float(v) for k, v in zip(table.keys, table.values)}
    assert set(got) == {(1, 2), (2, 1), (2, 3), (3, 2), (1, 3), (3, 1)}
    assert got[(2, 3)] == pytest.approx(_cosine_value(3, 3, 3), rel=1e-6)
    assert got[(1, 2)] == pytest.approx(_cosine_value(2, 3, 3), rel=1e-6)
    assert got[(3, 1)] == pytest.approx(_cosine_value(1, 3, 3), rel=1e-6)
    # Validation events join only with include_valid: 3->4 (twice), 1->6.
    with_valid = ItemCooccurrence.from_data(data, include_valid=True, window=1, history=1, decay=1.0)
    pairs = {(int(k) // 9, int(k) % 9) for k in with_valid.keys}
    assert {(3, 4), (4, 3), (1, 6), (6, 1)} <= pairs
    assert not any(8 in pair or 5 in pair or 7 in pair for pair in pairs)  # test events never
    assert with_valid.counts_validation_events and not table.counts_validation_events
    # Forward only: a history item votes for the items that came after it, never before.
    forward = ItemCooccurrence.from_data(data, include_valid=False, window=1, history=1, decay=1.0,
                                         direction="forward")
    forward_got = {(int(k) // 9, int(k) % 9): float(v) for k, v in zip(forward.keys, forward.values)}
    assert set(forward_got) == {(1, 2), (2, 3), (3, 1)} and forward.info["direction"] == "forward"
    assert forward_got[(2, 3)] == pytest.approx(_cosine_value(3, 3, 3), rel=1e-6)
    assert forward_got[(1, 2)] == pytest.approx(_cosine_value(2, 3, 3), rel=1e-6)
    # A wider window reaches two events apart: 1 and 3 also co-occur in both 1 2 3.
    wide = ItemCooccurrence.from_data(data, include_valid=False, window=2, history=1, decay=1.0)
    wide_got = {(int(k) // 9, int(k) % 9): float(v) for k, v in zip(wide.keys, wide.values)}
    assert wide_got[(1, 3)] == pytest.approx(_cosine_value(3, 3, 3), rel=1e-6)


def test_candidate_scores_equal_full_scores_and_history_decay(tmp_path):
    rng = np.random.default_rng(0)
    sequences = [list(rng.choice(np.arange(1, 41), size=rng.integers(5, 12), replace=False)) for _ in range(60)]
    data = write_processed(tmp_path / "d", sequences, num_items=40)
    table = ItemCooccurrence.from_data(data, include_valid=True, window=3, history=4, decay=0.5)
    seq = torch.tensor([[3, 7, 9, 11, 0, 0], [0, 0, 0, 0, 5, 2], [8, 0, 0, 0, 0, 0]])
    full = table.full_scores(seq)  # (3, 41)
    candidates = torch.arange(1, 41).repeat(3, 1)
    assert torch.allclose(table.candidate_scores(seq, candidates), full[:, 1:], atol=1e-6)
    # Row 0 by hand: decay**k times the similarity of the k-th most recent item.
    sim = {(int(k) // 41, int(k) % 41): float(v) for k, v in zip(table.keys, table.values)}
    for item in range(1, 41):
        expected = sum(0.5**k * sim.get((src, item), 0.0) for k, src in enumerate([11, 9, 7, 3]))
        assert full[0, item].item() == pytest.approx(expected, abs=1e-6)


def test_max_neighbors_keeps_the_most_similar_and_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    sequences = [list(rng.choice(np.arange(1, 31), size=8, replace=False)) for _ in range(50)]
    data = write_processed(tmp_path / "d", sequences, num_items=30)
    whole = ItemCooccurrence.from_data(data, include_valid=False)
    capped = ItemCooccurrence.from_data(data, include_valid=False, max_neighbors=3)
    sources = capped.keys // 31
    assert np.bincount(sources.numpy()).max() <= 3
    for src in range(1, 31):
        row = whole.values[(whole.keys // 31) == src]
        kept = capped.values[sources == src]
        assert torch.allclose(kept.sort(descending=True).values, row.sort(descending=True).values[: len(kept)])
    capped.save(tmp_path / "t.safetensors")
    back = ItemCooccurrence.load(tmp_path / "t.safetensors")
    assert torch.equal(back.keys, capped.keys) and torch.equal(back.values, capped.values)
    assert (back.history, back.decay, back.info) == (capped.history, capped.decay, capped.info)


def test_fusion_adds_weighted_neighbours_to_the_model_scores(tmp_path):
    data = write_processed(tmp_path / "d", SEQUENCES, num_items=8)
    config = _config("model.use_user_token=false")
    model = StageAModel(config, data.num_users, data.num_items).eval()
    users, seq = torch.tensor([1, 2]), torch.tensor([[1, 2, 3, 0], [3, 1, 0, 0]])
    alone = model.full_sort_predict(users, seq)
    table = ItemCooccurrence.from_data(data, include_valid=False)
    model.attach_item_knn(table, 2.5)
    fused = model.full_sort_predict(users, seq)
    assert torch.allclose(fused[:, 1:], alone[:, 1:] + 2.5 * table.full_scores(seq)[:, 1:], atol=1e-5)
    candidates = torch.tensor([[4, 5, 0], [6, 2, 8]])
    got = model.predict_candidates(users, seq, candidates)
    assert torch.allclose(got[0, :2], fused[0, [4, 5]], atol=1e-5) and got[0, 2] == float("-inf")
    assert torch.allclose(got[1], fused[1, [6, 2, 8]], atol=1e-5)


def test_itemknn_baseline_beats_popularity_and_is_refused_on_valid_with_valid_counts(tiny_data):  # noqa: F811
    data = ProcessedData(tiny_data)
    config = load_config(None, [])
    knn = evaluate(ItemKNNBaseline(data, include_valid=True), data, "test", config.evaluation, 50)
    popular = evaluate(PopularityBaseline(data, include_valid=True), data, "test", config.evaluation, 50)
    assert knn["sampled"]["NDCG@10"] > popular["sampled"]["NDCG@10"] + 0.05
    assert knn["full"]["NDCG@10"] > popular["full"]["NDCG@10"]
    with pytest.raises(ConfigError, match="counts validation events"):
        get_baseline("itemknn_with_valid", data, split="valid")
    assert isinstance(get_baseline("itemknn", data, split="valid", settings=ItemKNNConfig(window=2)), ItemKNNBaseline)


def test_refit_view_trains_on_validation_events(tmp_path):
    write_processed(tmp_path / "d", SEQUENCES, num_items=8)
    plain, refit = ProcessedData(tmp_path / "d"), ProcessedData(tmp_path / "d", train_through="valid")
    assert list(refit.train_sequence(1)) == [1, 2, 3, 4] and list(plain.train_sequence(1)) == [1, 2, 3]
    assert refit.item_popularity()[4] == 2 and plain.item_popularity()[4] == 0
    assert len(refit.eval_examples("test")[0]) == 3
    with pytest.raises(DataError, match="training events in this view"):
        refit.eval_examples("valid")


def test_staged_run_validates_refits_and_fuses(tiny_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    config = _config("stage_a.epochs=3", "model.item_knn.enabled=true", "stage_a.refit_on_valid=true",
                     "model.item_knn.weight_grid=[0, 1, 4]")
    summary = train_stage_a(config, tiny_data, run)
    validated = json.loads((run / "validated_model" / "checkpoint.json").read_text())
    final = json.loads((run / "best_model" / "checkpoint.json").read_text())
    assert validated["trained_on"] == "train" and validated["item_knn"]["events"] == "train"
    grid = validated["item_knn_valid_ndcg10"]
    assert set(grid) == {"0", "1", "4"}
    assert validated["item_knn"]["weight"] == float(max(grid, key=lambda w: (grid[w], -float(w))))
    assert final["trained_on"] == "train+valid" and final["item_knn"]["events"] == "train+valid"
    assert final["item_knn"]["weight"] == validated["item_knn"]["weight"]
    assert final["epoch"] == validated["best_epoch"] == summary["best_epoch"]  # the refit's length
    assert "item_knn.safetensors" in final["files"]

    assert validated["item_knn"]["direction"] == final["item_knn"]["direction"] == "both"

    data = ProcessedData(tiny_data)
    model, saved, _ = load_checkpoint(run / "best_model")
    assert model.item_knn is not None and model.item_knn.counts_validation_events
    test = evaluate(model, data, "test", saved.evaluation, saved.model.max_seq_len)
    assert test["sampled"]["NDCG@10"] > 0.2
    with pytest.raises(DataError, match="counts the validation events"):
        evaluate(model, data, "valid", saved.evaluation, saved.model.max_seq_len)
    # The command: a refit is refused on validation even without its table; --without-item-knn
    # scores the network alone.
    with pytest.raises(DataError, match="a refit trained on the validation events"):
        run_evaluation_command(checkpoint=run / "best_model", split="valid", item_knn=False)
    alone = run_evaluation_command(checkpoint=run / "best_model", split="test", protocols="sampled", item_knn=False)
    fused = run_evaluation_command(checkpoint=run / "best_model", split="test", protocols="sampled")
    assert alone["item_knn"] is None and fused["item_knn"]["weight"] == final["item_knn"]["weight"]
    assert fused["sampled"]["NDCG@10"] == pytest.approx(test["sampled"]["NDCG@10"], abs=1e-9)
    # The validated model is evaluable on validation and gives what checkpoint.json recorded.
    selected, _, _ = load_checkpoint(run / "validated_model")
    valid = evaluate(selected, data, "valid", saved.evaluation, saved.model.max_seq_len, protocols=("sampled",))
    assert valid["sampled"]["NDCG@10"] == pytest.approx(validated["metrics"]["NDCG@10_fused"], abs=1e-9)

    # Serving ranks with the fused scores: top-5 of a known user = top-5 of full_sort_predict.
    recommender = Recommender.from_checkpoint(run / "best_model", tiny_data)
    items, _ = recommender.recommend_users(np.array([5]), k=5)
    history = torch.from_numpy(data.sequence(5)[-saved.model.max_seq_len :].astype(np.int64))[None]
    scores = model.full_sort_predict(torch.tensor([5]), history)
    scores[0, history[0]] = float("-inf")
    assert list(items[0]) == scores[0].topk(5).indices.tolist()

    # --resume after a kill in the refit: the validated stage is not run again.
    import shutil

    shutil.rmtree(run / "best_model")
    shutil.rmtree(run / "refit")
    again = train_stage_a(config, tiny_data, run, resume=True)
    refit_model, _, _ = load_checkpoint(run / "best_model")
    assert again["validated_model"] == str(run / "validated_model")
    user = torch.tensor([5])
    assert torch.equal(refit_model.full_sort_predict(user, history), model.full_sort_predict(user, history))

    # The hand-offs between stages verify hashes like every other load: a validated model
    # altered on disk is refused when the next stage reads it.
    shutil.rmtree(run / "best_model")
    table = run / "validated_model" / "item_knn.safetensors"
    table.write_bytes(table.read_bytes()[:-8] + bytes(8))
    with pytest.raises(CheckpointError, match="altered or truncated"):
        train_stage_a(config, tiny_data, run, resume=True)


@pytest.mark.slow
def test_auto_direction_keeps_what_validation_prefers(tiny_data, tmp_path):  # noqa: F811
    """model.item_knn.direction=auto: both tables at every weight on validation; the best
    (direction, weight) is fused, recorded, and rebuilt over training + validation events."""
    run = tmp_path / "auto"
    config = _config("stage_a.epochs=2", "model.item_knn.enabled=true", "stage_a.refit_on_valid=true",
                     "model.item_knn.weight_grid=[0, 1, 4]", "model.item_knn.direction=auto")
    train_stage_a(config, tiny_data, run)
    validated = json.loads((run / "validated_model" / "checkpoint.json").read_text())
    final = json.loads((run / "best_model" / "checkpoint.json").read_text())
    grid = validated["item_knn_valid_ndcg10"]
    assert set(grid) == {f"{d} {w}" for d in ("both", "forward") for w in (0, 1, 4)}
    direction, weight = max(grid, key=lambda k: (grid[k], -float(k.split()[1]), k.split()[0] != "both")).split()
    assert validated["item_knn"]["weight"] == float(weight)
    assert validated["item_knn"]["direction"] == final["item_knn"]["direction"] == direction
    assert final["item_knn"]["events"] == "train+valid"
    with pytest.raises(ConfigError, match="model.item_knn.direction=auto"):
        ItemKNNBaseline(ProcessedData(tiny_data), settings=config.model.item_knn)


def test_staged_run_over_two_processes(tiny_data, tmp_path):  # noqa: F811
    """The validated run, the tuning on rank 0 and the refit work under 2 gloo processes."""
    from test_trainer import TINY, _launch_two

    overrides = [*TINY, "stage_a.epochs=2", "stage_a.batch_size=16", "model.item_knn.enabled=true",
                 "stage_a.refit_on_valid=true", "stage_a.eval_max_users=100", "model.item_knn.weight_grid=[0,2]"]
    run = tmp_path / "ddp"
    result = _launch_two(["train", "--data_dir", str(tiny_data), "--output_dir", str(run),
                          *[x for o in overrides for x in ("--set", o)]])
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((run / "best_model" / "checkpoint.json").read_text())
    assert final["trained_on"] == "train+valid" and final["epoch"] >= 1
    assert final["item_knn"]["events"] == "train+valid"
    assert (run / "validated_model" / "item_knn.safetensors").is_file()
    assert result.stdout.count("final model:") == 1  # rank 0 alone writes it
