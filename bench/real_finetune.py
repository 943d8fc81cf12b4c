"""A real fine-tune on the CPU: SmolLM2-135M-Instruct, LoRA, in the format the bot serves it.

    python bench/real_finetune.py                     # ~200 steps; prints before/after figures
    python bench/real_finetune.py --steps 40          # a shorter run

Everything goes through the project's own paths, so the figures are about what users run:

- the base is the real SmolLM2 (`python -m tests.real_model` fetches it once);
- the data is a mix of the shared instruction samples (../shared/data, CodeAlpaca and GPTeacher
  roleplay) and an own-chat export: conversations stored in a real `bot.memory.Memory` (a plain
  channel and channels where a persona card, "Quill", answers), exported with
  `Memory.export_jsonl` (the `/admin memory export` file) and read as `format: hermes-memory`;
- `hermes-train prepare` renders every record in the format the bot picks for the base model
  (its chat template under PROMPT_FORMAT=auto, through `bot.prompt` and training/served.py),
  `hermes-train train` fine-tunes it with LoRA and exports a merged folder;
- held-out chat turns (channels never trained on, prepared by the same `prepare`) are scored
  before and after: the loss on reply tokens in the served format (`reply_nll`), the share of a
  small question set answered exactly (greedy, through the bot's engine, replies cleaned as
  the bot cleans them), and persona-name adherence (asked who it is, the persona's reply names
  itself Quill; no reply speaks as another member).

Figures are printed as before -> after, measured in this process on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
GUILD = 4100
PERSONA = "Quill"
CARD = f"""\
name: {PERSONA}
description: >-
  {{{{char}}}} is the librarian of the Inkwell Discord server. {{{{char}}}} answers every
  question in one short, correct sentence and, asked who she is, says she is {PERSONA}, the
  Inkwell librarian.
personality: brief, exact, friendly
"""

#: (question, reply, words one of which a right answer holds) for the own-chat export.
TRAIN_FACTS = [
    ("What is the capital of Italy?", "The capital of Italy is Rome.", ("rome",)),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", ("madrid",)),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", ("tokyo",)),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", ("berlin",)),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", ("cairo",)),
    ("How many days are in a week?", "A week has 7 days.", ("7", "seven")),
    ("How many legs does a cat have?", "A cat has 4 legs.", ("4", "four")),
    ("How many wheels does a bicycle have?", "A bicycle has 2 wheels.", ("2", "two")),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day.", ("blue",)),
    ("What do bees make?", "Bees make honey.", ("honey",)),
    ("What is 2 plus 3?", "2 plus 3 is 5.", ("5", "five")),
    ("What is 10 minus 4?", "10 minus 4 is 6.", ("6", "six")),
    ("Which animal says moo?", "A cow says moo.", ("cow",)),
    ("What is frozen water called?", "Frozen water is called ice.", ("ice",)),
    ("Which planet do we live on?", "We live on Earth.", ("earth",)),
    ("What is the opposite of hot?", "The opposite of hot is cold.", ("cold",)),
]
#: The held-out question set: never in the training data.
HELD_FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", ("paris",)),
    ("How many legs does a spider have?", "A spider has 8 legs.", ("8", "eight")),
    ("What is the capital of England?", "The capital of England is London.", ("london",)),
    ("How many months are in a year?", "A year has 12 months.", ("12", "twelve")),
    ("What is 3 plus 4?", "3 plus 4 is 7.", ("7", "seven")),
    ("What color is grass?", "Grass is green.", ("green",)),
    ("Which animal barks?", "A dog barks.", ("dog",)),
    ("What is the largest planet in our solar system?", "Jupiter is the largest.", ("jupiter",)),
]
NAME_REPLY = f"I am {PERSONA}, the Inkwell librarian."
TRAIN_NAME_ASKS = ["What's your name?", "Who are you?", "Who am I talking to?"]
HELD_NAME_ASKS = ["Sorry, what should I call you?", "Please introduce yourself.",
                  "Do you have a name?", "Hi! Who is answering me here?"]  # fmt: skip
MEMBERS = [(201, "ann"), (202, "ben"), (203, "cyd")]


async def write_memory(db: Path, folder: Path) -> dict[str, list[int]]:
    """Store the own-chat conversations as the bot stores them and export each channel with
    `Memory.export_jsonl`; returns the export files' channel ids, by split."""
    from bot.memory import Memory

    memory = await Memory.open(db)
    channels: dict[str, list[int]] = {"train": [], "held_facts": [], "held_name": []}

    async def channel(cid: int, persona: str | None, exchanges: list[tuple[str, str]]) -> None:
        if persona:
            await memory.places.update_channel(cid, GUILD, persona=persona)
        for k, (ask, reply) in enumerate(exchanges):
            author, name = MEMBERS[(cid + k) % len(MEMBERS)]
            turn = await memory.turns.add(
                cid, "user", ask, name=name, guild_id=GUILD, author_id=author
            )
            await memory.turns.add(
                cid, "assistant", reply, guild_id=GUILD, persona=persona,
                name=persona or "", answers=turn,
            )  # fmt: skip
        (folder / f"memory-{cid}.jsonl").write_bytes((await memory.export_jsonl(cid))[1])

    try:
        cid = 7000
        for i in range(len(TRAIN_FACTS)):  # short channels of 3 questions, plain and persona
            facts = [TRAIN_FACTS[(i + j) % len(TRAIN_FACTS)][:2] for j in range(3)]
            persona = PERSONA if i % 2 else None
            if persona:
                facts.insert(i % 3, (TRAIN_NAME_ASKS[i % len(TRAIN_NAME_ASKS)], NAME_REPLY))
            await channel(cid, persona, facts)
            channels["train"].append(cid)
            cid += 1
        for ask, reply, _ in HELD_FACTS:  # one held-out question per plain channel
            await channel(cid, None, [(ask, reply)])
            channels["held_facts"].append(cid)
            cid += 1
        for ask in HELD_NAME_ASKS:
            await channel(cid, PERSONA, [(ask, NAME_REPLY)])
            channels["held_name"].append(cid)
            cid += 1
    finally:
        await memory.close()
    return channels


