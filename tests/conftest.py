"""Shared test fixtures: paths to ../shared data and models (tests skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMREC_SHARED", REPO_ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test with a clear message when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (real data/models live in ../shared; see its README)")
    return path


def generated_data(root: Path, users: int, items: int, interactions: int, seed: int) -> tuple[Path, Path]:
    """Generated CSV logs under ``root`` and their processed folder (default config): (raw, data)."""
    from llm_recommender.cli import main

    raw = root / "raw.csv"
    assert main(["generate", "--users", str(users), "--items", str(items), "--interactions", str(interactions),
                 "--format", "csv", "--seed", str(seed), "--output", str(raw)]) == 0
    data = root / "data"
    assert main(["preprocess", "--output_dir", str(data), "--set", f"data.path={raw}"]) == 0
    return raw, data


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    # Tests never reach the Hugging Face Hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
