"""``llmrec export-embeddings``: vectors, id maps, manifest and a FAISS index that answers
the same top-K as the model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_recommend import build_tiny_checkpoint  # noqa: E402  (tests/ is on sys.path)

from llm_recommender.serving.export import export_embeddings
from llm_recommender.serving.recommend import Recommender


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_serving_checkpoint")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "vectors"
    manifest = export_embeddings(tiny_checkpoint[0], output, faiss_index=True, batch_size=7)
    return output, manifest


def test_files_shapes_and_row_order(exported, tiny_checkpoint):
    output, manifest = exported
    rec = Recommender.from_checkpoint(tiny_checkpoint[0])
    items = np.load(output / "item_embeddings.npy")
    states = np.load(output / "user_states.npy")
    users = np.load(output / "user_embeddings.npy")
    assert items.dtype == np.float32 and items.shape == (30, 16)
    assert states.shape == (60, 16) and users.shape == (60, 16)
    # Row r is item r+1 of the model's table (padding row 0 left out).
    np.testing.assert_array_equal(items, rec.model.embeddings.item_embeddings.weight.detach().numpy()[1:])
    assert (output / "item_ids.txt").read_text().splitlines() == rec.item_ids
    assert (output / "user_ids.txt").read_text().splitlines() == rec.user_ids
    saved = json.loads((output / "manifest.json").read_text())
    assert saved == manifest
    assert saved["format_version"] == 1 and saved["dim"] == 16 and saved["metric"] == "inner_product"
    assert saved["faiss"] is True and saved["num_users"] == 60
    assert not list(output.parent.glob(".vectors.*"))  # the temporary folder was renamed


def test_user_states_score_like_the_model(exported, tiny_checkpoint):
    output, _ = exported
    rec = Recommender.from_checkpoint(tiny_checkpoint[0])
    states = np.load(output / "user_states.npy")
    items = np.load(output / "item_embeddings.npy")
    expected_items, expected_scores = rec.recommend_users(np.arange(1, 61), k=10, exclude_seen=False)
    scores = states @ items.T  # (U, I): column c is item c+1
    np.testing.assert_allclose(np.sort(scores, axis=1)[:, ::-1][:, :10], expected_scores, rtol=1e-4, atol=1e-5)


def test_faiss_inner_product_search_gives_the_models_top_10(exported, tiny_checkpoint):
    faiss = pytest.importorskip("faiss")
    output, _ = exported
    rec = Recommender.from_checkpoint(tiny_checkpoint[0])
    index = faiss.read_index(str(output / "items.faiss"))
    assert index.ntotal == 30
    distances, rows = index.search(np.load(output / "user_states.npy"), 10)
    expected_items, expected_scores = rec.recommend_users(np.arange(1, 61), k=10, exclude_seen=False)
    np.testing.assert_allclose(distances, expected_scores, rtol=1e-4, atol=1e-5)
    found = rows + 1  # row r is item r+1
    # Identical lists, except where two neighbours' scores tie to float rounding.
    gaps = np.abs(np.diff(expected_scores, axis=1)) > 1e-5
    clear = np.ones_like(found, dtype=bool)
    clear[:, :-1] &= gaps
    clear[:, 1:] &= gaps
    assert (found[clear] == expected_items[clear]).all()
    assert clear.mean() > 0.9


def test_without_faiss_a_note_and_no_index(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import llm_recommender.serving.export as export

    monkeypatch.setattr(export, "_faiss", lambda: None)
    manifest = export_embeddings(tiny_checkpoint[0], tmp_path / "out", faiss_index=True)
    assert not (tmp_path / "out" / "items.faiss").exists()
    assert manifest["faiss"] is False and "faiss not installed" in manifest["note"]
    assert "note: faiss not installed" in capsys.readouterr().out
    assert (tmp_path / "out" / "item_embeddings.npy").is_file()


def test_cli_export_with_data_dir_and_no_faiss(tiny_checkpoint, tmp_path, capsys):
    from llm_recommender.cli import main

    checkpoint, data_dir = tiny_checkpoint
    code = main(["export-embeddings", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "v"),
                 "--data_dir", str(data_dir), "--no-faiss", "--batch-size", "16"])
    assert code == 0
    assert "exported 30 items and 60 users (dim 16)" in capsys.readouterr().out
    assert not (tmp_path / "v" / "items.faiss").exists()
    code = main(["export-embeddings", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "w"),
                 "--data_dir", str(tmp_path / "missing")])
    assert code == 2 and "processed data folder not found" in capsys.readouterr().err


def test_an_item_bias_travels_as_one_more_column(tmp_path_factory):
    """model.item_bias: serving adds each item's bias to its score, and the export carries it
    as a last column (items: b_i, user states: 1), so the inner product is still the score."""
    from test_recommend import build_tiny_checkpoint
    import torch

    checkpoint, _ = build_tiny_checkpoint(
        tmp_path_factory.getbasetemp() / "tiny_bias_checkpoint",
        ("model.item_bias=true", "model.item_bias_init=log_popularity"),
    )
    rec = Recommender.from_checkpoint(checkpoint)
    bias = rec.model.item_bias.detach()
    assert bias[1:].abs().sum() > 0
    items, scores = rec.recommend_users(np.arange(1, 11), k=5, exclude_seen=False)
    for user in range(1, 11):
        history = torch.from_numpy(rec.history_of(user)[-rec.max_seq_len :])[None, :]
        reference = rec.model.full_sort_predict(torch.tensor([user]), history)[0]
        top = torch.topk(reference, 5)
        assert items[user - 1].tolist() == top.indices.tolist()
        np.testing.assert_allclose(scores[user - 1], top.values.numpy(), rtol=1e-5, atol=1e-5)
    output = tmp_path_factory.mktemp("export_bias") / "vectors"
    manifest = export_embeddings(checkpoint, output, faiss_index=False)
    vectors = np.load(output / "item_embeddings.npy")
    states = np.load(output / "user_states.npy")
    assert manifest["item_bias"] is True and manifest["dim"] == 17 and vectors.shape == (30, 17)
    np.testing.assert_allclose(vectors[:, -1], bias[1:].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(states[:, -1], 1.0)
    assert np.load(output / "user_embeddings.npy").shape == (60, 16)
    expected = np.sort(states[:10] @ vectors.T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(expected, scores, rtol=1e-4, atol=1e-5)
