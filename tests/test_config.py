"""Config: the spec's YAML loads; a mistyped key, a wrong type or an out-of-range value is
one error naming the key (and the closest valid key), never a silent default."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from llm_recommender.config import DATA_FORMATS, Config, DataConfig, load_config, load_saved_config, save_config
from llm_recommender.errors import ConfigError


def _yaml(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_spec_config_loads_with_the_data_defaults():
    config = load_config(REPO_ROOT / "config" / "config.yaml")
    assert config.data.format == "auto" and config.data.k_core == 5
    assert config.data.split == "leave_one_out" and config.data.split_ratios == [0.8, 0.1, 0.1]
    assert config.data.normalize_ids is True and config.data.allow_no_timestamps is False
    # config.yaml documents every data key the dataclass has
    assert set(DataConfig.__dataclass_fields__) == set(load_config().to_dict()["data"])
    text = (REPO_ROOT / "config" / "config.yaml").read_text()
    for key in DataConfig.__dataclass_fields__:
        assert f"  {key}:" in text, key


def test_unknown_key_suggests_the_closest(tmp_path):
    path = _yaml(tmp_path, "data:\n  k_cor: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.k_cor'; did you mean 'data.k_core'\?"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"did you mean 'data.min_rating'"):
        load_config(None, ["data.min_ratng=4"])


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"data.k_core='five' must be an integer"):
        load_config(_yaml(tmp_path, "data:\n  k_core: five\n"))
    with pytest.raises(ConfigError, match=r"data.dedup='maybe' must be true or false"):
        load_config(None, ["data.dedup=maybe"])
    with pytest.raises(ConfigError, match=r"data.split_ratios"):
        load_config(None, ["data.split_ratios=0.8"])


def test_out_of_range_values(tmp_path):
    with pytest.raises(ConfigError, match=r"data.k_core=0 must be >= 1"):
        load_config(None, ["data.k_core=0"])
    with pytest.raises(ConfigError, match=r"data.split_ratios=\[0.5, 0.1, 0.1\] must be three"):
        load_config(None, ["data.split_ratios=[0.5, 0.1, 0.1]"])
    with pytest.raises(ConfigError, match=r"data.min_user_interactions_for_eval=2 must be >= 3"):
        load_config(None, ["data.min_user_interactions_for_eval=2"])
    with pytest.raises(ConfigError, match=r"data.timestamp_unit='us' must be auto, s or ms"):
        load_config(None, ["data.timestamp_unit=us"])


def test_unknown_data_format_suggests_a_name():
    with pytest.raises(ConfigError, match=r"data.format='amazon_jsn' must be one of .*did you mean 'amazon_json'"):
        load_config(None, ["data.format=amazon_jsn"])
    with pytest.raises(ConfigError, match=r"data.split='random' must be one of"):
        load_config(None, ["data.split=random"])
    assert DATA_FORMATS[0] == "auto" and "sasrec_sequences" in DATA_FORMATS


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["data.k_core=2", "data.columns.user=who", "data.min_rating=3.5"])
    save_config(config, tmp_path / "saved.yaml")
    again = load_saved_config(tmp_path / "saved.yaml")
    assert again == config
    assert isinstance(again, Config) and again.data.columns.user == "who"


def test_cli_prints_one_line_for_a_config_mistake(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llm_recommender.cli", "preprocess", "--output_dir", str(tmp_path / "out"),
         "--set", "data.k_cor=2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "did you mean 'data.k_core'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
