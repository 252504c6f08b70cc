#!/usr/bin/env python
"""The spec's script: same as `llmrec preprocess` (see `llmrec preprocess --help`)."""

import sys
from pathlib import Path

# Run from a checkout without installing: make src/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llm_recommender.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
