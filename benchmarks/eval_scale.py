"""Evaluator throughput and memory at Kindle scale (issue 6): 100K users × 349K items.

Builds a synthetic processed dataset of that shape (log-normal sequence lengths, mean ~80
events, Zipf-like item popularity: ~8M events), a random-embedding dot-product scorer of
width 64, and runs both protocols on every user. The baseline measured in the same process
is the scorer alone (``full_sort_predict`` on a sample of users, nothing else): the ratio
says how much the evaluator adds on top of the model's own scoring.

    python benchmarks/eval_scale.py                       # Kindle scale, both protocols
    python benchmarks/eval_scale.py --users 20000 --items 50000   # quicker

Writes benchmarks/results/eval_scale.json and prints users/s and peak RSS.

On glibc, every (batch × items) score matrix above 32 MB is a fresh mmap whose pages are
faulted in and zeroed on each batch; ``MALLOC_MMAP_THRESHOLD_=4294967296`` (and a large
``MALLOC_TRIM_THRESHOLD_``) makes the allocator reuse that memory, which about halved the
time of the scorer and of the full protocol here. The setting is recorded in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llm_recommender.config import EvaluationConfig  # noqa: E402
from llm_recommender.data.dataset import ProcessedData  # noqa: E402
from llm_recommender.evaluation.evaluator import evaluate, sample_candidates  # noqa: E402
from llm_recommender.io_utils import atomic_write_json  # noqa: E402


def cpu_seconds() -> float:
    """This process's user + system CPU time: less sensitive to other load than wall time."""
    times = os.times()
    return times.user + times.system


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def write_synthetic(folder: Path, num_users: int, num_items: int, mean_length: float, seed: int) -> ProcessedData:
    """A processed folder (docs/data_format.md) with leave-one-out labels."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    lengths = np.maximum(5, rng.lognormal(np.log(mean_length) - sigma**2 / 2, sigma, num_users)).astype(np.int64)
    total = int(lengths.sum())
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    cdf = np.cumsum(popularity / popularity.sum())
    items = (np.searchsorted(cdf, rng.random(total), side="right") + 1).clip(max=num_items)
    items = rng.permutation(num_items + 1)[1:][items - 1].astype(np.int32)  # popular ids scattered
    items[items == 0] = 1
    offsets = np.concatenate([[0, 0], np.cumsum(lengths)]).astype(np.int64)
    labels = np.zeros(total, dtype=np.uint8)
    labels[offsets[2:] - 1] = 2
    labels[offsets[2:] - 2] = 1
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "seq_offsets.npy", offsets)
    np.save(folder / "seq_items.npy", items)
    np.save(folder / "seq_timestamps.npy", np.arange(total, dtype=np.int64))
    np.save(folder / "seq_split.npy", labels)
    (folder / "user_ids.txt").write_text("".join(f"u{i}\n" for i in range(num_users)))
    (folder / "item_ids.txt").write_text("".join(f"i{i}\n" for i in range(num_items)))
    meta = {"format_version": 1, "num_users": num_users, "num_items": num_items, "num_interactions": total,
            "source": {"sha256": "synthetic"}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return ProcessedData(folder)


class DotProductScorer:
    """Random user and item vectors; score = <user, item>."""

    def __init__(self, num_users: int, num_items: int, dim: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.users = torch.randn(num_users + 1, dim, generator=generator)
        self.items = torch.randn(num_items + 1, dim, generator=generator)

    def full_sort_predict(self, user_ids, item_seq):
        return self.users[user_ids] @ self.items.T  # (B, I+1)

    def predict_candidates(self, user_ids, item_seq, candidates):
        return torch.einsum("bd,bcd->bc", self.users[user_ids], self.items[candidates])  # (B, C)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=349_000)
    parser.add_argument("--mean-length", type=float, default=80.0)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline-users", type=int, default=5000, help="users scored by the bare scorer")
    parser.add_argument("--protocols", default="sampled,full")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "eval_scale.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp(prefix="llmrec_eval_scale_"))
    try:
        started = time.perf_counter()
        data = write_synthetic(folder, args.users, args.items, args.mean_length, seed=0)
        build_seconds = time.perf_counter() - started
        scorer = DotProductScorer(args.users, args.items, args.dim)
        rss_before = peak_rss_gib()
        print(f"data: {data.num_users} users, {data.num_items} items, {data.num_interactions} events "
              f"({build_seconds:.1f} s); peak RSS so far {rss_before:.2f} GiB", flush=True)

        config = EvaluationConfig(batch_size=args.batch_size)
        started = time.perf_counter()
        candidates = sample_candidates(data, "test", config.num_negatives, "uniform", config.seed)
        sampling_seconds = time.perf_counter() - started
        print(f"candidates 1+{config.num_negatives} uniform: {sampling_seconds:.1f} s "
              f"({len(candidates) / sampling_seconds:,.0f} users/s)", flush=True)

        # Baseline in the same process: the scorer alone on the first users, nothing else.
        users, _ = data.eval_examples("test")
        sample = torch.from_numpy(users[: args.baseline_users])
        dummy_seq = torch.zeros(args.batch_size, 1, dtype=torch.long)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        with torch.inference_mode():
            for start in range(0, len(sample), args.batch_size):
                batch = sample[start : start + args.batch_size]
                scorer.full_sort_predict(batch, dummy_seq[: len(batch)])
        bare_users_per_second = len(sample) / (time.perf_counter() - started)
        bare_cpu_per_user = (cpu_seconds() - cpu_started) / len(sample)
        print(f"bare scorer full_sort_predict: {bare_users_per_second:,.0f} users/s", flush=True)

        protocols = tuple(p for p in args.protocols.split(",") if p)
        result, cpu_per_user = {}, {}
        for protocol in protocols:
            cpu_started = cpu_seconds()
            result[protocol] = evaluate(scorer, data, "test", config, 50, protocols=(protocol,),
                                        candidates=candidates)[protocol]
            cpu_per_user[protocol] = (cpu_seconds() - cpu_started) / data.num_users
        report = {
            "num_users": data.num_users,
            "num_items": data.num_items,
            "num_interactions": data.num_interactions,
            "dim": args.dim,
            "batch_size": args.batch_size,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "malloc_mmap_threshold_env": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "candidate_sampling_seconds": round(sampling_seconds, 2),
            "candidate_sampling_users_per_second": round(len(candidates) / sampling_seconds, 1),
            "bare_scorer_full_users_per_second": round(bare_users_per_second, 1),
            "bare_scorer_full_cpu_ms_per_user": round(1000 * bare_cpu_per_user, 3),
            "peak_rss_gib_before_evaluation": round(rss_before, 3),
            "peak_rss_gib": round(peak_rss_gib(), 3),
        }
        for protocol in protocols:
            metrics = result[protocol]
            report[protocol] = {
                "seconds": metrics["seconds"],
                "users_per_second": metrics["users_per_second"],
                "NDCG@10": metrics["NDCG@10"],
                "HR@10": metrics["HR@10"],
                "cpu_ms_per_user": round(1000 * cpu_per_user[protocol], 3),
            }
            print(f"{protocol}: {metrics['seconds']:.1f} s, {metrics['users_per_second']:,.0f} users/s, "
                  f"NDCG@10 {metrics['NDCG@10']:.4f}", flush=True)
        if "full" in protocols:
            # Ratios against the scorer alone, in wall time and in this process's CPU time.
            report["full_vs_bare_scorer_wall_ratio"] = round(
                bare_users_per_second / result["full"]["users_per_second"], 2
            )
            report["full_vs_bare_scorer_cpu_ratio"] = round(cpu_per_user["full"] / bare_cpu_per_user, 2)
            print(f"full protocol / bare scorer: {report['full_vs_bare_scorer_wall_ratio']:.2f}x wall, "
                  f"{report['full_vs_bare_scorer_cpu_ratio']:.2f}x CPU time")
        print(f"peak RSS {report['peak_rss_gib']:.2f} GiB (load average {report['load_average_1min']:.1f})")
        atomic_write_json(args.output, report)
        print(f"wrote {args.output}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
