"""`python -m training {prepare,train,export,eval}` (also installed as `hermes-train`).

    hermes-train prepare --config hermes-7b-8xa100        # sources -> records.jsonl + report
    torchrun --standalone --nproc_per_node 8 -m training train --config hermes-7b-8xa100
    hermes-train export --config hermes-7b-8xa100 --out models/hermes-7b   # -> MODEL=models/hermes-7b
    hermes-train eval --model BASE --model models/hermes-7b --suite all --data data/prepared

`--config` takes a YAML path or the name of a bundled config; `--set a.b=value` overrides a field.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from training.config import Config, ConfigError, load_config
from training.evaluate.cli import add_parser as add_eval_parser
from training.evaluate.cli import cmd_eval

log = logging.getLogger("training")


def cmd_prepare(cfg: Config, args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from training.data import build_mix, write_prepared
    from training.tokenize import Encoder

    encoder = Encoder(AutoTokenizer.from_pretrained(cfg.tokenizer_path))
    records, report = build_mix(cfg.data, encoder.measure)
    out = Path(cfg.data.prepared_dir)
    write_prepared(out, records, report)
    print(report.markdown())
    print(f"wrote {len(records)} records to {out}/records.jsonl (report: {out}/report.md)")
    if not records:
        print("error: no records left; see the problems above", file=sys.stderr)
        return 1
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
    from training.export import export_checkpoint
    from training.train import checkpoint_dirs

    if args.checkpoint:
        ckpt = Path(args.checkpoint)
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
            p.add_argument("--checkpoint", help="checkpoint folder (default: the latest)")
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
    try:
        cfg = None if args.command == "eval" else load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    commands = {"prepare": cmd_prepare, "train": cmd_train, "export": cmd_export, "eval": cmd_eval}
    try:
        return commands[args.command](cfg, args)
    except (OSError, ValueError, RuntimeError) as exc:
        # Missing files, an unreachable hub, a bad record format: one line, not a traceback.
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
