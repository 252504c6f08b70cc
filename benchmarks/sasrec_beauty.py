"""The reference SASRec trained on Beauty and evaluated by our evaluator (same candidates).

    python benchmarks/sasrec_beauty.py [--minutes 30] [--epochs 200] [--threads 2] [--item-knn] [--refit]

Trains benchmarks/sasrec_reference.py (SASRec.pytorch's model and defaults: width 50,
2 blocks, 1 head, dropout 0.5 as the SASRec paper uses on Beauty, BCE with one negative,
Adam 1e-3, batch 128, length 50) for a wall-clock budget, validates every 5 epochs on the
validation split (sampled 1+100, the candidates our models get), keeps the best, and reports
its test metrics under both protocols. Writes benchmarks/results/sasrec_beauty.json: the
SASRec row of the results table, measured on this machine by this command.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, preprocessed_beauty, write_result  # noqa: E402
from sasrec_reference import SASRec, SASRecSampler  # noqa: E402

from llm_recommender.config import EvaluationConfig, ItemKNNConfig  # noqa: E402
from llm_recommender.data.dataset import ProcessedData  # noqa: E402
from llm_recommender.evaluation.evaluator import evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget (validation excluded)")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--item-knn", action="store_true",
                        help="also report SASRec + the item co-occurrence neighbours (model.item_knn's defaults), "
                             "fused as config/beauty.yaml fuses them: weight picked on validation")
    parser.add_argument("--refit", action="store_true",
                        help="also train again from scratch on training + validation events for the best epoch "
                             "count (as stage_a.refit_on_valid) and report its test figures")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "llmrec-bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = ProcessedData(preprocessed_beauty(work))
    eval_config = EvaluationConfig()
    model, optimizer, sampler = build(data, args)
    steps_per_epoch = data.num_users // 128
    started = time.time()
    train_seconds = 0.0
    best = (-1.0, 0, None)
    history = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = train_epoch(model, optimizer, sampler, steps_per_epoch)
        train_seconds += time.perf_counter() - t0
        out_of_time = train_seconds > args.minutes * 60
        if epoch % args.eval_every == 0 or out_of_time or epoch == args.epochs:
            valid = evaluate(model, data, "valid", eval_config, 50, protocols=("sampled",))["sampled"]
            history.append({"epoch": epoch, "train_seconds": round(train_seconds, 1), "valid_NDCG@10": valid["NDCG@10"],
                            "valid_HR@10": valid["HR@10"]})
            print(f"epoch {epoch:4d} ({train_seconds:6.0f}s) loss {float(loss):.4f} valid NDCG@10 "
                  f"{valid['NDCG@10']:.4f} HR@10 {valid['HR@10']:.4f}", flush=True)
            if valid["NDCG@10"] > best[0]:
                best = (valid["NDCG@10"], epoch, copy.deepcopy(model.state_dict()))
        if out_of_time:
            break
    model.load_state_dict(best[2])
    model.eval()
    test = evaluate(model, data, "test", eval_config, 50)
    fused = fuse_item_knn(model, data, eval_config) if args.item_knn else None
    refit = None
    if args.refit:
        # As stage_a.refit_on_valid: from scratch, same seed, on training + validation events,
        # for the epoch count validation chose; then test alone and with the neighbours.
        torch.manual_seed(args.seed)
        refit_model, refit_optimizer, refit_sampler = build(ProcessedData(data.path, train_through="valid"), args)
        t0 = time.perf_counter()
        for _ in range(best[1]):
            train_epoch(refit_model, refit_optimizer, refit_sampler, steps_per_epoch)
        refit_seconds = time.perf_counter() - t0
        refit_model.eval()
        alone = evaluate(refit_model, data, "test", eval_config, 50)
        refit = {"epochs": best[1], "train_seconds": round(refit_seconds, 1), "test": _figures(alone)}
        if fused is not None:
            from llm_recommender.models.item_knn import ItemCooccurrence

            table = ItemCooccurrence.from_config(data, include_valid=True, settings=ItemKNNConfig())
            both = evaluate(_Fused(refit_model, table, fused["weight"]), data, "test", eval_config, 50)
            refit["test_with_item_knn"] = _figures(both)
    result = {
        "benchmark": "sasrec_beauty",
        "model": "reference SASRec (benchmarks/sasrec_reference.py), BCE, width 50, 2 blocks, 1 head",
        "dropout": args.dropout,
        "seed": args.seed,
        "budget_minutes": args.minutes,
        "epochs_run": history[-1]["epoch"],
        "best_epoch": best[1],
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "threads": args.threads,
        "history": history,
        "test": {p: {k: v for k, v in test[p].items() if isinstance(v, (int, float, list))} for p in ("sampled", "full")},
        "with_item_knn": fused,
        "refit": refit,
        "machine": machine(),
        "command": "python benchmarks/sasrec_beauty.py " + " ".join(sys.argv[1:]),
    }
    print(f"test sampled NDCG@10 {test['sampled']['NDCG@10']:.4f} HR@10 {test['sampled']['HR@10']:.4f}; "
          f"full NDCG@10 {test['full']['NDCG@10']:.4f} HR@10 {test['full']['HR@10']:.4f} (best epoch {best[1]})")
    if fused is not None:
        print(f"SASRec + item_knn (weight {fused['weight']:g}): test sampled NDCG@10 "
              f"{fused['test']['sampled']['NDCG@10']:.4f}; full NDCG@10 {fused['test']['full']['NDCG@10']:.4f}")
    if refit is not None:
        print(f"SASRec refit ({best[1]} epochs on train + valid): test sampled NDCG@10 "
              f"{refit['test']['sampled']['NDCG@10']:.4f}"
              + (f"; + item_knn {refit['test_with_item_knn']['sampled']['NDCG@10']:.4f}" if fused else ""))
    suffix = ("_item_knn" if args.item_knn else "") + ("_refit" if args.refit else "")
    write_result("sasrec_beauty" + suffix, result)


def build(data, args):
    """SASRec, its optimizer and its sampler over ``data``'s training sequences."""
    model = SASRec(data.num_items, hidden=50, num_blocks=2, num_heads=1, dropout=args.dropout, max_len=50)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    sampler = SASRecSampler([data.train_sequence(u) for u in range(1, data.num_users + 1)], data.num_items, 50, args.seed)
    return model, optimizer, sampler


