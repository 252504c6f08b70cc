#!/usr/bin/env python
"""GPU throughput and model FLOPs utilisation at Kindle scale (issue 6). Run it via benchmarks/gpu.sh.

On one NVIDIA GPU, for a GPT-2-small-shaped (12 layers, width 768) and a Qwen2-0.5B-shaped
(24 layers, width 896, 14 heads, 2 KV heads, MLP 4864) backbone, random init, fully fine-tuned,
with the Kindle-scale tables (349K items x d_rec 128, 100K users):

- training steps (StageAModel.calculate_loss, backward, the trainer's optimizers from
  ``build_optimizers``: AdamW) under bf16 autocast with fp32 weights (what ``accelerate``'s
  ``mixed_precision=bf16`` does), cross-entropy ``sampled`` (8,192 shared negatives, log-Q)
  and ``full`` (exact softmax over all 349K items, chunked); the BPR terms off, so that the
  step is the main loss. Batches (B windows of 50 items + the user token, no padding) are
  built by the package's TrainWindows and put on the GPU before the clock starts: data
  loading is not in these figures. Times are CUDA-event times of ``--steps`` steps after
  ``--warmup`` steps.
- MFU = model FLOPs per second / the GPU's dense bf16 peak (datasheet table below). Model
  FLOPs per step, fwd + bwd (PaLM, appendix B): ``6 * N * tokens`` with N the non-embedding
  parameters (backbone layers + the d_rec<->d_model projections), plus attention
  ``12 * layers * d_model * S`` per token (causal masking not discounted), plus scoring
  ``6 * d_rec * C`` per target position (C = 1 + 8,192 sampled, or all 349K items for full CE;
  the chunked backward's recomputation of logits is not counted: that is hardware FLOPs).
  Table lookups and the optimizer count zero. The measured bf16 matmul rate (8192^3) is
  reported beside the datasheet peak.
- evaluation: ``evaluate()`` of the package (the same function the CLI runs) on a synthetic
  processed dataset of 100K users x 349K items (benchmarks/eval_scale.py's generator), every
  user, sampled (1+100) and full ranking, fp32 weights with TF32 matmuls, 1,024 users a batch.

Peak dense bf16 (TFLOP/s, NVIDIA datasheets, without sparsity): H200 / H100 SXM / GH200 989,
H100 NVL 835, H100 PCIe 756, A100 312, L40S 362, L4 121. Unknown GPUs: ``--peak-tflops``.

    benchmarks/gpu.sh                       # on the GPU machine (about 5 minutes on an H100/H200)
    python benchmarks/gpu_bench.py --dry-run    # tiny shapes on the CPU: checks it runs end to end

Writes benchmarks/results/gpu.json (``--dry-run``: /tmp/llmrec_gpu_dry_run.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init from the built-in shapes; nothing to fetch

from llm_recommender.config import EvaluationConfig, load_config  # noqa: E402

PEAK_BF16_TFLOPS = (  # first match of the device name wins
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H200", 989.0), ("GH200", 989.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
SHAPES = {
    "gpt2_small": ["model.base_llm=gpt2"],  # 12 layers, 768, 12 heads (built-in shape)
    "qwen2_0.5b": ["model.base_llm=Qwen/Qwen2-0.5B"],  # 24 layers, 896, 14 heads, 2 KV heads, MLP 4864
    "sasrec_size": ["model.base_llm=gpt2", "model.num_layers=2", "model.hidden_size=64", "model.num_heads=2",
                    "model.intermediate_size=256"],
}
DRY_RUN_SHAPE = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128"]
COMMON = ["model.random_init_stage_a_llm=true", "model.finetune=full", "model.max_seq_len=50",
          "model.embedding_dim=128", "stage_a.collaborative.use_bpr_loss=false", "embeddings.sparse=false"]


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device: torch.device, size: int) -> float:
    """bf16 ``size^3`` matmul rate (mean of 10 after 3 warm-ups)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * size**3 * 10 / (time.perf_counter() - started) / 1e12


def non_embedding_parameters(model) -> int:
    """Parameters multiplied per token: backbone layers and the projections (no tables, no wte/wpe)."""
    total = 0
    embedding_ids = {id(model.backbone.get_input_embeddings().weight)}
    wpe = getattr(model.backbone, "wpe", None)
    if wpe is not None:
        embedding_ids.add(id(wpe.weight))
    for param in model.backbone.parameters():
        if id(param) not in embedding_ids:
            total += param.numel()
    emb = model.embeddings
    # Each token goes through one input projection (user or item), and every state through out_proj.
    total += emb.item_proj.weight.numel() + model.out_proj.weight.numel()
    return total