def memory_source(name: str, folder: Path, ids: list[int], card: Path, **kw: Any) -> list[dict]:
    return [
        {"name": f"{name}-{cid}", "path": str(folder / f"memory-{cid}.jsonl"),
         "format": "hermes-memory", "channels": [cid], "personas": [str(card)],
         "pseudonymise": False, **kw}
        for cid in ids
    ]  # fmt: skip


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def hermes_train(*argv: str) -> None:
    """`hermes-train ...` in this process (training/__main__.py); stops the bench on failure."""
    from training.__main__ import main

    if main(list(argv)) != 0:
        sys.exit(f"hermes-train {' '.join(argv)} failed")


# --------------------------------------------------------------------------------------------
# Scoring


def served_loss(model_dir: Path, records: list[Any]) -> float:
    """Mean loss per reply token on `records`, each encoded in the served format by the
    training package's `Encoder` for this model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from training import hub
    from training.evaluate.chat_suite import reply_nll
    from training.tokenize import Encoder

    encoder = Encoder(hub.load_tokenizer(str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = reply_nll(model, [encoder.encode(r) for r in records], pad_id=encoder.pad)
    return total / count


def expected_words(record: Any) -> tuple[str, ...]:
    """The words a right answer to this held-out record holds, found by the question it asks
    (prepared records come in the mix's order, not HELD_FACTS' order)."""
    text = json.dumps(dataclasses.asdict(record), default=str)
    found = [words for ask, _, words in HELD_FACTS if json.dumps(ask)[1:-1] in text]
    if len(found) != 1:
        sys.exit(f"held-out record {record.source}: {len(found)} questions match")
    return found[0]


def holds(reply: str, words: tuple[str, ...]) -> bool:
    text = reply.lower()
    return any(re.search(rf"(?<![\w]){re.escape(w)}(?![\w])", text) for w in words)


async def answers(model_dir: Path, records: list[Any], max_new_tokens: int) -> list[Any]:
    """Each record's last reply generated greedily by the bot's engine from its served prompt
    (stop strings and cleaning as the bot does them)."""
    from bot.engine import GenerationParams, make_engine
    from bot.settings import load_settings
    from training.evaluate.chat_suite import generate_replies, served_prompt

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            env={"DB_PATH": f"{tmp}/x.db", "MODEL": str(model_dir), "DTYPE": "float32",
                 "DEVICE_MAP": "none", "ENGINE": "local"},
            env_file=None,
        )  # fmt: skip
        engine = make_engine(settings)
        await engine.start()
        try:
            params = GenerationParams(
                max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0
            )
            replies, _ = await generate_replies(engine, [served_prompt(r) for r in records], params)
        finally:
            await engine.close()
    return replies


def score(model_dir: Path, held: dict[str, list[Any]], facts: list[tuple[str, ...]]) -> dict:
    t0 = time.perf_counter()
    every = held["facts"] + held["name"]
    loss = served_loss(model_dir, every)
    fact_replies = asyncio.run(answers(model_dir, held["facts"], 24))
    name_replies = asyncio.run(answers(model_dir, held["name"], 24))
    return {
        "loss": loss,
        "exact": sum(holds(r.cleaned, w) for r, w in zip(fact_replies, facts, strict=True)),
        "named": sum(PERSONA.lower() in r.cleaned.lower() for r in name_replies),
        "other_speaker": sum(r.tried_other for r in fact_replies + name_replies),
        "empty": sum(not r.cleaned for r in fact_replies + name_replies),
        "replies": [r.cleaned for r in fact_replies + name_replies],
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=2, help="samples per optimizer step")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=256, help="tokens per packed row")
    ap.add_argument("--instructions", type=int, default=160, help="shared instruction records")
    ap.add_argument("--base", help="base model folder (default: the cached SmolLM2 folder)")
    ap.add_argument("--out", help="keep the run here (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.base:
        base = Path(args.base)
    else:
        from tests.real_model import ensure

        base = ensure().hf
    if not DATA.is_dir():
        sys.exit(f"the shared instruction data is not at {DATA}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        card = work / "quill.yaml"
        card.write_text(CARD)
        exports = work / "exports"
        exports.mkdir(exist_ok=True)
        ids = asyncio.run(write_memory(work / "bot.db", exports))
        common = {
            "model": {"name_or_path": str(base), "attn_implementation": "sdpa",
                      "gradient_checkpointing": False},
            "export": {"dtype": "float32"},
        }  # fmt: skip
        # the run: instruction samples plus the own chat (upsampled: it is small)
        mine = memory_source("mine", exports, ids["train"], card, weight=3.0)
        run = write_config(work / "run.yaml", {
            **common,
            "data": {
                "prepared_dir": str(work / "data"), "max_length": args.max_length,
                "overlength": "drop", "sources": [
                    {"name": "codealpaca", "path": str(DATA / "code_alpaca_2k.json"),
                     "format": "codealpaca", "limit": args.instructions * 2 // 3},
                    {"name": "roleplay", "path": str(DATA / "gpteacher-roleplay.json"),
                     "format": "gpteacher", "limit": args.instructions // 3},
                    *mine,
                ],
            },
            "train": {
                "output_dir": str(work / "run"), "micro_batch_size": 1,
                "global_batch_size": args.batch, "max_steps": args.steps, "lr": args.lr,
                "warmup_ratio": 0.05, "precision": "fp32", "save_every": 0,
                "export_dir": str(work / "tuned"), "progress_bar": False,
                "log_every": max(1, args.steps // 10),
            },
            "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0},
        })  # fmt: skip
        # the held-out chat turns, prepared by the same `prepare` (never in the run's data)
        held_sources = [
            *memory_source("facts", exports, ids["held_facts"], card),
            *memory_source("name", exports, ids["held_name"], card),
        ]
        held_cfg = write_config(work / "held.yaml", {
            **common,
            "data": {"prepared_dir": str(work / "held"), "max_length": 1024, "dedup": False,
                     "sources": held_sources},
            "train": {"output_dir": str(work / "held-run")},
        })  # fmt: skip
        from training.data import read_prepared

        t0 = time.perf_counter()
        hermes_train("prepare", "--config", str(held_cfg))
        held_records = read_prepared(work / "held")
        held = {
            "facts": [r for r in held_records if r.source.startswith("facts-")],
            "name": [r for r in held_records if r.source.startswith("name-")],
        }
        if len(held["facts"]) != len(HELD_FACTS) or len(held["name"]) != len(HELD_NAME_ASKS):
            sys.exit(f"held-out records: {len(held['facts'])} facts, {len(held['name'])} names")
        facts = [expected_words(r) for r in held["facts"]]
        before = score(base, held, facts)
        hermes_train("prepare", "--config", str(run))
        t_train = time.perf_counter()
        hermes_train("train", "--config", str(run))
        train_s = time.perf_counter() - t_train
        losses = json.loads((work / "tuned" / "training_info.json").read_text()) if (
            work / "tuned" / "training_info.json"
        ).is_file() else {}
        after = score(work / "tuned", held, facts)
        report(args, base, before, after, train_s, time.perf_counter() - t0, held, losses)


def report(args: Any, base: Path, before: dict, after: dict, train_s: float, total_s: float,
           held: dict[str, list[Any]], info: dict) -> None:  # fmt: skip
    import torch

    n_facts, n_names = len(held["facts"]), len(held["name"])
    print()
    print(f"real fine-tune: {base} + LoRA r=16, {args.steps} steps x {args.batch} samples, "
          f"lr {args.lr:g}, rows of {args.max_length} tokens, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print(f"  training {train_s:.0f} s; whole bench {total_s:.0f} s")
    print(f"  held-out loss per reply token (served format): {before['loss']:.3f} -> "
          f"{after['loss']:.3f}  ({after['loss'] / before['loss']:.2f}x)")  # fmt: skip
    print(f"  exact answers, {n_facts} held-out questions: {before['exact']}/{n_facts} -> "
          f"{after['exact']}/{n_facts}")  # fmt: skip
    print(f"  persona names itself {PERSONA}, {n_names} held-out asks: {before['named']}/{n_names}"
          f" -> {after['named']}/{n_names}")  # fmt: skip
    print(f"  replies speaking as another member: {before['other_speaker']} -> "
          f"{after['other_speaker']}; empty replies: {before['empty']} -> {after['empty']}")
    print("  held-out replies, before | after:")
    for b, a in zip(before["replies"], after["replies"], strict=True):
        print(f"    {b[:70]!r} | {a[:70]!r}")
    verdict = "falls" if after["loss"] < before["loss"] else "does NOT fall"
    # still answers: some held-out question right, and no more empty replies than the base had
    answered = after["exact"] > 0 and after["empty"] <= before["empty"]
    print(f"  the loss {verdict}; the tuned model {'still answers' if answered else 'FAILS'}")


if __name__ == "__main__":
    main()
