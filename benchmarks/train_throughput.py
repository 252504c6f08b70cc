"""Training throughput: our recipes vs a reference SASRec, measured in the same run.

    python benchmarks/train_throughput.py [--steps 174] [--rounds 3] [--threads 2]

On Amazon Beauty (../shared/data; skips cleanly without it). For each round it measures, in
turn, the reference SASRec (benchmarks/sasrec_reference.py: 2 blocks, width 50, BCE with one
negative, batch 128, length 50, Adam) and our recipes run through the real training loop
(``StageATrainer``: batch building, loss, backward, optimizer, logging). Medians over rounds;
interleaving keeps both sides under the same machine load. SASRec's batches are sampled
before its clock starts (its original sampler runs in worker processes), ours are built
inside the loop: the comparison is conservative for us.

Then a profile of one step of each recipe: data (batch building), backbone forward+backward,
scoring and losses forward+backward, optimizer step, so that the next optimisation is chosen
from a measurement.

Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, preprocessed_beauty, write_result  # noqa: E402
from sasrec_reference import SASRec, SASRecSampler  # noqa: E402

from llm_recommender.config import load_config  # noqa: E402
from llm_recommender.data.dataset import ProcessedData, TrainWindows, epoch_batches  # noqa: E402

RECIPES = {
    "sasrec_size": (REPO / "config" / "sasrec_size.yaml", []),
    "beauty": (REPO / "config" / "beauty.yaml", ["stage_a.max_train_minutes=null"]),
    "gpt2_4x256": (
        REPO / "config" / "sasrec_size.yaml",
        ["model.num_layers=4", "model.hidden_size=256", "model.num_heads=4", "model.intermediate_size=1024"],
    ),
}


def sasrec_sequences_per_second(data: ProcessedData, steps: int, batch_size: int = 128) -> float:
    """Sequences/s of the reference SASRec over ``steps`` steps (batches sampled beforehand)."""
    torch.manual_seed(0)
    model = SASRec(data.num_items, hidden=50, num_blocks=2, num_heads=1, dropout=0.5, max_len=50)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    sampler = SASRecSampler([data.train_sequence(u) for u in range(1, data.num_users + 1)], data.num_items, 50, 0)
    batches = [[torch.from_numpy(x) for x in sampler.batch(batch_size)] for _ in range(steps)]
    model.train()
    start = time.perf_counter()
    for seq, pos, neg in batches:
        loss = model.loss(seq, pos, neg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def ours_sequences_per_second(config, data_dir: Path, steps: int, work: Path) -> float:
    """Sequences/s of the real loop over ``steps`` optimizer steps (validation excluded).

    Batches are length-bucketed, so their cost varies a lot from one to the next: the rate
    is taken over the whole run (one epoch by default), not over a few steps.
    """
    from llm_recommender.trainers.stage_a_trainer import StageATrainer

    run = load_config_with(config, [
        f"stage_a.max_steps={steps}", f"stage_a.log_every_steps={steps}",
        "stage_a.eval_max_users=64", "stage_a.epochs=1000", "stage_a.patience=0",
    ])
    out = Path(tempfile.mkdtemp(dir=work))
    trainer = StageATrainer(run, data_dir, out)
    trainer.fit()
    (epoch,) = [e for e in trainer.history if e["kind"] == "epoch"]
    return epoch["step"] * run.stage_a.batch_size / epoch["epoch_seconds"]


def load_config_with(base, overrides):
    from llm_recommender.config import apply_overrides, config_from_dict

    return config_from_dict(apply_overrides(base.to_dict(), overrides), "benchmark")


def profile_step(config, data: ProcessedData, repeats: int = 10) -> dict[str, float]:
    """Milliseconds per step in data / backbone fwd+bwd / scoring+losses fwd+bwd / optimizer."""
    from llm_recommender.models.stage_a_model import StageAModel
    from llm_recommender.trainers.stage_a_trainer import build_optimizers

    torch.manual_seed(0)
    model = StageAModel(config, data.num_users, data.num_items)
    optimizers = build_optimizers(model, config)
    windows = TrainWindows(data, config.model.max_seq_len, config.model.use_user_token)
    batches = epoch_batches(windows.lengths, config.stage_a.batch_size, 0, 0, config.stage_a.length_bucketing)
    parts: dict[str, list[float]] = {"data": [], "backbone_fwd_bwd": [], "total_fwd_bwd": [], "optimizer": []}
    model.train()
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        batch = {k: torch.from_numpy(v) for k, v in windows.batch(batches[i % len(batches)]).items()}
        t1 = time.perf_counter()
        states = model(batch["user_ids"], batch["item_seq"])
        states.float().pow(2).mean().backward()
        t2 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        model.calculate_loss(batch)["loss"].backward()
        t4 = time.perf_counter()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if i >= 3:
            parts["data"].append(t1 - t0)
            parts["backbone_fwd_bwd"].append(t2 - t1)
            parts["total_fwd_bwd"].append(t4 - t3)
            parts["optimizer"].append(t5 - t4)
    med = {k: 1000 * statistics.median(v) for k, v in parts.items()}
    step = med["data"] + med["total_fwd_bwd"] + med["optimizer"]
    scoring = max(0.0, med["total_fwd_bwd"] - med["backbone_fwd_bwd"])
    return {
        "step_ms": round(step, 1),
        "data_ms": round(med["data"], 1),
        "backbone_fwd_bwd_ms": round(med["backbone_fwd_bwd"], 1),
        "scoring_and_losses_fwd_bwd_ms": round(scoring, 1),
        "optimizer_ms": round(med["optimizer"], 1),
        "share": {
            "data": round(med["data"] / step, 3),
            "backbone": round(med["backbone_fwd_bwd"] / step, 3),
            "scoring_and_losses": round(scoring / step, 3),
            "optimizer": round(med["optimizer"] / step, 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=174, help="steps per run (174 = one Beauty epoch at batch 128)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "llmrec-bench"))
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = preprocessed_beauty(work)
    data = ProcessedData(data_dir)
    configs = {
        name: load_config(path, overrides + [f"runtime.num_threads={args.threads}"])
        for name, (path, overrides) in RECIPES.items()
        if name in args.recipes
    }
    load_before = machine()
    speeds: dict[str, list[float]] = {"sasrec_reference": [], **{name: [] for name in configs}}
    for round_index in range(args.rounds):
        speeds["sasrec_reference"].append(sasrec_sequences_per_second(data, args.steps))
        for name, config in configs.items():
            speeds[name].append(ours_sequences_per_second(config, data_dir, args.steps, work))
        print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.0f} seq/s" for k, v in speeds.items()))
    medians = {k: statistics.median(v) for k, v in speeds.items()}
    reference = medians["sasrec_reference"]
    profiles = {name: profile_step(config, data) for name, config in configs.items()}
    result = {
        "benchmark": "train_throughput",
        "data": "amazon-beauty 5-core, leave-one-out",
        "threads": args.threads,
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "sequences_per_second": {k: round(v, 1) for k, v in medians.items()},
        "all_runs": {k: [round(x, 1) for x in v] for k, v in speeds.items()},
        "ratio_vs_sasrec": {k: round(v / reference, 3) for k, v in medians.items() if k != "sasrec_reference"},
        "profile": profiles,
        "machine_before": load_before,
        "machine_after": machine(),
    }
    print()
    print(f"reference SASRec: {reference:.0f} sequences/s")
    for name in configs:
        print(f"{name:12s}: {medians[name]:.0f} sequences/s  ratio vs SASRec {medians[name] / reference:.2f}x")
    for name, prof in profiles.items():
        share = prof["share"]
        print(f"profile {name}: step {prof['step_ms']} ms = data {share['data']:.0%}, backbone "
              f"{share['backbone']:.0%}, scoring+losses {share['scoring_and_losses']:.0%}, "
              f"optimizer {share['optimizer']:.0%}")
    print(f"load average before/after: {load_before['loadavg_1_5_15']} / {result['machine_after']['loadavg_1_5_15']}")
    write_result("train_throughput", result)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