def step_flops(model, config, tokens: int, targets: int, num_items: int) -> dict:
    backbone = model.backbone.config
    layers, width = backbone.num_hidden_layers, backbone.hidden_size
    seq = config.model.max_seq_len + 1
    d_rec = config.model.embedding_dim
    params = non_embedding_parameters(model)
    candidates = config.stage_a.ce.num_sampled + 1 if config.stage_a.ce.mode == "sampled" else num_items
    parts = {
        "dense": 6 * params * tokens,
        "attention": 12 * layers * width * seq * tokens,
        "scoring": 6 * d_rec * candidates * targets,
    }
    return {"non_embedding_parameters": params, "flops_per_step": sum(parts.values()),
            "flops_share": {k: round(v / sum(parts.values()), 4) for k, v in parts.items()}}


def full_windows(data, max_seq_len: int, batch: int, count: int, device: torch.device) -> list[dict]:
    """``count`` batches of full-length training windows (no padding), on the device."""
    from llm_recommender.data.dataset import TrainWindows

    windows = TrainWindows(data, max_seq_len, True)
    full = np.flatnonzero(np.asarray(windows.lengths) >= max_seq_len + 1)  # 50 inputs + 1 target
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        picked = np.sort(rng.choice(full, size=batch, replace=False))
        batches.append({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in windows.batch(picked).items()})
    return batches


