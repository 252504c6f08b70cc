#!/usr/bin/env python
"""The whole pipeline at the spec's Kindle scale, every stage timed with its peak memory (issue 6).

Each stage runs as a child process under ``/usr/bin/time -v``: wall seconds, peak RSS (of
the largest process of the stage), CPU share, and the machine's load average before it
(the machine is shared: other people's work slows every figure down).

  generate       ``llmrec generate --users 100000 --items 349000 --interactions 8000000
                 --min-item-events 5`` (cached in --work-dir). Without the floor the Zipf tail
                 of a 349K catalogue is mostly never drawn and the 5-core keeps ~216K items;
                 with it every item has >= 5 events and the processed catalogue is all 349K.
  preprocess     ``llmrec preprocess`` with the default config (dedup, 5-core, leave-one-out).
  train_sampled  ``llmrec train --config config/sasrec_size.yaml`` (GPT-2 2 layers, width 64,
                 random init) with ``stage_a.ce.mode=sampled`` (1,024 shared negatives, log-Q)
                 and ``embeddings.sparse=true`` (SparseAdam on the 349K-row table): one whole
                 epoch (default), or ``--train-steps N`` steps extrapolated to one epoch (the
                 result says which).
  train_full_ce  the same model and batch with ``ce.mode=full`` (exact softmax over all
                 349K items, chunked) and dense AdamW: a few steps of
                 ``train_throughput.profile_step`` (what a step costs, and where).
  eval_sampled   ``llmrec evaluate --protocol sampled`` of the train_sampled checkpoint on
                 every test user (1 + 100 uniform negatives).
  eval_full      ``llmrec evaluate --protocol full``: every test user ranked against all items
                 (the evaluator scores 256 users x all items at a time and counts ranks; no
                 users x items matrix).
  eval_full_malloc  the same with glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_,
                 MALLOC_TRIM_THRESHOLD_), as benchmarks/eval_scale.py recommends.
  throughput     benchmarks/train_throughput.py's measurements on this data: the reference
                 SASRec (benchmarks/sasrec_reference.py, width 50, BCE, dense Adam) and our
                 SASRec-sized and 4-layer width-256 recipes through the real training loop
                 (sequences/s, ratio to SASRec), and a profile of one step of each: data,
                 backbone forward+backward, scoring+losses, optimizer.
  ddp            the train_sampled recipe with a dense table (``embeddings.sparse=false``:
                 sparse gradients are single-process only): 1 process x batch 128 vs.
                 ``accelerate launch --multi_gpu --num_processes 2`` (2 gloo processes on this
                 CPU-only machine) x batch 64; same global batch, seconds per step.

Every process runs ``--threads`` torch threads (default 1: on this shared 2-core machine, 2
threads beside other people's work ran a training step 6.6x slower than 1).

Prints a summary and writes ``benchmarks/results/kindle_scale.json`` (at --scale 1; smaller
scales write into --work-dir so development runs leave the committed figures alone).

    python benchmarks/kindle_scale.py                         # full scale (~35 min on 2 busy cores)
    python benchmarks/kindle_scale.py --scale 0.05            # a few minutes
    python benchmarks/kindle_scale.py --stages eval_full      # one stage, on cached inputs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, write_result  # noqa: E402

KINDLE = {"users": 100_000, "items": 349_000, "interactions": 8_000_000}
MIN_ITEM_EVENTS = 5
RECIPE = REPO / "config" / "sasrec_size.yaml"
# Kindle-scale training: sampled softmax and a sparse item table (STACK.md: the dense gradient
# and dense optimizer state of a 349K-row table dominate a step otherwise).
SAMPLED = ["stage_a.ce.mode=sampled", "embeddings.sparse=true"]
FULL_CE = ["stage_a.ce.mode=full", "embeddings.sparse=false"]
STAGES = ("generate", "preprocess", "train_sampled", "train_full_ce", "eval_sampled", "eval_full",
          "eval_full_malloc", "throughput", "ddp")
# glibc returns every large (batch x items) score matrix to the OS and faults it in again on the
# next batch; benchmarks/eval_scale.py found that keeping it (these two settings) about halves
# the full-ranking time. Measured as its own stage, the same command otherwise.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
TARGETS = {"preprocess_wall_s": 60.0, "preprocess_peak_rss_gib": 4.0, "stage_peak_rss_gib": 8.0,
           "train_ratio_vs_sasrec": 1.0}


# ------------------------------------------------------------------------------ measuring


def measured(name: str, command: list[str], logs: Path, env: dict | None = None, timeout: float = 7200) -> dict:
    """Run ``command`` under ``/usr/bin/time -v``; wall s, peak RSS (GiB), CPU %, load before.

    ``Maximum resident set size`` is that of the largest single process of the stage (the
    child or any descendant), not a sum.
    """
    if not Path("/usr/bin/time").exists():
        raise SystemExit("this benchmark needs /usr/bin/time (GNU time) for peak memory")
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"[{name}] load {load[0]:.1f}: {' '.join(command[:8])}{' ...' if len(command) > 8 else ''}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(["/usr/bin/time", "-v", *command], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=timeout)
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if result.returncode != 0:
        raise SystemExit(f"[{name}] failed ({result.returncode}), log {log}:\n{text[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", text)
    figures = {"wall_s": round(wall, 1), "peak_rss_gib": round(rss_kib / 2**20, 3),
               "cpu_percent": int(cpu.group(1)) if cpu else None, "loadavg_before": load, "log": str(log)}
    print(f"[{name}] {figures['wall_s']:.1f} s, peak RSS {figures['peak_rss_gib']:.2f} GiB", flush=True)
    return figures


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llm_recommender.cli", *args]


def sets(overrides: list[str]) -> list[str]:
    return [part for text in overrides for part in ("--set", text)]


def last_json_line(log: str) -> dict:
    for line in reversed(Path(log).read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{log}: no JSON result line")


def training_figures(output_dir: Path, log: str, batch_size: int) -> dict:
    """Steps, loop seconds and the epoch length of an ``llmrec train`` run."""
    history = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    epochs = [e for e in history if e["kind"] == "epoch"]
    windows = [e["sequences_per_s"] for e in history if e["kind"] == "train"]
    header = re.search(r"(\d+) windows;.*?(\d+) steps/epoch", Path(log).read_text())
    steps = epochs[-1]["step"]
    loop_s = sum(e["epoch_seconds"] for e in epochs)
    steps_per_epoch = int(header.group(2))
    seconds_per_step = loop_s / steps
    steady = statistics.median(windows[1:]) if len(windows) > 1 else None
    return {
        "steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "training_windows": int(header.group(1)),
        "batch_size": batch_size,
        "loop_seconds": round(loop_s, 1),
        "steps_per_second": round(steps / loop_s, 3),
        "sequences_per_second": round(steps * batch_size / loop_s, 1),
        "sequences_per_second_steady_median": steady,
        "epoch_seconds": round(seconds_per_step * steps_per_epoch, 1),
        "epoch_seconds_is": "measured" if steps >= steps_per_epoch else
        f"extrapolated from {steps} of {steps_per_epoch} steps",
        "final_train_loss": next((e["train_loss"] for e in reversed(epochs) if "train_loss" in e), None),
        "valid": {k[6:]: v for k, v in epochs[-1].items() if k.startswith("valid_") and isinstance(v, float)},
    }


# ------------------------------------------------------------------------------ workers (child processes)


def _recipe(name: str, extra: list[str], threads: int):
    from train_throughput import RECIPES

    from llm_recommender.config import load_config

    path, overrides = RECIPES[name]
    return load_config(path, [*overrides, *extra, f"runtime.num_threads={threads}"])


def worker(args: argparse.Namespace) -> None:
    """One measurement of benchmarks/train_throughput.py on a processed folder; prints JSON."""
    import torch
    import train_throughput as tt

    from llm_recommender.data.dataset import ProcessedData

    torch.set_num_threads(args.threads)
    data = ProcessedData(args.data_dir)
    kind, recipe, mode = args.worker
    extra = SAMPLED if mode == "sampled" else FULL_CE
    result: dict = {"worker": args.worker, "threads": args.threads}
    if kind == "sasrec":
        result["sequences_per_second"] = round(tt.sasrec_sequences_per_second(data, args.steps), 1)
    elif kind == "loop":
        work = Path(args.work_dir) / "throughput_runs"
        work.mkdir(parents=True, exist_ok=True)
        config = _recipe(recipe, extra, args.threads)
        result["sequences_per_second"] = round(tt.ours_sequences_per_second(config, Path(args.data_dir), args.steps, work), 1)
        shutil.rmtree(work, ignore_errors=True)
    elif kind == "profile":
        config = _recipe(recipe, extra, args.threads)
        result["profile"] = tt.profile_step(config, data, repeats=args.repeats)
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    print(json.dumps(result), flush=True)


def run_worker(name: str, spec: list[str], args: argparse.Namespace, data_dir: Path, logs: Path,
               steps: int = 0, repeats: int = 0) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *spec, "--data-dir", str(data_dir),
               "--work-dir", args.work_dir, "--threads", str(args.threads), "--steps", str(steps),
               "--repeats", str(repeats)]
    figures = measured(name, command, logs)
    figures.update(last_json_line(figures["log"]))
    return figures


# ------------------------------------------------------------------------------ the stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the Kindle size (users, items, events)")
    parser.add_argument("--work-dir", default="/tmp/llmrec-kindle", help="generated data, processed data, checkpoints")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (shared 2-core machine: 2 threads beside other work "
                             "ran 6.6x slower than 1 here)")
    parser.add_argument("--train-steps", default="epoch", help="steps of train_sampled, or 'epoch' for one whole epoch")
    parser.add_argument("--full-ce-repeats", type=int, default=1, help="profiled steps of train_full_ce (after 3 warm-up)")
    parser.add_argument("--throughput-steps", type=int, default=40, help="measured steps per throughput run")
    parser.add_argument("--profile-repeats", type=int, default=10)
    parser.add_argument("--ddp-steps", type=int, default=30)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--output", default=None, help="result JSON (default: benchmarks/results/kindle_scale.json at scale 1)")
    # internal: one train_throughput measurement in a child process
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "RECIPE", "CE_MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / f"logs_s{args.scale:g}"
    sizes = {k: max(10, int(round(v * args.scale))) for k, v in KINDLE.items()}
    raw = work / (f"kindle_u{sizes['users']}_i{sizes['items']}_n{sizes['interactions']}"
                  f"_floor{MIN_ITEM_EVENTS}_seed0.json.gz")
    processed = work / f"processed_s{args.scale:g}"
    sampled_dir = work / f"train_sampled_s{args.scale:g}"
    output = Path(args.output) if args.output else (
        REPO / "benchmarks" / "results" / "kindle_scale.json" if args.scale == 1 else work / f"kindle_scale_s{args.scale:g}.json")
    previous = json.loads(output.read_text()) if output.is_file() else {}
    result: dict = {
        "benchmark": "kindle_scale",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "scale": args.scale,
        "requested": {**sizes, "min_item_events": MIN_ITEM_EVENTS},
        "threads": args.threads,
        "machine_before": machine(),
        "stages": dict(previous.get("stages", {})) if previous.get("scale") == args.scale else {},
    }
    if previous.get("scale") == args.scale:
        for key in ("processed",):
            if key in previous:
                result[key] = previous[key]
    out = result["stages"]
    threads = [f"runtime.num_threads={args.threads}"]

    if "generate" in stages:
        if raw.exists():
            print(f"[generate] cached: {raw}")
            out.setdefault("generate", {})["cached"] = True
        else:
            out["generate"] = measured("generate", cli(
                "generate", "--users", str(sizes["users"]), "--items", str(sizes["items"]), "--interactions",
                str(sizes["interactions"]), "--min-item-events", str(MIN_ITEM_EVENTS), "--seed", "0",
                "--output", str(raw)), logs)
        out["generate"]["file_bytes"] = raw.stat().st_size

    if "preprocess" in stages:
        shutil.rmtree(processed, ignore_errors=True)
        out["preprocess"] = measured("preprocess", cli("preprocess", "--input", str(raw), "--output_dir", str(processed)), logs)
        meta = json.loads((processed / "meta.json").read_text())
        result["processed"] = {k: meta[k] for k in ("num_users", "num_items", "num_interactions")}
        stage_line = re.search(r"seconds:(.*)", Path(out["preprocess"]["log"]).read_text())
        if stage_line:
            out["preprocess"]["stages_s"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", stage_line.group(1).split(";")[0])}

    if "train_sampled" in stages:
        steps = ["stage_a.epochs=1"] if args.train_steps == "epoch" else [f"stage_a.max_steps={int(args.train_steps)}"]
        shutil.rmtree(sampled_dir, ignore_errors=True)
        overrides = [*SAMPLED, *steps, *threads, "stage_a.log_every_steps=25", "stage_a.eval_max_users=2000"]
        figures = measured("train_sampled", cli("train", "--config", str(RECIPE), "--data_dir", str(processed),
                                                "--output_dir", str(sampled_dir), *sets(overrides)), logs)
        figures["overrides"] = overrides
        figures.update(training_figures(sampled_dir, figures["log"], batch_size=128))
        out["train_sampled"] = figures

    if "train_full_ce" in stages:
        figures = run_worker("train_full_ce", ["profile", "sasrec_size", "full"], args, processed, logs,
                             repeats=args.full_ce_repeats)
        figures["overrides"] = FULL_CE
        figures["note"] = (f"train_throughput.profile_step: 3 warm-up + {args.full_ce_repeats} timed steps; "
                           "each step runs the backbone twice (once alone, for the profile)")
        out["train_full_ce"] = figures

    for name, protocol, env in (("eval_sampled", "sampled", None), ("eval_full", "full", None),
                                ("eval_full_malloc", "full", MALLOC_ENV)):
        if name not in stages:
            continue
        metrics_file = work / f"{name}_s{args.scale:g}.json"
        figures = measured(name, cli("evaluate", "--checkpoint", str(sampled_dir / "best_model"), "--data_dir",
                                     str(processed), "--protocol", protocol, "--output_file", str(metrics_file),
                                     *sets(threads)), logs, env=env)
        if env:
            figures["env"] = env
        metrics = json.loads(metrics_file.read_text())[protocol]
        figures.update({k: metrics[k] for k in ("num_users", "seconds", "users_per_second", "HR@10", "NDCG@10")})
        if protocol == "sampled":
            figures["candidate_seconds"] = metrics.get("candidate_seconds")
        figures["num_items"] = json.loads(metrics_file.read_text())["num_items"]
        out[name] = figures

    if "throughput" in stages:
        runs = {"sasrec_reference": run_worker("throughput_sasrec", ["sasrec", "-", "-"], args, processed, logs,
                                               steps=args.throughput_steps)}
        for recipe in ("sasrec_size", "gpt2_4x256"):
            runs[recipe] = run_worker(f"throughput_{recipe}", ["loop", recipe, "sampled"], args, processed, logs,
                                      steps=args.throughput_steps)
        profiles = {recipe: run_worker(f"profile_{recipe}", ["profile", recipe, "sampled"], args, processed, logs,
                                       repeats=args.profile_repeats) for recipe in ("sasrec_size", "gpt2_4x256")}
        reference = runs["sasrec_reference"]["sequences_per_second"]
        out["throughput"] = {
            "runs": runs,
            "profiles": profiles,
            "ratio_vs_sasrec": {k: round(v["sequences_per_second"] / reference, 3) for k, v in runs.items()
                                if k != "sasrec_reference"},
            "note": "sequences of <= 50 items per second through benchmarks/train_throughput.py's "
                    "measurements; ours with ce.mode=sampled + embeddings.sparse=true",
        }

    if "ddp" in stages:
        common = [*SAMPLED[:1], "embeddings.sparse=false", f"stage_a.max_steps={args.ddp_steps}",
                  "stage_a.log_every_steps=10", "stage_a.eval_max_users=500"]
        single_dir, ddp_dir = work / "ddp_single", work / "ddp_two"
        for folder in (single_dir, ddp_dir):
            shutil.rmtree(folder, ignore_errors=True)
        single = measured("ddp_single", cli("train", "--config", str(RECIPE), "--data_dir", str(processed),
                                            "--output_dir", str(single_dir),
                                            *sets([*common, *threads, "stage_a.batch_size=128"])), logs)
        single.update(training_figures(single_dir, single["log"], batch_size=128))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        two = measured("ddp_two", [*launch, "-m", "llm_recommender.cli", "train", "--config", str(RECIPE),
                                   "--data_dir", str(processed), "--output_dir", str(ddp_dir),
                                   *sets([*common, "runtime.num_threads=1", "stage_a.batch_size=64"])],
                       logs, env={"OMP_NUM_THREADS": "1"})
        two.update(training_figures(ddp_dir, two["log"], batch_size=128))
        two["processes"] = 2
        two["per_process_batch"] = 64
        out["ddp"] = {"one_process_batch128": single, "two_processes_batch64": two,
                      "time_ratio_two_over_one": round(single["steps_per_second"] / two["steps_per_second"], 2),
                      "note": "2 gloo processes x 1 thread vs 1 process x 2 threads on 2 cores: a correctness "
                              "and overhead check, not a speed-up (that needs more devices)"}

    result["machine_after"] = machine()
    result["targets"] = TARGETS
    checks = {}
    if "preprocess" in out:
        checks["preprocess_within_60s_4gib"] = (out["preprocess"]["wall_s"] <= TARGETS["preprocess_wall_s"]
                                               and out["preprocess"]["peak_rss_gib"] <= TARGETS["preprocess_peak_rss_gib"])
    peaks = {name: fig["peak_rss_gib"] for name, fig in _flatten(out).items()}
    result["peak_rss_gib_by_stage"] = peaks
    checks["every_stage_within_8gib"] = bool(peaks) and max(peaks.values()) <= TARGETS["stage_peak_rss_gib"]
    if "throughput" in out:
        checks["train_at_least_sasrec"] = out["throughput"]["ratio_vs_sasrec"]["sasrec_size"] >= 1.0
    result["checks"] = checks
    report(result)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.parent == REPO / "benchmarks" / "results":
        write_result(output.stem, result)
    else:
        output.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {output}")


def _flatten(stages: dict) -> dict:
    """Every measured child process (anything with a peak_rss_gib), by name."""
    found = {}
    for name, value in stages.items():
        if isinstance(value, dict):
            if "peak_rss_gib" in value:
                found[name] = value
            else:
                found.update({f"{name}.{k}": v for k, v in _flatten(value).items()})
    return found


def report(result: dict) -> None:
    out = result["stages"]
    print(f"\nKindle scale x{result['scale']:g}: requested {result['requested']}; processed {result.get('processed')}")
    print(f"{'stage':34s} {'wall s':>9s} {'peak GiB':>9s} {'CPU %':>6s} {'load':>5s}")
    for name, fig in _flatten(out).items():
        print(f"{name:34s} {fig['wall_s']:9.1f} {fig['peak_rss_gib']:9.2f} {fig['cpu_percent'] or 0:6d} "
              f"{fig['loadavg_before'][0]:5.1f}")
    if "train_sampled" in out:
        t = out["train_sampled"]
        print(f"train (sampled CE, sparse table): {t['steps']} steps in {t['loop_seconds']} s = {t['steps_per_second']} "
              f"steps/s, {t['sequences_per_second']} sequences/s; one epoch = {t['steps_per_epoch']} steps = "
              f"{t['epoch_seconds']:.0f} s ({t['epoch_seconds_is']})")
    if "train_full_ce" in out:
        p = out["train_full_ce"]["profile"]
        print(f"train (full chunked CE, dense AdamW): {p['step_ms'] / 1000:.1f} s/step; " + _shares(p))
    for name in ("eval_sampled", "eval_full", "eval_full_malloc"):
        if name in out:
            e = out[name]
            protocol = name[5:]
            print(f"evaluate {protocol:12s}: {e['num_users']} users x {e['num_items'] if protocol != 'sampled' else 101} "
                  f"items in {e['seconds']:.1f} s = {e['users_per_second']:.0f} users/s, "
                  f"peak {e['peak_rss_gib']:.2f} GiB, NDCG@10 {e['NDCG@10']:.4f}")
    if "throughput" in out:
        t = out["throughput"]
        for name, run in t["runs"].items():
            ratio = t["ratio_vs_sasrec"].get(name)
            print(f"throughput {name:16s}: {run['sequences_per_second']:8.1f} sequences/s"
                  + (f"  ratio vs SASRec {ratio:.2f}x" if ratio else ""))
        for name, prof in t["profiles"].items():
            print(f"profile {name:12s}: step {prof['profile']['step_ms']} ms = " + _shares(prof["profile"]))
    if "ddp" in out:
        d = out["ddp"]
        print(f"ddp: 1 process {d['one_process_batch128']['steps_per_second']} steps/s, 2 gloo processes "
              f"{d['two_processes_batch64']['steps_per_second']} steps/s (global batch 128 both)")
    print(f"checks: {result['checks']}")
    print(f"load average before/after: {result['machine_before']['loadavg_1_5_15']} / "
          f"{result['machine_after']['loadavg_1_5_15']} on {result['machine_before']['cpu_count']} cores")


def _shares(profile: dict) -> str:
    share = profile["share"]
    return (f"data {share['data']:.0%}, backbone {share['backbone']:.0%}, scoring+losses "
            f"{share['scoring_and_losses']:.0%}, optimizer {share['optimizer']:.0%}")


if __name__ == "__main__":
    main()
