"""Helpers shared by the benchmarks: data location, machine load, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMREC_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "benchmarks" / "results"
BEAUTY_RAW = SHARED / "data" / "amazon-beauty" / "beauty_5core_sequences.txt"


def require(path: Path, what: str) -> Path:
    """Exit cleanly (status 0, a clear message) when a shared input is absent."""
    if not path.exists():
        print(f"skipped: {what} not found at {path} (real data lives in ../shared; see its README)")
        sys.exit(0)
    return path


def add_network_arguments(parser, split: str = "valid") -> None:
    """``--data_dir``, repeatable ``--network NAME=CHECKPOINT`` and ``--split`` (default
    ``split``): the arguments of the benchmarks that score saved networks."""
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--network", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a checkpoint scored without its neighbour table, repeatable")
    parser.add_argument("--split", choices=("valid", "test"), default=split)


def parse_networks(parser, specs: list[str], reserved: tuple[str, ...] = ()) -> dict[str, Path]:
    """``--network`` values -> {name: checkpoint}; a malformed, repeated or ``reserved`` name is
    a usage error."""
    networks: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in networks or name in reserved:
            parser.error(f"--network {spec!r}: expected NAME=CHECKPOINT with a new name")
        networks[name] = Path(path)
    if not networks:
        parser.error("give at least one --network")
    return networks


def machine() -> dict:
    """What the numbers were measured on, including the load from other processes."""
    load = os.getloadavg()
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def preprocessed_beauty(work_dir: Path) -> Path:
    """Beauty preprocessed with the default config (leave-one-out, 5-core) under work_dir."""
    require(BEAUTY_RAW, "Amazon Beauty")
    out = work_dir / "beauty_processed"
    if not (out / "meta.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "llm_recommender.cli", "preprocess", "--output_dir", str(out),
             "--set", f"data.path={BEAUTY_RAW}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/NAME.json (pretty, sorted)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return path
