"""``llmrec``: the command line. Each subcommand is a thin function over the package.

Every subcommand takes ``--config FILE`` and any number of ``--set section.key=value``.
A user mistake ends with one line ``error: ...`` on stderr and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import LLMRecError, one_line


def _add_config_args(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    parser.add_argument(
        "--config",
        default=default_config,
        help="YAML config (default: built-in defaults, the same as config/config.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (repeatable), e.g. --set stage_a.learning_rate=3e-4",
    )


def _add_new_events_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-new-events", "--allow_new_events", dest="allow_new_events", action="store_true",
        help="use a processed folder other than the one the checkpoint was trained on, if it has the "
             "same users and items (newer histories); by default its data fingerprint must match",
    )


def _load(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, args.overrides)


# ------------------------------------------------------------------------------ subcommands


def cmd_generate(args: argparse.Namespace) -> int:
    from .data.synthetic import write_synthetic_logs

    write_synthetic_logs(
        path=args.output,
        num_users=args.users,
        num_items=args.items,
        num_interactions=args.interactions,
        fmt=args.format,
        seed=args.seed,
        num_clusters=args.clusters,
        verbose=True,
        min_item_events=args.min_item_events,
    )
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .data.preprocessing import run_preprocessing

    overrides = list(args.overrides)
    if args.input is not None:
        overrides.append(f"data.path={args.input}")
    if args.format is not None:
        overrides.append(f"data.format={args.format}")
    if args.skip_bad_lines:
        overrides.append("data.skip_bad_lines=true")
    args.overrides = overrides
    config = _load(args)
    run_preprocessing(config, Path(args.output_dir), verbose=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .trainers.stage_a_trainer import train_stage_a

    config = _load(args)
    train_stage_a(config, Path(args.data_dir), Path(args.output_dir), resume=args.resume)
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """Under ``accelerate launch``: wait for every rank (the main one writes the final
    checkpoints last), then destroy the process group before the interpreter exits. Left to
    interpreter shutdown, gloo's worker threads can abort a rank (SIGABRT, "terminate called
    without an active exception"), and the launcher then fails a run that has finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.evaluator import run_evaluation_command

    if args.checkpoint is None and args.baseline is None:
        raise LLMRecError("give --checkpoint DIR or --baseline NAME")
    run_evaluation_command(
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        output_file=Path(args.output_file) if args.output_file else None,
        config_path=args.config,
        overrides=args.overrides,
        baseline=args.baseline,
        split=args.split,
        protocols=args.protocol,
        item_knn=not args.without_item_knn,
    )
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from .serving.recommend import run_recommend_command

    run_recommend_command(args)
    return 0


