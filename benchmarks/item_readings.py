"""How many of a history's last items to read alone, and with what weight: a validation grid
of ``evaluation.item_readings`` x ``evaluation.item_readings_weight`` on trained networks.

    python benchmarks/item_readings.py --data_dir DATA --network NAME=CHECKPOINT [--network ...]
        [--split valid] [--counts 1,2,3,5,10] [--weights 0.2,0.33,0.5,0.67] [--tied_orders 1]
        [--threads 1] [--name NAME]

Each checkpoint is scored without its neighbour table (the network alone) on the full-ranking
protocol, first without item readings (the baseline of the same run), then at every
(count, weight) of the grid; every other reading is off (``deletion_readings`` 0, and
``--tied_orders`` orders of tied events, 1 by default: the history as the file gives it), so
the grid measures the item readings alone. Prints NDCG@10 and its ratio to the baseline, and
writes ``benchmarks/results/item_readings_<name>.json``. Choose on ``--split valid``; the
test split is for reporting what was chosen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_network_arguments, machine, parse_networks, write_result  # noqa: E402


def numbers(text: str, kind: type) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one number")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser)
    parser.add_argument("--counts", type=lambda t: numbers(t, int), default=[1, 2, 3, 5, 10],
                        help="item_readings values (the last k items)")
    parser.add_argument("--weights", type=lambda t: numbers(t, float), default=[0.2, 0.33, 0.5, 0.67],
                        help="item_readings_weight values, each in (0, 1]")
    parser.add_argument("--tied_orders", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="result file suffix (default: the data folder's name)")
    args = parser.parse_args()
    networks = parse_networks(parser, args.network)
    if any(k < 1 for k in args.counts) or any(not 0 < w <= 1 for w in args.weights):
        parser.error("--counts must be >= 1 and --weights in (0, 1]")

    import torch

    from llm_recommender.checkpoint import load_checkpoint
    from llm_recommender.config import EvaluationConfig
    from llm_recommender.data.dataset import ProcessedData
    from llm_recommender.errors import LLMRecError
    from llm_recommender.evaluation.evaluator import evaluate

    torch.set_num_threads(args.threads)
    results = {}
    try:
        data = ProcessedData(args.data_dir)
        for name, path in networks.items():
            model, config, _ = load_checkpoint(path)
            model.attach_item_knn(None, 0.0)

            def ndcg(count: int, weight: float) -> float:
                settings = EvaluationConfig(tied_orders=args.tied_orders, item_readings=count, item_readings_weight=weight)
                result = evaluate(model, data, args.split, settings, config.model.max_seq_len, protocols=("full",))
                return float(result["full"]["NDCG@10"])

            base = ndcg(0, 0.33)
            grid = {}
            print(f"{name}: {args.split} full NDCG@10 without item readings {base:.4f}")
            for weight in args.weights:
                cells = []
                for count in args.counts:
                    value = ndcg(count, weight)
                    grid[f"k={count} w={weight}"] = {"NDCG@10": round(value, 4), "ratio": round(value / base, 3)}
                    cells.append(f"k={count} {value:.4f} ({value / base:.3f}x)")
                print(f"  w={weight:<5}" + "  ".join(cells), flush=True)
            results[name] = {"checkpoint": str(path), "without": round(base, 4), "grid": grid}
    except LLMRecError as exc:
        sys.exit(f"error: {exc}")
    write_result(
        f"item_readings_{args.name or Path(args.data_dir).name}",
        {"split": args.split, "data_dir": str(args.data_dir), "tied_orders": args.tied_orders, "networks": results,
         "command": " ".join(sys.argv), "machine": machine()},
    )


if __name__ == "__main__":
    main()
