"""The spec's configuration block runs unchanged through the spec's three scripts (issue 12):
only ``model.base_llm`` is pointed at a local folder, the Hub being offline."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT, shared_path


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / name), *args], capture_output=True,
                          text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                       "OMP_NUM_THREADS": "1"})


def test_the_spec_config_through_the_three_scripts(tmp_path):
    spec = shared_path("spec", "config.yaml")
    qwen2 = shared_path("models", "stories260k-qwen2")
    raw = tmp_path / "raw.json.gz"
    from llm_recommender.cli import main

    assert main(["generate", "--users", "120", "--items", "60", "--interactions", "2000", "--format", "amazon2018",
                 "--seed", "4", "--output", str(raw)]) == 0
    common = ["--config", str(spec), "--set", f"model.base_llm={qwen2}"]
    done = _script("preprocess_data.py", *common, "--output_dir", str(tmp_path / "data"), "--set", f"data.path={raw}")
    assert done.returncode == 0, done.stderr
    done = _script("train_stage_a.py", *common, "--data_dir", str(tmp_path / "data"), "--output_dir",
                   str(tmp_path / "ckpt"), "--set", "stage_a.epochs=1", "--set", "runtime.num_threads=1")
    assert done.returncode == 0, done.stderr
    assert "1 epochs" in done.stdout and "qwen2 (pretrained, full)" in done.stdout, done.stdout
    saved = (tmp_path / "ckpt" / "best_model" / "config.yaml").read_text()
    # The resolved config shows what was used, under the spec's names.
    for line in ("epochs: 1", "collaborative: 1.0", "cf_bpr: 1.0", "regularization: 0.0", "negative_samples: 30",
                 "lambda_c: 0.001", "embedding_dim: 128", "freeze_llm_stage_a: false"):
        assert line in saved, line
    done = _script("predict.py", "--checkpoint", str(tmp_path / "ckpt" / "best_model"), "--data_dir",
                   str(tmp_path / "data"), "--output_file", str(tmp_path / "test_metrics.json"))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())
    for protocol in ("sampled", "full"):
        assert metrics[protocol]["num_users"] == 120 and 0 <= metrics[protocol]["NDCG@10"] <= 1