def cmd_export_embeddings(args: argparse.Namespace) -> int:
    from .serving.export import export_embeddings

    export_embeddings(
        Path(args.checkpoint),
        Path(args.output),
        faiss_index=not args.no_faiss,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        batch_size=args.batch_size,
        allow_new_events=args.allow_new_events,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving.server import run_server

    run_server(
        checkpoint=Path(args.checkpoint),
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        overrides=args.overrides,
        config_path=args.config,
        allow_new_events=args.allow_new_events,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """generate -> preprocess -> train -> evaluate (model and popularity) -> recommend."""
    from .config import load_config

    out = Path(args.output_dir)
    config_path = args.config
    if not Path(config_path).is_file():
        raise LLMRecError(f"{config_path}: demo recipe not found (run from the repository root)")
    raw_file = out / "raw" / "interactions.json.gz"
    processed = out / "processed"
    checkpoints = out / "checkpoints"
    steps = [
        ["generate", "--users", str(args.users), "--items", str(args.items), "--interactions",
         str(args.interactions), "--format", "amazon2018", "--seed", "0", "--output", str(raw_file)],
        ["preprocess", "--config", config_path, "--output_dir", str(processed), "--set",
         f"data.path={raw_file}", *_sets(args.overrides)],
        ["train", "--config", config_path, "--data_dir", str(processed), "--output_dir",
         str(checkpoints), *_sets(args.overrides)],
        ["evaluate", "--checkpoint", str(checkpoints / "best_model"), "--data_dir", str(processed),
         "--output_file", str(out / "test_metrics.json")],
        ["evaluate", "--baseline", "popularity", "--config", config_path, "--data_dir", str(processed),
         "--output_file", str(out / "popularity_metrics.json")],
    ]
    load_config(config_path, args.overrides)  # fail on a bad recipe before any work
    for step in steps:
        print(f"\n$ llmrec {' '.join(step)}", flush=True)
        code = main(step)
        if code != 0:
            return code
    from .data.dataset import ProcessedData

    first_user = ProcessedData(processed).user_ids[0]
    step = ["recommend", "--checkpoint", str(checkpoints / "best_model"), "--user", first_user, "--k", "5"]
    print(f"\n$ llmrec {' '.join(step)}", flush=True)
    code = main(step)
    if code == 0:
        _print_demo_comparison(out)
    return code


def _sets(overrides: list[str]) -> list[str]:
    return [part for text in overrides for part in ("--set", text)]


def _print_demo_comparison(out: Path) -> None:
    import json

    model = json.loads((out / "test_metrics.json").read_text())
    popular = json.loads((out / "popularity_metrics.json").read_text())
    print("\ndemo results (test split):")
    for protocol in ("sampled", "full"):
        if protocol in model and protocol in popular:
            print(
                f"  {protocol:8s} NDCG@10 model {model[protocol]['NDCG@10']:.4f} vs popularity "
                f"{popular[protocol]['NDCG@10']:.4f}; HR@10 model {model[protocol]['HR@10']:.4f} vs "
                f"popularity {popular[protocol]['HR@10']:.4f}"
            )
    print(f"  outputs in {out}/ (checkpoints/best_model, test_metrics.json, checkpoints/training_curves.png)")


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmrec",
        description="Sequential recommendation with a decoder LLM over soft user/item tokens.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="write synthetic interaction logs with real structure")
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--interactions", type=int, required=True)
    p.add_argument(
        "--format",
        default="amazon2018",
        choices=["amazon2018", "amazon2014", "amazon2023", "amazon2023_jsonl", "csv"],
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", type=int, default=None, help="taste clusters (default: scales with items)")
    p.add_argument(
        "--min-item-events", "--min_item_events", dest="min_item_events", type=int, default=0,
        help="give every item at least this many events, so a k-core keeps the whole catalogue (default 0: none)",
    )
    p.add_argument("--output", required=True, help="output file; .gz compresses")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("preprocess", help="raw logs -> processed dataset folder")
    _add_config_args(p)
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True)
    p.add_argument("--input", default=None, help="raw file (same as --set data.path=...)")
    p.add_argument("--format", default=None, help="same as --set data.format=...")
    p.add_argument("--skip-bad-lines", "--skip_bad_lines", dest="skip_bad_lines", action="store_true")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="train the Stage A model")
    _add_config_args(p)
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", required=True)
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="sampled and full-ranking metrics of a checkpoint or baseline")
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None)
    p.add_argument("--output_file", "--output-file", dest="output_file", default=None)
    p.add_argument("--baseline", default=None, help="popularity | popularity_with_valid | markov | markov_with_valid | itemknn | itemknn_with_valid | random")
    p.add_argument("--split", default=None, choices=["valid", "test"])
    p.add_argument(
        "--protocol", default="both", choices=["both", "sampled", "full"], help="which protocols to run"
    )
    p.add_argument("--without-item-knn", "--without_item_knn", dest="without_item_knn", action="store_true",
                   help="score with the network alone (a checkpoint trained with model.item_knn.enabled)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-K item ids for a user, a history or all users")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", default=None, help="original user id")
    who.add_argument("--history", default=None, help="comma-separated original item ids (cold user)")
    who.add_argument("--all-users", "--all_users", dest="all_users", action="store_true")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--keep-seen", "--keep_seen", dest="keep_seen", action="store_true",
                   help="do not exclude items already in the user's history")
    p.add_argument("--output", default=None, help="with --all-users: FILE.parquet or FILE.jsonl")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=4096,
                   help="with --all-users: users per pass (capped so scores stay under 128 MB)")
    _add_new_events_arg(p)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("export-embeddings", help="item/user vectors as .npy (+ FAISS index)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None,
                   help="processed data (users' histories); default: the folder the checkpoint records")
    p.add_argument("--no-faiss", action="store_true", help="skip the FAISS index")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1024,
                   help="users per forward pass for user_states.npy")
    _add_new_events_arg(p)
    p.set_defaults(func=cmd_export_embeddings)

    p = sub.add_parser("serve", help="HTTP service (FastAPI + uvicorn)")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _add_new_events_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the whole pipeline end to end on generated data (minutes on a CPU)")
    p.add_argument("--config", default="config/demo.yaml", help="recipe (default: config/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default="demo_output")
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--items", type=int, default=1500)
    p.add_argument("--interactions", type=int, default=45000)
    p.set_defaults(func=cmd_demo)
    return parser


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand, turning user mistakes into one line and a non-zero exit."""
    try:
        return func(args)
    except LLMRecError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try a smaller batch size or chunk size)", file=sys.stderr)
        return 3
    except OSError as exc:
        # Disk full, permission denied, a folder where a file is expected...
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{one_line(exc.strerror or str(exc))}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llmrec``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run(args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