def train_epoch(model, optimizer, sampler, steps: int) -> torch.Tensor:
    model.train()
    for _ in range(steps):
        seq, pos, neg = (torch.from_numpy(x) for x in sampler.batch(128))
        loss = model.loss(seq, pos, neg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.detach()


def _figures(result: dict) -> dict:
    return {p: {k: v for k, v in result[p].items() if isinstance(v, (int, float, list))} for p in ("sampled", "full")}


class _Fused:
    """A scorer: SASRec's scores + weight * the neighbours' votes (as StageAModel fuses them)."""

    def __init__(self, model, table, weight: float) -> None:
        self.model, self.table, self.weight = model, table, weight

    def full_sort_predict(self, user_ids, item_seq):
        return self.model.full_sort_predict(user_ids, item_seq) + self.weight * self.table.full_scores(item_seq)

    def predict_candidates(self, user_ids, item_seq, candidates):
        scores = self.model.predict_candidates(user_ids, item_seq, candidates)
        return scores + self.weight * self.table.candidate_scores(item_seq, candidates)


def fuse_item_knn(model, data, eval_config) -> dict:
    """Weight picked on validation (train-only table), test with the train+valid table."""
    from llm_recommender.models.item_knn import ItemCooccurrence

    knn = ItemKNNConfig()
    train_only = ItemCooccurrence.from_config(data, include_valid=False, settings=knn)
    by_weight = {}
    for weight in knn.weight_grid:
        valid = evaluate(_Fused(model, train_only, weight), data, "valid", eval_config, 50, protocols=("sampled",))
        by_weight[weight] = valid["sampled"]["NDCG@10"]
    best = max(by_weight, key=lambda w: (by_weight[w], -w))
    with_valid = ItemCooccurrence.from_config(data, include_valid=True, settings=knn)
    test = evaluate(_Fused(model, with_valid, best), data, "test", eval_config, 50)
    return {
        "weight": best,
        "valid_NDCG@10_by_weight": {f"{w:g}": v for w, v in by_weight.items()},
        "test": {p: {k: v for k, v in test[p].items() if isinstance(v, (int, float, list))} for p in ("sampled", "full")},
    }


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
