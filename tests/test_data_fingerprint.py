"""A checkpoint knows its data (issue 12): the processed folder it was trained on is recorded by
fingerprint, and evaluating, recommending, serving or exporting on another folder is one line
and exit code 2 (``--allow-new-events`` lets inference read newer histories over the same
users and items; evaluation never)."""

from __future__ import annotations

import json

import pytest

from conftest import generated_data
from llm_recommender.cli import main
from llm_recommender.data.dataset import ProcessedData

TINY = [
    "model.random_init_stage_a_llm=true", "model.base_llm=gpt2", "model.num_layers=1", "model.hidden_size=16",
    "model.num_heads=2", "model.embedding_dim=8", "model.max_seq_len=8", "stage_a.epochs=1",
    "stage_a.batch_size=32", "stage_a.collaborative.use_bpr_loss=false", "evaluation.num_negatives=10",
    "runtime.num_threads=1",
]


def _sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fingerprint")
    raw, data = generated_data(root, users=80, items=40, interactions=1200, seed=2)
    run = root / "run"
    assert main(["train", "--data_dir", str(data), "--output_dir", str(run), *_sets(TINY)]) == 0
    return raw, data, run / "best_model"


def _run(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def test_the_checkpoint_records_the_fingerprint_of_its_data(trained):
    _, data, checkpoint = trained
    info = json.loads((checkpoint / "checkpoint.json").read_text())
    assert info["data_fingerprint"] == ProcessedData(data).fingerprint
    # A copy of the folder is the same data; the fingerprint does not depend on the path.
    assert len(info["data_fingerprint"]) == 64


def test_the_same_raw_file_preprocessed_again_is_other_data(trained, tmp_path, capsys):
    raw, data, checkpoint = trained
    before = ProcessedData(data).fingerprint
    # Same raw file, same catalogue, another split: events move between splits.
    again = tmp_path / "again"
    assert main(["preprocess", "--output_dir", str(again), "--set", f"data.path={raw}",
                 "--set", "data.split=chronological"]) == 0
    after = ProcessedData(again)
    assert after.num_items == ProcessedData(data).num_items and after.fingerprint != before

    code, err = _run(capsys, "evaluate", "--checkpoint", str(checkpoint), "--data_dir", str(again),
                     "--output_file", str(tmp_path / "m.json"))
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert before[:12] in err[0] and after.fingerprint[:12] in err[0], err
    assert not (tmp_path / "m.json").exists()

    for command in (["recommend", "--user", ProcessedData(data).user_ids[0]],
                    ["export-embeddings", "--output", str(tmp_path / "vectors"), "--no-faiss"]):
        code, err = _run(capsys, command[0], "--checkpoint", str(checkpoint), "--data_dir", str(again), *command[1:])
        assert code == 2 and len(err) == 1 and "data fingerprint" in err[0], (command, err)
    assert not (tmp_path / "vectors").exists()

    # Inference on newer events over the same users and items is allowed when asked for.
    code, err = _run(capsys, "recommend", "--checkpoint", str(checkpoint), "--data_dir", str(again),
                     "--user", ProcessedData(data).user_ids[0], "--allow-new-events")
    assert code == 0, err
    code, err = _run(capsys, "export-embeddings", "--checkpoint", str(checkpoint), "--data_dir", str(again),
                     "--output", str(tmp_path / "vectors"), "--no-faiss", "--allow-new-events")
    assert code == 0, err


def test_new_events_never_cover_other_users_or_items(trained, tmp_path, capsys):
    raw, _, checkpoint = trained
    other = tmp_path / "other"
    assert main(["preprocess", "--output_dir", str(other), "--set", f"data.path={raw}", "--set", "data.k_core=12"]) == 0
    code, err = _run(capsys, "recommend", "--checkpoint", str(checkpoint), "--data_dir", str(other),
                     "--user", ProcessedData(other).user_ids[0], "--allow-new-events")
    assert code == 2 and len(err) == 1 and "id map" in err[0], err


def test_evaluation_on_its_own_data_still_works(trained, tmp_path, capsys):
    _, data, checkpoint = trained
    code, err = _run(capsys, "evaluate", "--checkpoint", str(checkpoint), "--data_dir", str(data),
                     "--output_file", str(tmp_path / "m.json"))
    assert code == 0, err
    payload = json.loads((tmp_path / "m.json").read_text())
    assert payload["data_fingerprint"] == ProcessedData(data).fingerprint
    assert payload["sampled"]["num_users"] > 0 and payload["full"]["num_users"] > 0
