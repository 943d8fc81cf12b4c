"""`hermes-train eval`: benchmark and chat suites for one or more model folders, side by side.

    hermes-train eval --model NousResearch/Nous-Hermes-llama-2-7b --model models/hermes-7b \\
        --suite all --data data/prepared --out eval/hermes-7b

Prints one Markdown table per suite (one column per model, a delta column: last minus first)
and writes them with `results.json` (every number and the exact settings) under `--out`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from training.evaluate.suites import BENCHMARKS, SUITE_CHOICES, Suite, custom_suite

DEFAULT_OUT = "eval-results"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the `eval` subcommand on `hermes-train`'s subparsers."""
    from training.evaluate.chat_suite import (
        DEFAULT_SPLIT_SEED,
        DEFAULT_VAL_EXAMPLES,
        DEFAULT_VAL_FRACTION,
    )

    p = sub.add_parser(
        "eval",
        help="benchmark (lm-eval) and chat suites, base vs fine-tuned side by side",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        help="model folder or hub id (repeat: one column each; the delta is last minus first)",
    )
    p.add_argument(
        "--suite",
        dest="suites",
        action="append",
        choices=SUITE_CHOICES,
        help="gpt4all, bigbench, agieval, chat or all (repeatable; default all, or none "
        "when --tasks is given)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument(
        "--env-file",
        default=".env",
        help="the bot's settings file (default .env; the environment wins over it): with "
        "ENGINE=openai every suite runs against that server, --model naming the served model",
    )
    h = p.add_argument_group("benchmark suites (lm-evaluation-harness)")
    h.add_argument("--tasks", help="also run these harness tasks, comma-separated")
    h.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="folder of task YAMLs in the harness's format (repeatable)",
    )
    h.add_argument("--num-fewshot", type=int, help="shots for --tasks (default 0)")
    h.add_argument(
        "--batch-size", type=batch_size_arg, default="auto", help="auto (default) or a number"
    )
    h.add_argument("--max-batch-size", type=int, default=64, help="ceiling for auto")
    h.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    h.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    h.add_argument("--limit", type=float, help="examples per task: quick looks only")
    c = p.add_argument_group("chat suite")
    c.add_argument("--data", help="`prepare` output folder (or its records.jsonl)")
    c.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of records held out as validation (default {DEFAULT_VAL_FRACTION}; "
        "1 = every record, for a prepared validation set)",
    )
    c.add_argument("--split-seed", default=DEFAULT_SPLIT_SEED, help="seed of the split's hash")
    c.add_argument(
        "--max-examples",
        type=int,
        default=DEFAULT_VAL_EXAMPLES,
        help=f"conversations scored for loss (default {DEFAULT_VAL_EXAMPLES}, as the trainer)",
    )
    c.add_argument("--samples", type=int, default=64, help="conversations answered (0: none)")
    c.add_argument("--max-new-tokens", type=int, help="default: the bot's MAX_NEW_TOKENS")
    c.add_argument("--seed", type=int, default=1234, help="sampling seed")
    c.add_argument("--device-map", default="auto", help="as DEVICE_MAP (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def batch_size_arg(value: str) -> str:
    """`auto` or a positive whole number (kept as text: the harness takes either)."""
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not auto or a positive number")


def _notice(line: str) -> None:
    print(f"eval: {line}", file=sys.stderr, flush=True)


def selected(args: argparse.Namespace) -> tuple[list[Suite], bool]:
    """(benchmark suites to run, whether the chat suite runs)."""
    names = args.suites or ([] if args.tasks else ["all"])
    if "all" in names:
        names = [*BENCHMARKS, "chat"]
    suites = [BENCHMARKS[n] for n in dict.fromkeys(names) if n in BENCHMARKS]
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        suites.append(custom_suite(tasks, args.num_fewshot))
    return suites, "chat" in names


def records_path(data: str) -> Path:
    path = Path(data)
    return path.parent if path.is_file() else path


def check_model(model: str) -> None:
    """A path that is not a folder is a typo, not a hub id: say so before loading anything."""
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") != 1
    if looks_local and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(f"no model folder at {model}")


def cmd_eval(cfg: Any, args: argparse.Namespace) -> int:
    """Run the selected suites; 0 when anything ran, 1 when nothing could."""
    from bot.settings import load_settings
    from training.evaluate.harness import Remote
    from training.evaluate.tables import benchmark_table, chat_table, model_labels, write_json

    server = Remote.from_settings(load_settings(env_file=args.env_file))
    if server is not None:
        _notice(f"ENGINE=openai: the models are the ones {server.base_url} serves")

    suites, chat = selected(args)
    if chat and not args.data:
        if "chat" in (args.suites or []):
            raise ValueError("the chat suite needs --data: a `prepare` output folder")
        _notice("chat: skipped, it needs --data (a `prepare` output folder)")
        chat = False
    for model in args.models if server is None else ():
        check_model(model)
    out = Path(args.out)
    labels = model_labels(args.models)
    report: dict[str, Any] = {
        "models": args.models,
        "labels": labels,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "suites": {},
    }
    ran = False
    tables: list[str] = []
    if suites:
        from training.evaluate.harness import HarnessOptions, run_suites

        opts = HarnessOptions(
            batch_size=args.batch_size,
            max_batch_size=args.max_batch_size,
            device=args.device,
            dtype=args.dtype,
            limit=args.limit,
            include_paths=tuple(args.include_path),
            remote=server,
        )
        results = run_suites(args.models, suites, opts, notice=_notice)
        for suite in suites:
            per_model = results[suite.name]
            report["suites"][suite.name] = {
                "title": suite.title,
                "card_average": suite.card_average,
                "models": {m: r.to_json() for m, r in per_model.items()},
            }
            if any(r.scores for r in per_model.values()):
                ran = True
                table = benchmark_table(suite, per_model)
                tables.append(table)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{suite.name}.md").write_text(table, encoding="utf-8")
            else:
                _notice(f"{suite.name}: no task could run")
    if chat:
        from training.data import read_prepared
        from training.evaluate.chat_suite import ChatOptions, run_chat_suite

        copts = ChatOptions(
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            max_examples=args.max_examples,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            dtype=args.dtype,
            device_map=args.device_map,
            progress=not args.no_progress,
            env_file=args.env_file,
        )
        records = read_prepared(records_path(args.data))
        figures, settings = run_chat_suite(args.models, records, copts, notice=_notice)
        settings["data"] = str(records_path(args.data))
        report["suites"]["chat"] = {"settings": settings, "models": figures}
        table = chat_table(figures)
        tables.append(table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "chat.md").write_text(table, encoding="utf-8")
        ran = True
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(out / "results.json", report)
    for table in tables:
        print(table)
    print(f"wrote {out}/results.json" + (f" and {len(tables)} table(s)" if tables else ""))
    if not ran:
        print("hermes-train eval: nothing could run; see the lines above", file=sys.stderr)
        return 1
    return 0
