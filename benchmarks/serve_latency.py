"""Service latency, batch export and robustness under mixed load (issues 5 and 7).

On Amazon Beauty (22,363 users, 12,101 items) with the SASRec-sized model
(config/sasrec_size.yaml: random-init GPT-2, 2 layers, width 64, embedding 64; trained one
epoch here unless --checkpoint is given):

1. **latency**: ``llmrec serve`` runs as a subprocess; 10,000 single-user ``POST /recommend``
   requests at 1 and at 20 concurrent keep-alive connections over loopback: p50, p99, max,
   errors, requests/s. The load generator is a minimal asyncio HTTP/1.1 client (like wrk):
   httpx would spend more CPU per request than the server on these 2 shared cores. Baseline
   in the same run: the same single-user query answered in-process by
   ``Recommender.recommend_users`` (no HTTP), so ``p50 / baseline p50`` is what HTTP, JSON and
   queueing add.
2. **export**: ``recommend_all`` of every user to parquet (seconds), in this process.
3. ``--mixed``: rounds of 10,000 requests at 20 clients, a fixed mix of good and bad ones
   (unknown ids, malformed/non-UTF-8/deeply nested JSON, bad ``k``, extra or missing fields,
   long histories, bodies over the limit...): counts by status class (goal: 0 5xx and every
   answer the status its kind must get) and the server's RSS at the start and after each
   round (flat: later rounds stay where the first ended).

    python benchmarks/serve_latency.py --mixed         # preprocess + train + all phases
    python benchmarks/serve_latency.py --checkpoint DIR --data_dir DIR

Goals on a 2-core CPU: p99 <= 50 ms at 20 clients; export <= 30 s. Prints the ratios and
writes benchmarks/results/serve_latency.json with the machine's load average per phase
(these machines are shared: a busy neighbour shows up there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BEAUTY = ROOT.parent / "shared" / "data" / "amazon-beauty" / "beauty_5core_sequences.txt"
SASREC_RECIPE = ROOT / "config" / "sasrec_size.yaml"
SASREC_OVERRIDES = [
    "model.random_init_stage_a_llm=true",
    "model.finetune=full",
    "model.base_llm=gpt2",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.embedding_dim=64",
    "model.max_seq_len=50",
    "model.unknown_user_prob=0.05",
    "stage_a.epochs=1",
    "stage_a.batch_size=128",
    "stage_a.max_train_minutes=5",
    "stage_a.eval_max_users=2000",
    "runtime.device=cpu",
]
GOAL_P99_MS = 50.0
GOAL_EXPORT_S = 30.0


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rss_mib(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------ set-up


def prepare_data(work: Path, data_dir: str | None) -> Path:
    if data_dir:
        return Path(data_dir)
    processed = work / "processed"
    if (processed / "meta.json").is_file():
        return processed
    if not BEAUTY.is_file():
        sys.exit(f"skip: {BEAUTY} not present (Beauty lives in ../shared); pass --data_dir and --checkpoint")
    from llm_recommender.config import load_config
    from llm_recommender.data.preprocessing import run_preprocessing

    config = load_config(None, [f"data.path={BEAUTY}", "data.format=sasrec_sequences"])
    run_preprocessing(config, processed, verbose=True)
    return processed


def prepare_checkpoint(work: Path, data_dir: Path, checkpoint: str | None, threads: int) -> Path:
    if checkpoint:
        return Path(checkpoint)
    run = work / "run"
    if (run / "best_model" / "checkpoint.json").is_file():
        return run / "best_model"
    from llm_recommender.config import load_config
    from llm_recommender.trainers.stage_a_trainer import train_stage_a

    overrides = [
        f"runtime.num_threads={threads}", "runtime.device=cpu", "stage_a.epochs=1",
        "stage_a.max_train_minutes=5", "stage_a.eval_max_users=2000",
    ]
    if SASREC_RECIPE.is_file():
        config = load_config(SASREC_RECIPE, overrides)
    else:
        config = load_config(None, SASREC_OVERRIDES + overrides)
    train_stage_a(config, data_dir, run)
    return run / "best_model"


class Server:
    """``llmrec serve`` as a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, data_dir: Path, threads: int, window_ms: float) -> None:
        command = [
            sys.executable, "-m", "llm_recommender.cli", "serve", "--checkpoint", str(checkpoint),
            "--data_dir", str(data_dir), "--host", "127.0.0.1", "--port", "0",
            "--set", f"runtime.num_threads={threads}", "--set", f"serving.batch_window_ms={window_ms}",
            "--set", "runtime.device=cpu",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 300
        line = ""
        while time.monotonic() < deadline and not line:
            if self.process.poll() is not None:
                sys.exit(f"server exited: {self.process.stderr.read()}")
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                line = self.process.stdout.readline().strip()
        print(line)
        self.url = line.split()[2]
        import httpx

        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.stderr.read()


# ------------------------------------------------------------------------------ load


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (a load generator, like wrk).

    httpx.AsyncClient costs ~1-2 ms of CPU per request in Python; on a 2-core machine shared
    with the server that is the client measuring itself. This one writes the request bytes
    and reads the status line, headers and Content-Length body: a few tens of microseconds.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        try:
            await self.writer.drain()
            header = await self.reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            await self.close()
            return 599
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        try:
            await self.reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            close = True
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def fire(url: str, bodies: list, clients: int) -> tuple[list[float], list[int]]:
    """Send ``bodies`` (dict → JSON POST, bytes → raw POST /recommend, ("GET", path)) from
    ``clients`` concurrent keep-alive connections; per-request latency (ms) and status
    (599: the connection failed)."""
    host, port = url.split("//")[1].split(":")
    latencies = [0.0] * len(bodies)
    statuses = [0] * len(bodies)
    cursor = iter(range(len(bodies)))
    encoded = []
    for body in bodies:
        if isinstance(body, tuple):
            encoded.append(("GET", body[1], None))
        elif isinstance(body, bytes):
            encoded.append(("POST", "/recommend", body))
        else:
            path = "/recommend/batch" if "requests" in body else "/recommend"
            encoded.append(("POST", path, json.dumps(body).encode()))

    async def client_loop() -> None:
        connection = Connection(host, int(port))
        for index in cursor:
            method, path, body = encoded[index]
            began = time.perf_counter()
            statuses[index] = await connection.request(method, path, body)
            latencies[index] = (time.perf_counter() - began) * 1000
        await connection.close()

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return latencies, statuses


def summarize(latencies: list[float], statuses: list[int], seconds: float) -> dict:
    values = np.asarray(latencies)
    return {
        "requests": len(values),
        "errors": int(sum(1 for s in statuses if s != 200)),
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
        "requests_per_s": round(len(values) / seconds, 1),
        "seconds": round(seconds, 2),
    }


def latency_phase(url: str, user_ids: list[str], requests: int, clients: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    bodies = [{"user_id": user_ids[i], "k": 10} for i in rng.integers(len(user_ids), size=requests)]
    load_before = load_average()
    began = time.perf_counter()
    latencies, statuses = asyncio.run(fire(url, bodies, clients))
    result = summarize(latencies, statuses, time.perf_counter() - began)
    result.update(clients=clients, load_before=load_before, load_after=load_average())
    return result


def mixed_bodies(user_ids: list[str], item_ids: list[str], requests: int, seed: int, max_body: int) -> list:
    """A fixed mix of good and bad requests with the status each must get."""
    rng = np.random.default_rng(seed)
    huge = json.dumps({"history": ["x" * 20] * (max_body // 20)}).encode()  # just over the limit
    kinds = [
        ("user", 0.35, 200), ("history", 0.15, 200), ("history_partly_unknown", 0.05, 200),
        ("batch", 0.03, 200), ("similar", 0.05, 200), ("unknown_user", 0.07, 404),
        ("unknown_item_similar", 0.03, 404), ("malformed_json", 0.05, 422), ("missing_fields", 0.03, 422),
        ("extra_field", 0.03, 422), ("k_zero", 0.03, 422), ("k_huge", 0.03, 422),
        ("history_too_long", 0.03, 422), ("history_all_unknown", 0.02, 422), ("huge_body", 0.02, 413),
        ("not_utf8", 0.02, 422), ("deeply_nested", 0.01, 422),
    ]
    names = [k[0] for k in kinds]
    weights = np.array([k[1] for k in kinds])
    expected = {k[0]: k[2] for k in kinds}
    picks = rng.choice(len(kinds), size=requests, p=weights / weights.sum())

    def user():
        return user_ids[int(rng.integers(len(user_ids)))]

    def items(n):
        return [item_ids[int(i)] for i in rng.integers(len(item_ids), size=n)]

    bodies, wanted, labels = [], [], []
    for pick in picks:
        name = names[pick]
        body = {
            "user": lambda: {"user_id": user(), "k": int(rng.integers(1, 50))},
            "history": lambda: {"history": items(int(rng.integers(1, 60))), "k": 10},
            "history_partly_unknown": lambda: {"history": items(3) + ["no-such-item"], "k": 5},
            "batch": lambda: {"requests": [{"user_id": user()} for _ in range(8)]},
            "similar": lambda: ("GET", f"/items/{items(1)[0]}/similar?k=10"),
            "unknown_user": lambda: {"user_id": f"ghost-{int(rng.integers(1 << 30))}"},
            "unknown_item_similar": lambda: ("GET", "/items/no-such-item/similar"),
            "malformed_json": lambda: b'{"user_id": "1", "k": ',
            "missing_fields": lambda: {"k": 5},
            "extra_field": lambda: {"user_id": user(), "limit": 5},
            "k_zero": lambda: {"user_id": user(), "k": 0},
            "k_huge": lambda: {"user_id": user(), "k": 10**12},
            "history_too_long": lambda: {"history": items(1001)},
            "history_all_unknown": lambda: {"history": ["nope-1", "nope-2"]},
            "huge_body": lambda: huge,
            "not_utf8": lambda: b'{"user_id": "\xff\xfe"}',
            "deeply_nested": lambda: b"[" * 100000,
        }[name]()
        bodies.append(body)
        wanted.append(expected[name])
        labels.append(name)
    return bodies, wanted, labels


def mixed_phase(server: Server, user_ids, item_ids, requests: int, seed: int, rounds: int) -> dict:
    """``rounds`` rounds of ``requests`` mixed requests at 20 clients; the server's RSS after
    each. The first round grows the allocator's arenas once (1 MB bodies, error paths); flat
    means the later rounds stay where the first one ended."""
    pid = server.process.pid
    rss_start = rss_mib(pid)
    peak = [rss_start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            peak[0] = max(peak[0], rss_mib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    load_before = load_average()
    per_round = []
    for round_index in range(rounds):
        bodies, wanted, labels = mixed_bodies(user_ids, item_ids, requests, seed + round_index, max_body=1_000_000)
        began = time.perf_counter()
        latencies, statuses = asyncio.run(fire(server.url, bodies, 20))
        seconds = time.perf_counter() - began
        classes: dict[str, int] = {}
        for status in statuses:
            key = "transport_error" if status == 599 else f"{status // 100}xx"
            classes[key] = classes.get(key, 0) + 1
        unexpected: dict[str, int] = {}
        for label, got, want in zip(labels, statuses, wanted):
            if got != want:
                key = f"{label}: {got} (want {want})"
                unexpected[key] = unexpected.get(key, 0) + 1
        values = np.asarray(latencies)
        per_round.append(
            {
                "requests": requests,
                "by_status_class": classes,
                "by_status": {str(s): statuses.count(s) for s in sorted(set(statuses))},
                "by_kind": {name: labels.count(name) for name in sorted(set(labels))},
                "unexpected": unexpected,
                "server_rss_mib_after": round(rss_mib(pid), 1),
                "p50_ms": round(float(np.percentile(values, 50)), 2),
                "p99_ms": round(float(np.percentile(values, 99)), 2),
                "seconds": round(seconds, 2),
            }
        )
    stop.set()
    sampler.join()
    first = per_round[0]
    return {
        "requests": requests,
        "clients": 20,
        "rounds": rounds,
        "by_status_class": first["by_status_class"],
        "by_status": first["by_status"],
        "by_kind": first["by_kind"],
        "unexpected": first["unexpected"],
        "all_rounds_5xx": sum(r["by_status_class"].get("5xx", 0) for r in per_round),
        "all_rounds_unexpected": sum(sum(r["unexpected"].values()) for r in per_round),
        "server_rss_mib_start": round(rss_start, 1),
        "server_rss_mib_after_each_round": [r["server_rss_mib_after"] for r in per_round],
        "server_rss_mib_peak": round(peak[0], 1),
        "per_round": per_round,
        "load_before": load_before,
        "load_after": load_average(),
    }


# ------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a best_model/ folder (default: train one)")
    parser.add_argument("--data_dir", default=None, help="processed Beauty (default: preprocess it)")
    parser.add_argument("--work_dir", default=str(ROOT / "benchmarks" / "results" / "tmp" / "serve_latency"))
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", default="1,20", help="comma-separated concurrency levels")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads (runtime.num_threads)")
    parser.add_argument("--window_ms", type=float, default=2.0, help="serving.batch_window_ms")
    parser.add_argument("--mixed", action="store_true", help="also 10,000 mixed good/bad requests (issue 7)")
    parser.add_argument("--mixed_rounds", type=int, default=3, help="rounds of --requests mixed requests")
    parser.add_argument("--skip_latency", action="store_true")
    parser.add_argument("--skip_export", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_latency.json"))
    args = parser.parse_args()

    import torch

    from llm_recommender.io_utils import atomic_write_json
    from llm_recommender.serving.recommend import Recommender

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(work, args.data_dir)
    checkpoint = prepare_checkpoint(work, data_dir, args.checkpoint, args.threads)
    torch.set_num_threads(args.threads)
    recommender = Recommender.from_checkpoint(checkpoint, data_dir)
    user_ids, item_ids = recommender.user_ids, recommender.item_ids
    result: dict = {
        "benchmark": "serve_latency",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_start": load_average(),
        },
        "checkpoint": str(checkpoint),
        "data": {"dir": str(data_dir), "num_users": recommender.num_users, "num_items": recommender.num_items},
        "model": {
            "backbone": recommender.config.model.base_llm,
            "random_init": recommender.config.model.random_init_stage_a_llm,
            "num_layers": recommender.config.model.num_layers,
            "hidden_size": recommender.config.model.hidden_size,
            "embedding_dim": recommender.config.model.embedding_dim,
            "max_seq_len": recommender.max_seq_len,
        },
        "server": {"torch_threads": args.threads, "batch_window_ms": args.window_ms, "workers": 1},
        "goals": {"p99_ms_at_20_clients": GOAL_P99_MS, "export_seconds": GOAL_EXPORT_S},
    }

    # Baseline: the same single-user query in-process, no HTTP.
    rng = np.random.default_rng(args.seed + 1)
    direct = []
    for user in rng.integers(1, recommender.num_users + 1, size=500):
        began = time.perf_counter()
        recommender.recommend_users(np.array([user]), 10)
        direct.append((time.perf_counter() - began) * 1000)
    result["baseline_in_process"] = {
        "requests": len(direct),
        "p50_ms": round(float(np.percentile(direct, 50)), 2),
        "p99_ms": round(float(np.percentile(direct, 99)), 2),
    }
    print(f"baseline in-process single user: p50 {result['baseline_in_process']['p50_ms']} ms")

    if not args.skip_latency or args.mixed:
        server = Server(checkpoint, data_dir, args.threads, args.window_ms)
        try:
            asyncio.run(fire(server.url, [{"user_id": u} for u in user_ids[:300]], 10))  # warm-up
            if not args.skip_latency:
                result["latency"] = []
                for clients in [int(c) for c in args.clients.split(",")]:
                    phase = latency_phase(server.url, user_ids, args.requests, clients, args.seed + clients)
                    phase["p50_vs_in_process"] = round(phase["p50_ms"] / result["baseline_in_process"]["p50_ms"], 2)
                    result["latency"].append(phase)
                    print(
                        f"{clients:3d} clients: p50 {phase['p50_ms']} ms, p99 {phase['p99_ms']} ms, max "
                        f"{phase['max_ms']} ms, {phase['requests_per_s']} req/s, {phase['errors']} errors "
                        f"(load {phase['load_before']} -> {phase['load_after']})"
                    )
            if args.mixed:
                phase = mixed_phase(server, user_ids, item_ids, args.requests, args.seed + 99, args.mixed_rounds)
                result["mixed"] = phase
                print(
                    f"mixed: {phase['by_status_class']} of {phase['requests']}, unexpected "
                    f"{phase['unexpected'] or 'none'}; {phase['rounds']} rounds: {phase['all_rounds_5xx']} 5xx, "
                    f"server RSS {phase['server_rss_mib_start']} MiB -> {phase['server_rss_mib_after_each_round']} "
                    f"after each round (peak {phase['server_rss_mib_peak']})"
                )
            health = json.loads(__import__("httpx").get(f"{server.url}/health").text)
            result["server"]["forward_passes"] = health["forward_passes"]
            result["server"]["queries_scored"] = health["queries_scored"]
        finally:
            stderr = server.stop()
        result["server"]["stderr_tracebacks"] = stderr.count("Traceback")

    if not args.skip_export:
        output = work / "all_users.parquet"
        load_before = load_average()
        summary = recommender.recommend_all(output, k=10, batch_size=4096)
        result["export"] = {
            "users": summary["users"],
            "rows": summary["rows"],
            "seconds": round(summary["seconds"], 2),
            "users_per_s": round(summary["users"] / summary["seconds"], 1),
            "bytes": output.stat().st_size,
            "load_before": load_before,
            "load_after": load_average(),
        }
        print(f"export: {summary['users']} users in {summary['seconds']:.1f} s -> {output}")

    ratios = {}
    at20 = [p for p in result.get("latency", []) if p["clients"] == 20]
    if at20:
        ratios["p99_at_20_clients_vs_goal"] = round(at20[0]["p99_ms"] / GOAL_P99_MS, 3)
    if "export" in result:
        ratios["export_seconds_vs_goal"] = round(result["export"]["seconds"] / GOAL_EXPORT_S, 3)
    if "mixed" in result:
        mixed = result["mixed"]
        ratios["mixed_5xx"] = mixed["all_rounds_5xx"]
        ratios["mixed_unexpected_status"] = mixed["all_rounds_unexpected"]
        after = mixed["server_rss_mib_after_each_round"]
        ratios["mixed_rss_last_vs_first_round"] = round(after[-1] / after[0], 3)
        ratios["mixed_rss_first_round_vs_start"] = round(after[0] / mixed["server_rss_mib_start"], 3)
    result["ratios"] = ratios
    result["machine"]["load_average_end"] = load_average()
    for name, value in ratios.items():
        print(f"{name}: {value}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
