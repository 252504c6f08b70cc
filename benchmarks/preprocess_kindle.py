#!/usr/bin/env python
"""Preprocessing at the spec's Kindle scale, against a straightforward pandas version.

1. Generates (once, cached in --work-dir) Kindle-scale Amazon-2018 review JSON lines, gzip:
   100K users, 349K items, 8M interactions (``--scale`` shrinks all three).
2. Runs ``llmrec preprocess`` on it (default config: dedup, 5-core, leave-one-out) under
   ``/usr/bin/time -v`` for wall time and peak RSS.
3. Runs a straightforward pandas implementation of the same pipeline (chunked
   ``pd.read_json(lines=True)``, ``drop_duplicates``, a ``value_counts`` k-core loop,
   ``factorize``, a stable sort, ``groupby().cumcount`` for leave-one-out) the same way,
   in the same command, and checks that both produce the same arrays.
4. Prints the times, peak RSS and ratios, the machine load (shared machine: other work may
   be running), and writes ``benchmarks/results/preprocess_kindle.json``.

Usage:
    python benchmarks/preprocess_kindle.py                 # full Kindle scale
    python benchmarks/preprocess_kindle.py --scale 0.05    # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "preprocess_kindle.json"
KINDLE = {"users": 100_000, "items": 349_000, "interactions": 8_000_000}
TARGET_WALL_S = 60.0
TARGET_RSS_GIB = 4.0


# ------------------------------------------------------------------------------ the baseline


def pandas_baseline(source: str, output_dir: str, k: int = 5, min_events_for_eval: int = 3) -> None:
    """The pipeline written the obvious way with pandas (what we are compared against)."""
    import numpy as np
    import pandas as pd

    started = time.perf_counter()
    columns = ["reviewerID", "asin", "unixReviewTime", "overall"]
    chunks = []
    reader = pd.read_json(
        source, lines=True, chunksize=500_000, dtype=False, convert_dates=False, keep_default_dates=False
    )
    for chunk in reader:
        chunks.append(chunk[columns])
    frame = pd.concat(chunks, ignore_index=True)
    del chunks
    read_s = time.perf_counter() - started

    frame = frame.drop_duplicates(subset=["reviewerID", "asin", "unixReviewTime"], keep="first")
    while True:  # iterative k-core
        user_counts = frame["reviewerID"].map(frame["reviewerID"].value_counts())
        item_counts = frame["asin"].map(frame["asin"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            break
        frame = frame[keep]
    user_index, user_ids = pd.factorize(frame["reviewerID"], sort=False)  # first appearance
    item_index, item_ids = pd.factorize(frame["asin"], sort=False)
    frame = pd.DataFrame(
        {"user": user_index + 1, "item": item_index + 1, "time": frame["unixReviewTime"].to_numpy()}
    )
    frame = frame.sort_values(["user", "time"], kind="stable")
    from_end = frame.groupby("user").cumcount(ascending=False).to_numpy()
    length = frame.groupby("user")["item"].transform("size").to_numpy()
    split = np.where(length >= min_events_for_eval, np.select([from_end == 0, from_end == 1], [2, 1], 0), 0)
    counts = np.bincount(frame["user"].to_numpy(), minlength=len(user_ids) + 1)
    offsets = np.concatenate([[0], np.cumsum(counts)])

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "seq_offsets.npy", offsets.astype(np.int64))
    np.save(out / "seq_items.npy", frame["item"].to_numpy().astype(np.int32))
    np.save(out / "seq_timestamps.npy", frame["time"].to_numpy().astype(np.int64))
    np.save(out / "seq_split.npy", split.astype(np.uint8))
    (out / "user_ids.txt").write_text("\n".join(user_ids) + "\n")
    (out / "item_ids.txt").write_text("\n".join(item_ids) + "\n")
    print(json.dumps({"read_s": round(read_s, 2), "total_s": round(time.perf_counter() - started, 2)}))


# ------------------------------------------------------------------------------ measuring


def _measured(command: list[str], timeout: float) -> dict:
    """Run ``command`` as a child; wall seconds and peak RSS (``/usr/bin/time -v`` if present)."""
    time_bin = shutil.which("time") if Path("/usr/bin/time").exists() else None
    wrapped = ["/usr/bin/time", "-v", *command] if time_bin else [
        sys.executable, "-c",
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
        "print(f'Maximum resident set size (kbytes): "
        "{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); sys.exit(r)",
        *command,
    ]
    started = time.perf_counter()
    result = subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", result.stderr)
    return {
        "wall_s": round(wall, 2),
        "peak_rss_gib": round(rss_kib / 2**20, 3),
        "cpu_percent": int(cpu.group(1)) if cpu else None,
        "stdout": result.stdout,
    }


def _machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def _versions() -> dict:
    import numpy
    import pandas
    import polars

    return {"polars": polars.__version__, "pandas": pandas.__version__, "numpy": numpy.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/llmrec-bench", help="cache for the generated input and outputs")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the Kindle size (users, items, events)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-pandas", action="store_true", help="only time our implementation")
    parser.add_argument("--output", default=str(RESULT), help="result JSON")
    parser.add_argument("--pandas-baseline", nargs=2, metavar=("INPUT", "OUTPUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pandas_baseline:
        pandas_baseline(*args.pandas_baseline)
        return

    import numpy as np

    from llm_recommender.data.synthetic import write_synthetic_logs

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = {key: max(10, int(round(value * args.scale))) for key, value in KINDLE.items()}
    source = work / f"kindle_amazon2018_u{sizes['users']}_i{sizes['items']}_n{sizes['interactions']}_seed{args.seed}.json.gz"
    if not source.exists():
        print(f"generating {source} ...", flush=True)
        write_synthetic_logs(source, sizes["users"], sizes["items"], sizes["interactions"], "amazon2018", args.seed)
    load_before = _machine()["loadavg_1_5_15"]

    ours_dir = work / "ours"
    print("running llmrec preprocess ...", flush=True)
    ours = _measured(
        [sys.executable, "-m", "llm_recommender.cli", "preprocess", "--input", str(source), "--output_dir", str(ours_dir)],
        timeout=1800,
    )
    print(ours["stdout"], end="")
    stages_line = next((line for line in ours["stdout"].splitlines() if "seconds:" in line), "")
    ours["stages_s"] = {name: float(value) for name, value in re.findall(r"(\w+) ([\d.]+)", stages_line.split(";")[0])}
    del ours["stdout"]

    result = {
        "benchmark": "preprocess_kindle",
        "command": " ".join(sys.argv),
        "input": {"path": str(source), "size_bytes": source.stat().st_size, **sizes, "format": "amazon2018 json.gz"},
        "ours": ours,
        "targets": {"wall_s": TARGET_WALL_S, "peak_rss_gib": TARGET_RSS_GIB},
        "versions": _versions(),
    }
    meta = json.loads((ours_dir / "meta.json").read_text())
    result["processed"] = {k: meta[k] for k in ("num_users", "num_items", "num_interactions")}

    if not args.skip_pandas:
        pandas_dir = work / "pandas"
        shutil.rmtree(pandas_dir, ignore_errors=True)
        print("running the pandas baseline ...", flush=True)
        baseline = _measured(
            [sys.executable, str(Path(__file__).resolve()), "--pandas-baseline", str(source), str(pandas_dir)],
            timeout=3600,
        )
        baseline.update(json.loads(baseline.pop("stdout").strip().splitlines()[-1]))
        same = all(
            np.array_equal(np.load(ours_dir / name), np.load(pandas_dir / name))
            for name in ("seq_offsets.npy", "seq_items.npy", "seq_timestamps.npy", "seq_split.npy")
        ) and all((ours_dir / n).read_bytes() == (pandas_dir / n).read_bytes() for n in ("user_ids.txt", "item_ids.txt"))
        result["pandas"] = baseline
        result["same_output_as_pandas"] = bool(same)
        result["ratio_wall_pandas_over_ours"] = round(baseline["wall_s"] / ours["wall_s"], 2)
        result["ratio_rss_pandas_over_ours"] = round(baseline["peak_rss_gib"] / ours["peak_rss_gib"], 2)

    result["machine"] = _machine()
    result["machine"]["loadavg_at_start_1_5_15"] = load_before
    result["meets_targets"] = bool(ours["wall_s"] <= TARGET_WALL_S and ours["peak_rss_gib"] <= TARGET_RSS_GIB)

    print(
        f"\nours:   {ours['wall_s']:.1f} s wall, {ours['peak_rss_gib']:.2f} GiB peak RSS, "
        f"{ours['cpu_percent']}% CPU (targets: <= {TARGET_WALL_S:.0f} s, <= {TARGET_RSS_GIB:.0f} GiB)"
    )
    if "pandas" in result:
        p = result["pandas"]
        print(
            f"pandas: {p['wall_s']:.1f} s wall, {p['peak_rss_gib']:.2f} GiB peak RSS, {p['cpu_percent']}% CPU; "
            f"same output: {result['same_output_as_pandas']}"
        )
        print(
            f"ratio pandas/ours: wall {result['ratio_wall_pandas_over_ours']}x, "
            f"peak RSS {result['ratio_rss_pandas_over_ours']}x"
        )
    print(f"machine load (1/5/15 min) at start {load_before}, at end {result['machine']['loadavg_1_5_15']} "
          f"on {result['machine']['cpu_count']} cores")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
