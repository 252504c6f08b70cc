"""The recipes in config/: they load, they stop on validation (never on the clock), and the whole
recipe is the network-alone recipe plus its two additions, key for key (issue 13)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llm_recommender.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "config"
RECIPES = sorted(p.name for p in CONFIG.glob("*.yaml") if p.name != "config.yaml")


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_stops_on_validation_not_on_the_clock(name):
    stage_a = load_config(CONFIG / name).stage_a
    assert stage_a.max_train_minutes is None, f"{name} relies on a wall-clock budget"
    assert stage_a.patience > 0, f"{name} has no early stopping"


def test_the_whole_recipe_is_the_network_recipe_plus_neighbours_and_refit():
    whole = dataclasses.asdict(load_config(CONFIG / "beauty.yaml"))
    network = dataclasses.asdict(
        load_config(CONFIG / "sasrec_size.yaml", ["model.item_knn.enabled=true", "model.item_knn.direction=auto",
                                                  "stage_a.refit_on_valid=true"])
    )
    assert whole == network


def test_the_network_recipe_validates_on_full_ranking():
    stage_a = load_config(CONFIG / "sasrec_size.yaml").stage_a
    assert stage_a.eval_protocol == "full"
    assert stage_a.lr_schedule == "constant"  # a schedule tied to the epoch cap would depend on it
