"""Where a model wins or loses against item-kNN: full-ranking NDCG@10 per group of users.

    python benchmarks/breakdown.py --data_dir DATA --model NAME=CHECKPOINT [--model ...]
        [--network NAME=CHECKPOINT ...] [--split test] [--knn_direction both] [--tied_orders N]
        [--deletion_readings N] [--item_readings N] [--mean NAME] [--bootstrap 2000] [--threads 1] [--name NAME]

``--model`` scores a checkpoint as it is (with its neighbour table, if it has one);
``--network`` scores it without the table: the network alone. Each checkpoint is scored with
its own ``evaluation`` readings (``tied_orders``, ``deletion_readings``, ``deletion_prob``,
``item_readings``, ``item_readings_weight``, ``reading_average``), as ``llmrec evaluate``
scores it, unless ``--tied_orders``, ``--deletion_readings`` or ``--item_readings`` is given.
``--mean NAME`` adds a column NAME: each user's NDCG@10
averaged over all the checkpoints given (several seeds of one recipe: the recipe's expected
figure on this file, with the users' sampling noise alone in its interval).

Scores every user of the split with each checkpoint and with the item co-occurrence baseline
(``itemknn_with_valid`` on test, ``itemknn`` on valid: the counts the input can see), then
splits the users by

- whether the held-out event has the same timestamp as the event before it (a user who logged
  several events in one second, as half of MovieLens does, has no known order among them),
  when the data has timestamps;
- the length of the history before the held-out event (quartiles);
- the popularity of the held-out item in the training events (terciles),

and prints each model's NDCG@10 per group with its ratio to item-kNN's and the 95% interval
of that ratio: a paired bootstrap over the group's users (``--bootstrap`` resamples; the same
users for the model and item-kNN), so an interval that contains 1 is a tie on this file. The
result goes to ``benchmarks/results/breakdown_<name>.json``. It is a diagnosis, not a quality
bar: a group of a few hundred users has a 95% interval of several points of NDCG@10.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402


# The evaluation keys that say how a history is read; each checkpoint is scored with its own.
READING_KEYS = ("tied_orders", "deletion_readings", "deletion_prob", "item_readings", "item_readings_weight",
                "reading_average")


def groups(data, split: str) -> dict[str, np.ndarray]:
    """Boolean masks over ``data.eval_examples(split)``'s users, by name; empty groups left
    out (no same-second events, a quartile edge repeated by short-history data)."""
    users, positions = data.eval_examples(split)
    items = np.asarray(data.items)
    offsets = np.asarray(data.offsets)
    history = positions - offsets[users]
    out = {"all": np.ones(len(users), dtype=bool)}
    if data.meta.get("has_timestamps", True):
        timestamps = np.asarray(data.timestamps)
        tied = (history > 0) & (timestamps[positions] == timestamps[np.maximum(positions - 1, 0)])
        out["same second as the previous event"] = tied
        out["later than the previous event"] = ~tied
    edges = np.quantile(history, [0.25, 0.5, 0.75]).astype(int)
    bounds = [0, *edges.tolist(), int(history.max()) + 1]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[f"history {lo}-{hi - 1} events"] = (history >= lo) & (history < hi)
    popularity = data.item_popularity(include_valid=False)[items[positions]]
    low, high = np.quantile(popularity, [1 / 3, 2 / 3])
    out["held-out item: least popular third"] = popularity < low
    out["held-out item: middle third"] = (popularity >= low) & (popularity < high)
    out["held-out item: most popular third"] = popularity >= high
    return {name: mask for name, mask in out.items() if mask.any()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a checkpoint folder (best_model, validated_model), repeatable")
    parser.add_argument("--network", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a checkpoint scored without its neighbour table, repeatable")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument("--knn_direction", choices=("both", "forward"), default="both",
                        help="item-kNN's co-occurrence: either order (the baseline) or forward only")
    parser.add_argument("--tied_orders", type=int, default=None,
                        help="orders of tied history events to average the models' scores over "
                             "(default: each checkpoint's evaluation.tied_orders)")
    parser.add_argument("--deletion_readings", type=int, default=None,
                        help="deletion readings to average the models' scores over (default: each "
                             "checkpoint's evaluation.deletion_readings)")
    parser.add_argument("--item_readings", type=int, default=None,
                        help="last items read alone mixed into the models' states (default: each "
                             "checkpoint's evaluation.item_readings)")
    parser.add_argument("--mean", default=None, metavar="NAME",
                        help="add a column NAME: each user's NDCG@10 averaged over all the checkpoints")
    parser.add_argument("--bootstrap", type=int, default=2000,
                        help="paired bootstrap resamples of the ratio's 95%% interval (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="result file suffix (default: the data folder's name)")
    args = parser.parse_args()

    import torch

    from llm_recommender.checkpoint import load_checkpoint
    from llm_recommender.config import EvaluationConfig, ItemKNNConfig
    from llm_recommender.data.dataset import ProcessedData
    from llm_recommender.errors import LLMRecError
    from llm_recommender.evaluation.baselines import get_baseline
    from llm_recommender.evaluation.evaluator import evaluate
    from llm_recommender.evaluation.metrics import ndcg_at_k

    torch.set_num_threads(args.threads)
    models: dict[str, tuple[Path, bool]] = {}  # name -> (checkpoint, network alone)
    for flag, specs in (("--model", args.model), ("--network", args.network)):
        for spec in specs:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                parser.error(f"{flag} {spec!r}: expected NAME=CHECKPOINT")
            if name in models or name == "item-kNN":
                parser.error(f"{flag} {spec!r}: the name {name!r} is taken")
            models[name] = (Path(path), flag == "--network")
    if not models:
        parser.error("give at least one --model or --network")
    if args.mean is not None and (args.mean in models or args.mean == "item-kNN"):
        parser.error(f"--mean {args.mean!r}: the name is taken")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap {args.bootstrap}: must be >= 0")
    try:
        data = ProcessedData(args.data_dir)
        eval_config = EvaluationConfig()
        scores, max_len, readings = {}, 50, {}
        for name, (path, network_alone) in models.items():
            model, config, _ = load_checkpoint(path)
            if network_alone:
                model.attach_item_knn(None, 0.0)
            max_len = config.model.max_seq_len
            # The checkpoint's own readings, as llmrec evaluate reads it, unless overridden.
            overrides = {"tied_orders": args.tied_orders, "deletion_readings": args.deletion_readings,
                         "item_readings": args.item_readings}
            settings = {key: getattr(config.evaluation, key) if overrides.get(key) is None else overrides[key]
                        for key in READING_KEYS}
            result = evaluate(model, data, args.split, dataclasses.replace(eval_config, **settings), max_len,
                              protocols=("full",), return_ranks=True)
            scores[name] = (result["users"], ndcg_at_k(result["ranks"]["full"], 10))
            readings[name] = {**settings, "tied_orders": result["tied_orders"]}  # the orders the data has
        baseline = "itemknn_with_valid" if args.split == "test" else "itemknn"
        knn = get_baseline(baseline, data, split=args.split, settings=ItemKNNConfig(direction=args.knn_direction))
        result = evaluate(knn, data, args.split, eval_config, max_len, protocols=("full",), return_ranks=True)
        scores["item-kNN"] = (result["users"], ndcg_at_k(result["ranks"]["full"], 10))
    except LLMRecError as exc:
        sys.exit(f"error: {exc}")
    users = scores["item-kNN"][0]
    for name, (order, _) in scores.items():
        if not np.array_equal(order, users):
            sys.exit(f"error: {name}: users in another order than item-kNN's")
    if args.mean is not None:
        knn_scores = scores.pop("item-kNN")
        scores[args.mean] = (users, np.mean([values for _, values in scores.values()], axis=0))
        scores["item-kNN"] = knn_scores
    masks = groups(data, args.split)
    table = {}
    width = max(len(g) for g in masks)
    interval = f", 95% interval of {args.bootstrap} paired bootstrap resamples" if args.bootstrap else ""
    print(f"{args.split} split, full-ranking NDCG@10 (ratio to item-kNN{interval})")
    rng = np.random.default_rng(args.seed)
    for group, mask in masks.items():
        row = {"users": int(mask.sum())}
        knn_values = scores["item-kNN"][1][mask]
        knn_value = float(knn_values.mean())
        # The same resampled users for every model and item-kNN (paired).
        resamples = rng.integers(0, len(knn_values), size=(args.bootstrap, len(knn_values))) if args.bootstrap else None
        knn_resampled = knn_values[resamples].mean(axis=1) if resamples is not None else None
        cells = []
        for name, (_, all_values) in scores.items():
            values = all_values[mask]
            value = float(values.mean())
            row[name] = round(value, 4)
            if name == "item-kNN":
                cells.append(f"item-kNN {value:.4f}")
                continue
            ratio = value / knn_value if knn_value > 0 else float("nan")
            row[f"{name} / item-kNN"] = round(ratio, 3)
            if resamples is None:
                cells.append(f"{name} {value:.4f} ({ratio:.2f}x)")
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = values[resamples].mean(axis=1) / knn_resampled
            low, high = np.nanquantile(ratios, [0.025, 0.975])
            row[f"{name} / item-kNN ci95"] = [round(float(low), 3), round(float(high), 3)]
            cells.append(f"{name} {value:.4f} ({ratio:.2f}x, {low:.2f}-{high:.2f})")
        table[group] = row
        print(f"{group:<{width}}  n={row['users']:<6d} " + "  ".join(cells))
    write_result(
        f"breakdown_{args.name or Path(args.data_dir).name}",
        {"split": args.split, "data_dir": str(args.data_dir), "models": {k: {"checkpoint": str(p), "network_alone": alone, **readings[k]} for k, (p, alone) in models.items()},
         "mean_of_models": args.mean, "bootstrap": args.bootstrap, "item_knn": baseline, "item_knn_direction": args.knn_direction, "groups": table, "command": " ".join(sys.argv), "machine": machine()},
    )


if __name__ == "__main__":
    main()