def train_run(shape: str, overrides: list[str], ce_mode: str, batch: int, data, args, device, peak) -> dict:
    from llm_recommender.models.stage_a_model import StageAModel
    from llm_recommender.trainers.stage_a_trainer import build_optimizers

    ce = [f"stage_a.ce.mode={ce_mode}", f"stage_a.ce.num_sampled={args.num_sampled}",
          f"stage_a.ce.chunk_memory_mb={args.chunk_memory_mb}"]
    config = load_config(None, [*COMMON, *overrides, *ce, f"stage_a.batch_size={batch}"])
    torch.manual_seed(0)
    started = time.perf_counter()
    with device:  # parameters are created on the GPU: no CPU init of 0.5B weights
        model = StageAModel(config, data.num_users, data.num_items)
    model.set_item_sampling_distribution(torch.from_numpy(data.item_popularity()))
    model.to(device).train()
    optimizers = build_optimizers(model, config)
    build_seconds = time.perf_counter() - started
    batches = full_windows(data, config.model.max_seq_len, batch, args.warmup + args.steps, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(b: dict) -> None:
        with autocast:
            loss = model.calculate_loss(b)["loss"]
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for b in batches[: args.warmup]:
        step(b)
    sync(device)
    started = time.perf_counter()
    for b in batches[args.warmup :]:
        step(b)
    sync(device)
    seconds = (time.perf_counter() - started) / args.steps
    first = batches[0]
    tokens = int(first["item_seq"].numel() + first["user_ids"].numel())
    targets = int((first["targets"] != 0).sum())
    flops = step_flops(model, config, tokens, targets, data.num_items)
    achieved = flops["flops_per_step"] / seconds
    result = {
        "shape": shape, "ce_mode": ce_mode, "batch_size": batch, "tokens_per_step": tokens,
        "target_positions_per_step": targets, "step_ms": round(seconds * 1000, 2),
        "tokens_per_second": round(tokens / seconds, 1), "sequences_per_second": round(batch / seconds, 1),
        "model_tflops_per_second": round(achieved / 1e12, 2),
        "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
        "build_seconds": round(build_seconds, 1),
        "backbone": {"layers": model.backbone.config.num_hidden_layers, "width": model.backbone.config.hidden_size,
                     "heads": model.backbone.config.num_attention_heads,
                     "kv_heads": getattr(model.backbone.config, "num_key_value_heads", None)},
        **flops,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(f"train {shape:11s} ce={ce_mode:7s} batch {batch:4d}: {result['step_ms']:8.1f} ms/step, "
          f"{result['tokens_per_second']:>12,.0f} tokens/s, {result['model_tflops_per_second']:7.1f} TFLOP/s"
          + (f", MFU {result['mfu']:.1%}" if result["mfu"] is not None else ""), flush=True)
    del model, optimizers, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def eval_run(shape: str, overrides: list[str], data, candidates, args, device) -> dict:
    from llm_recommender.evaluation.evaluator import evaluate
    from llm_recommender.models.stage_a_model import StageAModel

    config = load_config(None, [*COMMON, *overrides])
    torch.manual_seed(0)
    with device:
        model = StageAModel(config, data.num_users, data.num_items)
    model.to(device).eval()
    eval_config = EvaluationConfig(batch_size=args.eval_batch_size)
    result = evaluate(model, data, "test", eval_config, config.model.max_seq_len, protocols=("sampled", "full"),
                      candidates=candidates, device=device, cache_candidates=False)
    out = {"shape": shape, "num_users": result["num_users"], "num_items": data.num_items,
           "batch_size": args.eval_batch_size}
    for protocol in ("sampled", "full"):
        out[protocol] = {"seconds": result[protocol]["seconds"], "users_per_second": result[protocol]["users_per_second"]}
    print(f"eval  {shape:11s}: {out['num_users']} users, sampled {out['sampled']['seconds']:.1f} s "
          f"({out['sampled']['users_per_second']:,.0f} users/s), full ranking over {data.num_items:,} items "
          f"{out['full']['seconds']:.1f} s ({out['full']['users_per_second']:,.0f} users/s)", flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and data on the CPU (checks the script)")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=349_000)
    parser.add_argument("--shapes", default="gpt2_small,qwen2_0.5b")
    parser.add_argument("--ce-modes", default="sampled,full")
    parser.add_argument("--batch-sizes", default="64,256", help="training windows per step (x 51 tokens)")
    parser.add_argument("--num-sampled", type=int, default=8192)
    parser.add_argument("--chunk-memory-mb", type=float, default=4096.0, help="full CE: logits held per chunk")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-shapes", default="sasrec_size,gpt2_small,qwen2_0.5b")
    parser.add_argument("--eval-batch-size", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak when the GPU is not in the table")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from eval_scale import write_synthetic

    from llm_recommender.evaluation.evaluator import sample_candidates

    if args.dry_run:
        device = torch.device("cpu")
        args.users, args.items = min(args.users, 600), min(args.items, 3000)
        args.steps, args.warmup, args.batch_sizes = 2, 1, "4"
        args.num_sampled, args.eval_batch_size = 256, 128
        shapes = {name: [*SHAPES[name][:1], *DRY_RUN_SHAPE] for name in SHAPES}
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device visible to torch (use --dry-run to check the script on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True  # evaluation runs fp32 weights
        torch.backends.cudnn.allow_tf32 = True
        shapes = SHAPES
    output = Path(args.output) if args.output else (
        Path(tempfile.gettempdir()) / "llmrec_gpu_dry_run.json" if args.dry_run else ROOT / "benchmarks" / "results" / "gpu.json")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(name, args.peak_tflops) if device.type == "cuda" else None
    started_all = time.perf_counter()
    report: dict = {
        "benchmark": "gpu", "device": name, "dry_run": args.dry_run, "torch": torch.__version__,
        "cuda": torch.version.cuda, "peak_bf16_dense_tflops": peak, "peak_table_tflops": dict(PEAK_BF16_TFLOPS),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "matmul_size": 8192 if device.type == "cuda" else 512,
    }
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    report["measured_matmul_tflops"] = round(measured_matmul_tflops(device, report["matmul_size"]), 1)
    print(f"device {name}: datasheet dense bf16 peak {peak} TFLOP/s, measured bf16 matmul "
          f"{report['measured_matmul_tflops']} TFLOP/s", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="llmrec_gpu_bench_"))
    try:
        t0 = time.perf_counter()
        data = write_synthetic(folder, args.users, args.items, 80.0, seed=0)
        report["data"] = {"num_users": data.num_users, "num_items": data.num_items,
                          "num_interactions": data.num_interactions, "build_seconds": round(time.perf_counter() - t0, 1)}
        print(f"data: {data.num_users:,} users, {data.num_items:,} items, {data.num_interactions:,} events", flush=True)

        report["train"] = []
        for shape in [s for s in args.shapes.split(",") if s]:
            for ce_mode in [m for m in args.ce_modes.split(",") if m]:
                for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
                    report["train"].append(train_run(shape, shapes[shape], ce_mode, batch, data, args, device, peak))

        t0 = time.perf_counter()
        candidates = sample_candidates(data, "test", 100, "uniform", 2024)
        report["candidate_sampling_seconds"] = round(time.perf_counter() - t0, 1)
        report["evaluation"] = [eval_run(shape, shapes[shape], data, candidates, args, device)
                                for shape in [s for s in args.eval_shapes.split(",") if s]]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["total_seconds"] = round(time.perf_counter() - started_all, 1)
    qwen = [r["mfu"] for r in report["train"] if r["shape"] == "qwen2_0.5b" and r["mfu"] is not None]
    if qwen:
        report["best_qwen2_0.5b_mfu"] = max(qwen)
        report["meets_40pct_mfu_qwen2_0.5b"] = max(qwen) >= 0.40
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"total {report['total_seconds']:.0f} s; wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
