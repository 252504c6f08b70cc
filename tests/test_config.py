"""Config: the spec's YAML loads; a mistyped key, a wrong type or an out-of-range value is
one error naming the key (and the closest valid key), never a silent default."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SHARED
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


def test_a_key_given_twice_names_the_file_and_line(tmp_path):
    # plain YAML keeps the last value: the first section's keys would be dropped without a word
    path = _yaml(tmp_path, "model:\n  dropout: 0.3\nstage_a:\n  seed: 1\nmodel:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match=r"config.yaml:5: key 'model' given twice"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"config.yaml:3: key 'seed' given twice"):
        load_config(_yaml(tmp_path, "stage_a:\n  seed: 1\n  seed: 2\n"))
    with pytest.raises(ConfigError, match=r"--set .*: key 'collaborative' given twice"):
        load_config(None, ["stage_a.loss_weights={collaborative: 1, collaborative: 2}"])
    recipes = sorted((REPO_ROOT / "config").glob("*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        load_config(recipe)  # the shipped recipes have each key once


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


def test_a_saved_config_is_a_valid_config_file(tmp_path):
    # A checkpoint's config.yaml carries a format stamp; --config must take it as it is
    # (to resume a run or retrain with it), and refuse a stamp from another format.
    config = load_config(None, ["stage_a.batch_size=7"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml", ["stage_a.seed=3"]).stage_a.batch_size == 7
    text = (tmp_path / "saved.yaml").read_text().replace("config_format_version: 1", "config_format_version: 99")
    (tmp_path / "future.yaml").write_text(text)
    with pytest.raises(ConfigError, match="future.yaml: config_format_version 99"):
        load_config(tmp_path / "future.yaml")


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


# ---- the spec's configuration block (issue 12)

SPEC_CONFIG = SHARED / "spec" / "config.yaml"


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _spec_values() -> dict:
    import yaml

    if not SPEC_CONFIG.is_file():
        pytest.skip(f"the spec's config block is not at {SPEC_CONFIG} (../shared is absent)")
    return _flatten(yaml.safe_load(SPEC_CONFIG.read_text()))


def test_the_spec_config_block_loads_unchanged_key_for_key():
    spec = _spec_values()
    config = _flatten(load_config(SPEC_CONFIG).to_dict())
    for key, value in spec.items():
        assert key in config, f"the spec's key {key} is not a config key"
        expected = float(value) if isinstance(value, str) and key.endswith("learning_rate") else value
        assert config[key] == expected, (key, config[key], value)


def test_config_yaml_carries_the_spec_keys_and_values_and_the_dataclass_defaults():
    spec = _spec_values()
    ours = _flatten(load_config(REPO_ROOT / "config" / "config.yaml").to_dict())
    defaults = _flatten(load_config().to_dict())
    for key, value in spec.items():
        expected = float(value) if isinstance(value, str) and key.endswith("learning_rate") else value
        assert ours[key] == expected, (key, ours[key], value)
    assert ours == defaults, {k: (ours[k], defaults[k]) for k in ours if ours[k] != defaults.get(k)}
    text = (REPO_ROOT / "config" / "config.yaml").read_text()
    for key in spec:  # the spec's names, not the aliases, are what config/ shows
        assert f"  {key.rsplit('.', 1)[1]}:" in text, key
    for alias in ("num_epochs:", "cross_entropy:"):
        assert f"  {alias}" not in text


def test_an_alias_and_its_spec_name_are_one_setting(tmp_path):
    assert load_config(None, ["stage_a.num_epochs=3"]).stage_a.epochs == 3
    assert load_config(None, ["stage_a.loss_weights.cross_entropy=0.5"]).stage_a.loss_weights.collaborative == 0.5
    path = _yaml(tmp_path, "stage_a:\n  num_epochs: 4\n")
    assert load_config(path).stage_a.epochs == 4
    assert load_config(path, ["stage_a.epochs=7"]).stage_a.epochs == 7  # an override wins, by either name
    saved = tmp_path / "saved.yaml"
    save_config(load_config(path), saved)
    both = _yaml(tmp_path, "stage_a:\n  epochs: 4\n  num_epochs: 5\n")
    with pytest.raises(ConfigError, match="'stage_a.num_epochs' and 'stage_a.epochs' are the same setting"):
        load_config(both)
    assert "num_epochs" not in saved.read_text() and load_saved_config(saved).stage_a.epochs == 4
