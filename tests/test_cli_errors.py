"""Issue 7's configuration mistakes, through the command line: one line, exit code 2."""

from __future__ import annotations

import pytest

from conftest import generated_data
from llm_recommender.cli import main


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    return generated_data(tmp_path_factory.mktemp("cli_errors"), users=60, items=30, interactions=900, seed=1)[1]


CASES = [
    (["--set", "stage_a.learnig_rate=1e-3"], "did you mean 'stage_a.learning_rate'"),
    (["--set", "model.embedding_dim=wide"], "model.embedding_dim='wide' must be an integer"),
    (["--set", "stage_a.learning_rate=-0.1"], "stage_a.learning_rate=-0.1 must be > 0"),
    (["--set", "stage_a.batch_size=0"], "stage_a.batch_size=0 must be >= 1"),
    (["--set", "stage_a.loss_weights.cf_bpr=0", "--set", "stage_a.loss_weights.user_bpr=1"],
     "cf_bpr=0 switches L_bpr off"),
    (["--set", "model.base_llm=no-such-org/no-such-model"], "no-such-org/no-such-model"),
    (["--set", "model.base_llm=/no/such/folder"], "/no/such/folder"),
    (["--set", "stage_a"], "expected section.key=value"),
]


@pytest.mark.parametrize("extra, message", CASES, ids=[c[1][:30] for c in CASES])
def test_config_mistakes_are_one_line_errors(processed, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code = main(["train", "--data_dir", str(processed), "--output_dir", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (out / "last").exists()


def test_offline_hub_name_says_how_to_make_it_available(processed, tmp_path, capsys):
    code = main(["train", "--data_dir", str(processed), "--output_dir", str(tmp_path / "r"),
                 "--set", "model.base_llm=Qwen/Qwen2-0.5B"])
    err = capsys.readouterr().err
    assert code == 2
    assert "random_init_stage_a_llm" in err or "download" in err, err


@pytest.mark.parametrize("command", [["evaluate"], ["recommend", "--user", "x"], ["export-embeddings", "--output", "o"]])
def test_a_folder_that_is_not_a_checkpoint(processed, tmp_path, capsys, command):
    argv = [command[0], "--checkpoint", str(processed), *command[1:]]
    if command[0] == "export-embeddings":
        argv[-1] = str(tmp_path / "o")
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "not a checkpoint folder" in err[0], err


def test_missing_data_dir_and_config_file(tmp_path, capsys):
    assert main(["train", "--data_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "processed data folder not found" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "--data_dir", "x", "--output_dir", "y"]) == 2
    assert "config file not found" in capsys.readouterr().err
