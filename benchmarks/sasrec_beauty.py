"""The reference SASRec models trained on Beauty and evaluated by our evaluator (same candidates).

    python benchmarks/sasrec_beauty.py --recipe ce  [--threads 1] [--item-knn] [--refit]
    python benchmarks/sasrec_beauty.py --recipe bce [--threads 1] [--item-knn] [--refit]

``--recipe ce`` is the strongest public SASRec on this file, as MTandHJ/CE-SCE-LLMRec ran it
(``SASRec/benchmarks/beauty-ce-5``): width 64, 2 blocks, 1 head, dropout 0.6, the exact
cross-entropy over all items, Adam 5e-4 (betas 0.9/0.999, weight decay 1e-8), batch 512,
200 epochs, validation on full ranking every 5 epochs, the best validation NDCG@10 kept.
Its public test figure: full NDCG@10 0.0597, HR@10 0.0986 (mean of 5 seeds).
``--recipe bce`` is SASRec.pytorch (pmixer): width 50, 2 blocks, 1 head, dropout 0.5 as the
SASRec paper uses on Beauty, binary cross-entropy with one negative, Adam 1e-3, batch 128,
validation on the sampled protocol (as SASRec.pytorch validates).

Both models read the last 50 items left-padded to exactly 50 (the most recent item at the
position training put it: benchmarks/sasrec_reference.py). The run stops at ``--epochs`` (or
after ``--patience`` validations without improvement), never on wall-clock time, and reports
the test metrics of the best validated model under both protocols. Writes
benchmarks/results/sasrec_beauty_<recipe>[_item_knn][_refit].json.
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
from sasrec_reference import SASRec, SASRecSampler, ShuffledEpochs  # noqa: E402

from llm_recommender.config import EvaluationConfig, ItemKNNConfig  # noqa: E402
from llm_recommender.data.dataset import ProcessedData  # noqa: E402
from llm_recommender.evaluation.evaluator import evaluate  # noqa: E402

RECIPES = {
    # hidden, dropout, lr, betas, weight decay, batch, epochs, validation protocol
    "ce": dict(hidden=64, dropout=0.6, lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-8, batch=512, epochs=200,
               protocol="full"),
    "bce": dict(hidden=50, dropout=0.5, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0, batch=128, epochs=200,
                protocol="sampled"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="ce")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap (default: the recipe's, 200)")
    parser.add_argument("--patience", type=int, default=0,
                        help="stop after this many validations without a better NDCG@10 (0: run every epoch)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=None, help="default: the recipe's")
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
    recipe = dict(RECIPES[args.recipe])
    if args.dropout is not None:
        recipe["dropout"] = args.dropout
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = ProcessedData(preprocessed_beauty(work))
    eval_config = EvaluationConfig()
    protocol = recipe["protocol"]
    torch.manual_seed(args.seed)
    trainer = Trainer(data, args.recipe, recipe, args.seed)
    started = time.time()
    best = (-1.0, 0, None)
    history = []
    bad = 0
    for epoch in range(1, recipe["epochs"] + 1):
        loss = trainer.epoch()
        if epoch % args.eval_every == 0 or epoch == recipe["epochs"]:
            trainer.model.eval()
            valid = evaluate(trainer.model, data, "valid", eval_config, 50, protocols=(protocol,))[protocol]
            history.append({"epoch": epoch, "train_seconds": round(trainer.seconds, 1), "train_loss": round(loss, 5),
                            "valid_NDCG@10": valid["NDCG@10"], "valid_HR@10": valid["HR@10"]})
            print(f"epoch {epoch:4d} ({trainer.seconds:6.0f}s) loss {loss:.4f} valid {protocol} NDCG@10 "
                  f"{valid['NDCG@10']:.4f} HR@10 {valid['HR@10']:.4f}", flush=True)
            if valid["NDCG@10"] > best[0]:
                best, bad = (valid["NDCG@10"], epoch, copy.deepcopy(trainer.model.state_dict())), 0
            else:
                bad += 1
                if args.patience and bad >= args.patience:
                    break
    model = trainer.model
    model.load_state_dict(best[2])
    model.eval()
    test = evaluate(model, data, "test", eval_config, 50)
    print(f"SASRec (best epoch {best[1]}): test sampled NDCG@10 {test['sampled']['NDCG@10']:.4f} "
          f"HR@10 {test['sampled']['HR@10']:.4f}; full NDCG@10 {test['full']['NDCG@10']:.4f} "
          f"HR@10 {test['full']['HR@10']:.4f}", flush=True)
    fused = fuse_item_knn(model, data, eval_config) if args.item_knn else None
    if fused is not None:
        print(f"SASRec + item_knn (weight {fused['weight']:g}): test sampled NDCG@10 "
              f"{fused['test']['sampled']['NDCG@10']:.4f} full {fused['test']['full']['NDCG@10']:.4f}", flush=True)
    refit = None
    if args.refit:
        # As stage_a.refit_on_valid: from scratch, same seed, on training + validation events,
        # for the epoch count validation chose; then test alone and with the neighbours.
        torch.manual_seed(args.seed)
        refit_trainer = Trainer(ProcessedData(data.path, train_through="valid"), args.recipe, recipe, args.seed)
        for _ in range(best[1]):
            refit_trainer.epoch()
        refit_model = refit_trainer.model.eval()
        alone = evaluate(refit_model, data, "test", eval_config, 50)
        refit = {"epochs": best[1], "train_seconds": round(refit_trainer.seconds, 1), "test": _figures(alone)}
        if fused is not None:
            from llm_recommender.models.item_knn import ItemCooccurrence

            table = ItemCooccurrence.from_config(data, include_valid=True, settings=ItemKNNConfig())
            both = evaluate(_Fused(refit_model, table, fused["weight"]), data, "test", eval_config, 50)
            refit["test_with_item_knn"] = _figures(both)
    result = {
        "benchmark": "sasrec_beauty",
        "recipe": args.recipe,
        "model": f"reference SASRec (benchmarks/sasrec_reference.py, variant {trainer.variant}), "
                 f"{'CE over all items' if args.recipe == 'ce' else 'BCE, one negative'}, width {recipe['hidden']}, "
                 "2 blocks, 1 head",
        "settings": {k: v for k, v in recipe.items()},
        "seed": args.seed,
        "epochs_run": history[-1]["epoch"],
        "best_epoch": best[1],
        "best_valid_NDCG@10": best[0],
        "validation_protocol": protocol,
        "train_seconds": round(trainer.seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "threads": args.threads,
        "history": history,
        "test": _figures(test),
        "with_item_knn": fused,
        "refit": refit,
        "machine": machine(),
        "command": "python benchmarks/sasrec_beauty.py " + " ".join(sys.argv[1:]),
    }
    if refit is not None:
        print(f"SASRec refit ({best[1]} epochs on train + valid): test sampled NDCG@10 "
              f"{refit['test']['sampled']['NDCG@10']:.4f} full {refit['test']['full']['NDCG@10']:.4f}"
              + (f"; + item_knn {refit['test_with_item_knn']['sampled']['NDCG@10']:.4f} full "
                 f"{refit['test_with_item_knn']['full']['NDCG@10']:.4f}" if fused else ""))
    suffix = ("_item_knn" if args.item_knn else "") + ("_refit" if args.refit else "")
    write_result(f"sasrec_beauty_{args.recipe}" + suffix, result)


class Trainer:
    """One recipe's model, optimizer and data source over ``data``'s training sequences."""

    def __init__(self, data: ProcessedData, name: str, recipe: dict, seed: int) -> None:
        self.variant = "ce" if name == "ce" else "pmixer"
        self.recipe = recipe
        self.model = SASRec(data.num_items, hidden=recipe["hidden"], num_blocks=2, num_heads=1,
                            dropout=recipe["dropout"], max_len=50, variant=self.variant)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=recipe["lr"], betas=recipe["betas"],
                                          weight_decay=recipe["weight_decay"])
        sequences = [data.train_sequence(u) for u in range(1, data.num_users + 1)]
        if name == "ce":
            self.source = ShuffledEpochs(sequences, 50, seed)
        else:
            self.sampler = SASRecSampler(sequences, data.num_items, 50, seed)
            self.steps = data.num_users // recipe["batch"]
        self.seconds = 0.0

    def _batches(self):
        if self.variant == "ce":
            yield from self.source.epoch(self.recipe["batch"])
        else:
            for _ in range(self.steps):
                yield tuple(torch.from_numpy(x) for x in self.sampler.batch(self.recipe["batch"]))

    def epoch(self) -> float:
        """One epoch; returns the mean training loss."""
        started = time.perf_counter()
        self.model.train()
        total, count = 0.0, 0
        for batch in self._batches():
            loss = self.model.loss_ce(*batch) if self.variant == "ce" else self.model.loss_bce(*batch)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
            count += 1
        self.seconds += time.perf_counter() - started
        return total / max(1, count)


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
