"""One recipe on every data set in ../shared/data: the network alone and the whole recipe
against the item-kNN and popularity baselines, on the test split, both protocols.

    python benchmarks/recipe_datasets.py --config config/beauty.yaml [--datasets beauty ml-100k]
        [--threads 1] [--set section.key=value ...]

For each data set: preprocess with the default config (leave-one-out, 5-core), train the
recipe unchanged (``llmrec train --config ...``: early stopping on validation, no per-data-set
value), then evaluate on test

- the network alone: ``validated_model`` without its neighbour table (or ``best_model`` when
  the recipe has neither neighbours nor refit), the model validation selected;
- the whole recipe: ``best_model`` (refit + neighbours, when the recipe has them);
- with a refit, the refit network alone: ``best_model`` without its neighbour table, the network
  trained on the events the baselines count;
- ``itemknn_with_valid`` and ``popularity_with_valid`` (counts over training + validation
  events, as the test input includes them).

Prints and writes the ratio of the network alone (and of the refit network alone) to item-kNN
on full-ranking NDCG@10 (the issue's bar: > 1 everywhere) to
benchmarks/results/recipe_datasets_<config>.json, with each run's epochs, time and the command.
Data sets absent from ../shared/data are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, SHARED, machine, write_result  # noqa: E402

DATASETS = {
    # name: raw file under ../shared/data
    "beauty": "amazon-beauty/beauty_5core_sequences.txt",
    "ml-100k": "movielens-100k/u.data",
    "ml-latest-small": "movielens-latest-small/ratings.csv.gz",
    "wikipedia": "wikipedia-sasrec/wikipedia_user_item.txt",
}
KEYS = ("HR@10", "NDCG@10", "MRR")


def llmrec(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llm_recommender.cli", *args], check=True)


def evaluate(out: Path, *args: str) -> dict:
    llmrec("evaluate", *args, "--output_file", str(out))
    result = json.loads(out.read_text())
    return {p: {k: result[p][k] for k in KEYS} for p in ("sampled", "full")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe, e.g. config/beauty.yaml")
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "llmrec-bench"))
    parser.add_argument("--tag", default=None, help="suffix of the result file (default: the config's name)")
    args = parser.parse_args()
    work = Path(args.work_dir)
    config = Path(args.config).resolve()
    tag = args.tag or config.stem
    results = {}
    for name in args.datasets:
        raw = SHARED / "data" / DATASETS[name]
        if not raw.exists():
            print(f"skipped {name}: {raw} not found (real data lives in ../shared; see its README)")
            continue
        data = work / "data" / name
        if not (data / "meta.json").is_file():
            llmrec("preprocess", "--output_dir", str(data), "--set", f"data.path={raw}")
        run = work / "runs" / f"{tag}_{name}"
        sets = [x for o in [f"runtime.num_threads={args.threads}", *args.overrides] for x in ("--set", o)]
        started = time.time()
        llmrec("train", "--config", str(config), "--data_dir", str(data), "--output_dir", str(run), *sets)
        wall = time.time() - started
        staged = (run / "validated_model" / "checkpoint.json").is_file()
        selected = run / ("validated_model" if staged else "best_model")
        info = json.loads((selected / "checkpoint.json").read_text())
        summary = info.get("summary") or {}
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [e for e in history if e["kind"] == "epoch"]
        row = {
            "network_alone": evaluate(run / "test_network.json", "--checkpoint", str(selected), "--split", "test",
                                      "--without-item-knn"),
            "itemknn_with_valid": evaluate(run / "test_itemknn.json", "--baseline", "itemknn_with_valid",
                                           "--data_dir", str(data)),
            "popularity_with_valid": evaluate(run / "test_popularity.json", "--baseline", "popularity_with_valid",
                                              "--data_dir", str(data)),
            "best_epoch": info.get("best_epoch") or summary.get("best_epoch"),
            "epochs": epochs[-1]["epoch"] if epochs else None,
            "train_seconds_validated_run": round(sum(e.get("epoch_seconds", 0) for e in epochs), 1),
            "wall_seconds": round(wall, 1),
        }
        if staged:
            row["recipe"] = evaluate(run / "test_recipe.json", "--checkpoint", str(run / "best_model"))
        if (run / "refit" / "best_model").is_dir():
            # The network trained on the events the baseline counts (training + validation).
            row["refit_alone"] = evaluate(run / "test_refit_alone.json", "--checkpoint", str(run / "best_model"),
                                          "--without-item-knn")
        knn_full = row["itemknn_with_valid"]["full"]["NDCG@10"]
        ratios = {label: round(row[key]["full"]["NDCG@10"] / knn_full, 3)
                  for key, label in (("network_alone", "network"), ("refit_alone", "refit")) if key in row}
        row.update({f"{label}_vs_itemknn_full_ndcg10": ratio for label, ratio in ratios.items()})
        results[name] = row
        shown = {k: row[k]["full"]["NDCG@10"] for k in ("network_alone", "refit_alone", "recipe", "itemknn_with_valid")
                 if k in row}
        shown_ratios = ", ".join(f"{label} / item-kNN {ratio}x" for label, ratio in ratios.items())
        print(f"{name}: full NDCG@10 {shown}; {shown_ratios}; best epoch {row['best_epoch']} of {row['epochs']}; "
              f"{wall / 60:.1f} min", flush=True)
    write_result(f"recipe_datasets_{tag}", {
        "benchmark": "recipe_datasets",
        "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        "overrides": args.overrides,
        "threads": args.threads,
        "results": results,
        "machine": machine(),
        "command": "python benchmarks/recipe_datasets.py " + " ".join(sys.argv[1:]),
    })


if __name__ == "__main__":
    main()
