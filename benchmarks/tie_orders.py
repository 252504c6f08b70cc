"""Does a scorer gain from averaging over the unknown order of same-second history events?

    python benchmarks/tie_orders.py --data_dir DATA --network NAME=CHECKPOINT [--network ...]
        [--split valid] [--orders 32] [--average probability] [--threads 1] [--name NAME]
        [--reading ties|deletion] [--deletion_prob 0.2]

A user's events with one timestamp (74% of MovieLens-100k's) have no known order: the file's
is arbitrary, and `stage_a.shuffle_tied_events` trains on a new one every epoch. This scores
each history as the file orders it (the evaluator's protocol) and as the mean over ``--orders``
random orders of its runs of same-timestamp events (time order kept, the history's set of items
unchanged, so the same items are masked), for each network (scored without its neighbour table)
and for item-kNN (``itemknn`` on valid, ``itemknn_with_valid`` on test), and prints full-ranking
NDCG@10 with the ratio of the averaged to the file-order figure, measured in the same run. The
network averages probabilities (``--average probability``, its prediction marginalised over the
orders) or logits (``score``); item-kNN always averages its scores. The result goes to
``benchmarks/results/tie_orders_<name>.json``.

``--reading deletion`` asks the same question of the training's other augmentation
(``stage_a.item_deletion_prob``): each of the ``--orders`` readings deletes every history event
with probability ``--deletion_prob`` (a history keeps at least its last event; the rest close
up), its tied events in a random order where the data has timestamps (as ``evaluation.tied_orders``
reads them); on data with or without timestamps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_network_arguments, machine, parse_networks, write_result  # noqa: E402


class TieOrderAverage:
    """A scorer over the evaluator's interface whose scores are the mean over ``orders``
    random orders of each history's same-timestamp runs (a seeded draw per call)."""

    def __init__(
        self,
        scorer,
        data,
        split: str,
        max_seq_len: int,
        orders: int,
        probabilities: bool,
        seed: int = 0,
        deletion_prob: float | None = None,
    ):
        import torch

        self.torch = torch
        self.scorer = scorer
        self.item_knn = None
        self.items = np.asarray(data.items)
        self.timestamps = np.asarray(data.timestamps)
        self.has_timestamps = bool(data.meta.get("has_timestamps", True))
        self.offsets = np.asarray(data.offsets)
        users, positions = data.eval_examples(split)
        self.target = dict(zip(users.tolist(), positions.tolist()))
        self.max_seq_len = max_seq_len
        self.orders = orders
        self.probabilities = probabilities
        self.rng = np.random.default_rng(seed)
        self.deletion_prob = deletion_prob  # None: reorder ties; else delete events instead

    def _reading(self, user: int) -> np.ndarray:
        """One random reading of a user's history: flat positions of its kept events."""
        end = self.target[user]
        if self.deletion_prob is None:
            span = np.arange(max(int(self.offsets[user]), end - self.max_seq_len), end)
            return span[np.lexsort((self.rng.random(len(span)), self.timestamps[span]))]  # ties shuffled
        span = np.arange(int(self.offsets[user]), end)
        if self.has_timestamps:  # ties in a random order too, as evaluation.tied_orders reads them
            span = span[np.lexsort((self.rng.random(len(span)), self.timestamps[span]))]
        keep = self.rng.random(len(span)) >= self.deletion_prob
        kept = span[keep] if keep.any() else span[-1:]
        return kept[-self.max_seq_len :]

    def full_sort_predict(self, user_ids, item_seq):
        torch = self.torch
        users = user_ids.tolist()
        total = None
        for _ in range(self.orders):
            spans = [self._reading(user) for user in users]
            rows = np.zeros((len(spans), max(1, max(len(s) for s in spans))), dtype=np.int64)
            for row, span in enumerate(spans):
                rows[row, : len(span)] = self.items[span]
            with torch.no_grad():
                scores = self.scorer.full_sort_predict(user_ids, torch.from_numpy(rows)).float()
            scores[:, 0] = -1e30  # padding (restored below)
            if self.probabilities:
                scores = torch.softmax(scores, dim=1)
            total = scores if total is None else total + scores
        if self.probabilities:
            total = total.clamp_min(1e-30).log()
        total[:, 0] = float("-inf")
        return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser)
    parser.add_argument("--orders", type=int, default=32, help="random orders averaged (>= 2)")
    parser.add_argument("--average", choices=("probability", "score"), default="probability")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="result file suffix (default: the data folder's name)")
    parser.add_argument("--reading", choices=("ties", "deletion"), default="ties",
                        help="what each reading varies: the order of tied events, or deleted events")
    parser.add_argument("--deletion_prob", type=float, default=0.2, help="with --reading deletion")
    args = parser.parse_args()
    if args.orders < 2:
        parser.error("--orders must be >= 2")
    if not 0 < args.deletion_prob < 1:
        parser.error("--deletion_prob must be in (0, 1)")
    deletion = args.deletion_prob if args.reading == "deletion" else None

    import torch

    from llm_recommender.checkpoint import load_checkpoint
    from llm_recommender.config import EvaluationConfig
    from llm_recommender.data.dataset import ProcessedData
    from llm_recommender.errors import LLMRecError
    from llm_recommender.evaluation.baselines import get_baseline
    from llm_recommender.evaluation.evaluator import evaluate

    torch.set_num_threads(args.threads)
    specs = parse_networks(parser, args.network, reserved=("item-kNN",))
    eval_config = EvaluationConfig()
    rows = {}
    try:
        data = ProcessedData(args.data_dir)
        if deletion is None and not data.meta.get("has_timestamps", True):
            sys.exit(f"error: {args.data_dir}: the data has no timestamps, so no ties to reorder")
        scorers = {}
        for name, path in specs.items():
            model, config, _ = load_checkpoint(path)
            model.attach_item_knn(None, 0.0)
            scorers[name] = (model, config.model.max_seq_len, args.average == "probability")
        baseline = "itemknn_with_valid" if args.split == "test" else "itemknn"
        scorers["item-kNN"] = (get_baseline(baseline, data, split=args.split), 50, False)
        for name, (scorer, max_len, probabilities) in scorers.items():
            plain = evaluate(scorer, data, args.split, eval_config, max_len, protocols=("full",))["full"]["NDCG@10"]
            averaged_scorer = TieOrderAverage(
                scorer, data, args.split, max_len, args.orders, probabilities, deletion_prob=deletion
            )
            averaged = evaluate(averaged_scorer, data, args.split, eval_config, max_len, protocols=("full",))
            value = averaged["full"]["NDCG@10"]
            rows[name] = {"file_order": round(plain, 4), f"mean_of_{args.orders}_orders": round(value, 4),
                          "ratio": round(value / plain, 3) if plain > 0 else None}
            what = "orders" if deletion is None else "readings with deletions"
            print(f"{name:<12} {args.split} full NDCG@10: file order {plain:.4f}, mean of {args.orders} {what} "
                  f"{value:.4f} ({rows[name]['ratio']}x)")
    except LLMRecError as exc:
        sys.exit(f"error: {exc}")
    write_result(
        f"tie_orders_{args.name or Path(args.data_dir).name}",
        {"split": args.split, "orders": args.orders, "reading": args.reading,
         "deletion_prob": deletion, "average": args.average, "data_dir": str(args.data_dir),
         "networks": {k: str(v) for k, v in specs.items()}, "item_knn": baseline, "results": rows,
         "command": " ".join(sys.argv), "machine": machine()},
    )


if __name__ == "__main__":
    main()
