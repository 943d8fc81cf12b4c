"""`python -m training {prepare,train,export,eval}` (also installed as `hermes-train`).

    hermes-train prepare --config hermes-7b-8xa100        # sources -> records.jsonl + report
    torchrun --standalone --nproc_per_node 8 -m training train --config hermes-7b-8xa100
    hermes-train export --config hermes-7b-8xa100 --out models/hermes-7b   # -> MODEL=models/hermes-7b
    hermes-train eval --model BASE --model models/hermes-7b --suite all --data data/prepared

`--config` takes a YAML path or the name of a bundled config; `--set a.b=value` overrides a field
(values are YAML; numbers as typed: `--set train.lr=1e-5`), `--base PATH` the pretrained base
model (a folder or a .gguf file, with its own tokenizer), `--tokenizer PATH` the tokenizer and
`--data PATH[:FORMAT]` (repeatable) the sources. Overrides
are saved in the run folder (`train.output_dir/overrides.yaml`, with the resolved `config.yaml`),
so the next command of the same run needs only `--config`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.config import (
    Config,
    ConfigError,
    Override,
    load_run_config,
    parse_override,
    save_run_config,
)
from training.evaluate.cli import add_parser as add_eval_parser
from training.evaluate.cli import cmd_eval

log = logging.getLogger("training")


def cmd_prepare(cfg: Config, args: argparse.Namespace) -> int:
    from training import hub
    from training.data import build_mix, write_prepared
    from training.plan import schedule_summary
    from training.tokenize import Encoder

    encoder = Encoder(hub.load_tokenizer(cfg.tokenizer_path))
    for src in cfg.data.sources:  # fail in seconds, not after a minute of `datasets` retries
        if src.hf is not None and not hub.offline():
            hub.require_hub("dataset", src.hf)
    records, report = build_mix(cfg.data, encoder.measure)
    out = Path(cfg.data.prepared_dir)
    write_prepared(out, records, report)
    print(report.markdown())
    print(f"wrote {len(records)} records to {out}/records.jsonl (report: {out}/report.md)")
    if not records:
        print("error: no records left; see the problems above", file=sys.stderr)
        return 1
    held_out = 0
    if cfg.train.eval_every:  # the records `train` holds out for its validation loss
        from training.evaluate.chat_suite import split_records

        held_out = len(split_records(records, cfg.train.val_fraction)[1])
    print(schedule_summary(cfg, len(records), report.tokens, held_out))
    return 0


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from training.train import train

    resume = None if args.resume == "none" else args.resume
    result = train(cfg, resume=resume, stop_after=args.stop_after)
    if result.export_dir is not None:
        log.info("done: %s is ready for the bot (MODEL=%s)", result.export_dir, result.export_dir)
    elif result.step < result.total_steps:
        log.info(
            "stopped at step %d of %d; run the same command again to resume",
            result.step,
            result.total_steps,
        )
    return 0


def cmd_export(cfg: Config, args: argparse.Namespace) -> int:
    from training.checkpoint import best_checkpoint, checkpoint_dirs
    from training.export import export_checkpoint

    best = best_checkpoint(Path(cfg.train.output_dir)) if cfg.train.keep_best else None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    elif best is not None:  # train.keep_best: the lowest validation loss, not the last step
        ckpt = best
    else:
        found = checkpoint_dirs(Path(cfg.train.output_dir))
        if not found:
            print(f"error: no complete checkpoint under {cfg.train.output_dir}", file=sys.stderr)
            return 1
        ckpt = found[-1]
    out = Path(args.out or cfg.train.export_dir or Path(cfg.train.output_dir) / "hf")
    export_checkpoint(cfg, ckpt, out)
    print(f"exported {ckpt} -> {out}; point the bot at it with MODEL={out}")
    return 0


def data_sources(specs: list[str]) -> list[dict[str, Any]]:
    """`--data PATH[:FORMAT]` values -> `data.sources` entries (named after the file)."""
    from training.source_formats import FORMATS

    sources: list[dict[str, Any]] = []
    for spec in specs:
        path, sep, fmt = spec.rpartition(":")
        if not sep or fmt not in {*FORMATS, "auto"}:
            if sep and not Path(spec).exists() and "/" not in fmt:
                raise ConfigError(
                    f"--data {spec}: unknown format {fmt!r} (known: {', '.join(sorted(FORMATS))})"
                )
            path, fmt = spec, "auto"
        file = Path(path).expanduser().resolve()
        name, n = file.stem, 2
        while name in {s["name"] for s in sources}:
            name, n = f"{file.stem}-{n}", n + 1
        sources.append({"name": name, "path": str(file), "format": fmt})
    return sources


def command_overrides(args: argparse.Namespace) -> list[Override]:
    """`--set`, then `--base`, `--tokenizer` and `--data` as the overrides they stand for."""
    pairs = [parse_override(a) for a in args.overrides]
    if args.base:
        base = Path(args.base).expanduser().resolve()
        if not base.exists():
            raise ConfigError(f"--base {args.base}: no such folder or file ({base})")
        pairs += [("model.name_or_path", str(base)), ("model.from_config", None)]
        if not args.tokenizer:
            pairs.append(("model.tokenizer", None))  # the base's own
    if args.tokenizer:
        pairs.append(("model.tokenizer", str(Path(args.tokenizer).expanduser().resolve())))
    if args.data:
        pairs.append(("data.sources", data_sources(args.data)))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hermes-train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("prepare", "normalise, clean and mix the sources; write a report"),
        ("train", "train (single process, or under torchrun/accelerate: FSDP2)"),
        ("export", "write a Hugging Face folder from a checkpoint"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", required=True, help="YAML file or bundled config name")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. train.max_steps=10 (repeatable)",
        )
        p.add_argument(
            "--base",
            metavar="PATH",
            help="a pretrained local base model, a folder or a .gguf file, instead of the "
            "config's (its own tokenizer unless --tokenizer is given; no from_config)",
        )
        p.add_argument(
            "--tokenizer",
            metavar="PATH",
            help="a local tokenizer folder (same as --set model.tokenizer=PATH)",
        )
        p.add_argument(
            "--data",
            action="append",
            default=[],
            metavar="PATH[:FORMAT]",
            help="a local JSON/JSONL source, replacing data.sources (repeatable; format: auto)",
        )
        if name == "train":
            p.add_argument(
                "--resume",
                default="auto",
                help="auto (latest checkpoint, default), none, or a checkpoint path",
            )
            p.add_argument(
                "--stop-after",
                type=int,
                default=None,
                help="stop with a checkpoint after this many steps in total",
            )
        if name == "export":
            p.add_argument(
                "--checkpoint",
                help="checkpoint folder (default: the best with train.keep_best, else the latest)",
            )
            p.add_argument(
                "--out", help="output folder (default: train.export_dir or <output_dir>/hf)"
            )
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
    )
    if args.command == "eval":  # models and prepared data, no run config
        return guarded(args, lambda: cmd_eval(None, args))
    try:
        run = load_run_config(args.config, command_overrides(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if run.reused:
        log.info(
            "reusing %s saved in %s by an earlier command",
            ", ".join(run.reused),
            run.config.train.output_dir,
        )
    commands = {"prepare": cmd_prepare, "train": cmd_train, "export": cmd_export}

    def command() -> int:
        if rank == 0:
            save_run_config(args.config, run)
        return commands[args.command](run.config, args)

    return guarded(args, command)


def guarded(args: argparse.Namespace, command: Callable[[], int]) -> int:
    """Run a subcommand: a failure is one line and exit 1, never a traceback."""
    try:
        return command()
    except (OSError, ValueError, RuntimeError) as exc:
        # Missing files, an unreachable hub, a bad record format, a diverged run: one line.
        logging.getLogger("training").debug("failed", exc_info=exc)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"hermes-train {args.command}: {first}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
