"""The bot's own evaluation: how a model does on conversations exactly as the bot serves them.

No harness is involved. Validation conversations come from `prepare` output and are rendered by
the same code that makes training examples (`training.tokenize.Encoder`, which renders through
`bot.prompt`), so the text scored is byte for byte what the bot sends the model.

Two parts:

- Loss: mean negative log-likelihood per reply token (the target positions of each example,
  reply + EOS, prompt tokens never count) and its perplexity. `chat_loss` is the function the
  trainer calls on its validation split.
- Generation through the bot's engine (`bot.engine.make_engine`) with the bot's default
  sampling and stop rules (`bot.prompt.stop_strings`, `clean_reply`): how replies end (EOS, a
  stop rule, or MAX_NEW_TOKENS), how many try to write another speaker's line or a block header,
  how many are empty after cleaning, mean length and tokens/s.

The validation split is a hash of each record's identity (`training.data.dedup_key`), so it does
not depend on file order or size and the trainer can leave the same records out.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from training.config import DEFAULT_VAL_EXAMPLES, DEFAULT_VAL_FRACTION
from training.data import Record, dedup_key
from training.tokenize import IGNORE_INDEX, Encoder, Example, pieces_for

DEFAULT_SPLIT_SEED = "hermes-validation"

Notice = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# The validation split


def is_validation(record: Record, fraction: float, seed: str = DEFAULT_SPLIT_SEED) -> bool:
    """Whether `record` belongs to the validation split (stable across runs and file orders)."""
    if fraction >= 1:
        return True
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\x1f{dedup_key(record)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_records(
    records: Sequence[Record], fraction: float, seed: str = DEFAULT_SPLIT_SEED
) -> tuple[list[Record], list[Record]]:
    """(training records, validation records); `fraction` 1 makes every record validation."""
    train: list[Record] = []
    val: list[Record] = []
    for rec in records:
        (val if is_validation(rec, fraction, seed) else train).append(rec)
    return train, val


# --------------------------------------------------------------------------------------------
# Loss on reply tokens


def _batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length so that rows x longest row stays under `max_batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > max_batch_tokens:
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def reply_nll(
    model: Any,
    examples: Sequence[Example],
    *,
    max_batch_tokens: int = 8192,
    pad_id: int = 0,
    progress: bool = False,
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of tokens) over the target positions.

    A position counts when its label is not IGNORE_INDEX: the reply tokens and the EOS after
    each reply, as trained. The model is put in eval mode for the call and restored after.
    Under FSDP every rank must call this with the same examples (each forward is collective).
    """
    import torch
    import torch.nn.functional as F

    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    batches = _batches([len(e) for e in examples], max_batch_tokens)
    bar = _progress(len(batches), "chat loss", progress)
    try:
        with torch.no_grad():
            for batch in batches:
                width = max(len(examples[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ex = examples[i]
                    ids[row, : len(ex)] = torch.tensor(ex.input_ids)
                    labels[row, : len(ex)] = torch.tensor(ex.labels)
                    mask[row, : len(ex)] = 1
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                target = labels[:, 1:]
                total += float(
                    F.cross_entropy(
                        logits.float().reshape(-1, logits.shape[-1]),
                        target.reshape(-1),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                )
                count += int((target != IGNORE_INDEX).sum())
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return total, count


def chat_loss(
    model: Any,
    examples: Sequence[Example],
    *,
    max_batch_tokens: int = 8192,
    pad_id: int = 0,
) -> float:
    """Mean loss per reply token (nats) of `model` on `examples`: the validation loss.

    Token-weighted over all examples, on target positions only (reply tokens and EOS).
    """
    total, count = reply_nll(model, examples, max_batch_tokens=max_batch_tokens, pad_id=pad_id)
    if count == 0:
        raise ValueError("no reply tokens to score: the validation examples have no targets")
    return total / count


# --------------------------------------------------------------------------------------------
# Generation through the bot's engine


@dataclass(frozen=True, slots=True)
class ServedPrompt:
    """What the bot would send for a record's last reply, and who else speaks in it."""

    prompt: str
    reference: str
    other_names: tuple[str, ...]
    bot_name: str


def served_prompt(record: Record) -> ServedPrompt:
    """The record's text up to its last reply (ending with the Response header), as served."""
    pieces = pieces_for(record)
    last = max(i for i, (_, target) in enumerate(pieces) if target)
    turns = record.conversation or []
    others = tuple(
        dict.fromkeys(n for m in turns if m.role == "user" and (n := getattr(m, "name", "") or ""))
    )
    bots = [n for m in turns if m.role == "assistant" and (n := getattr(m, "name", "") or "")]
    return ServedPrompt(
        prompt="".join(text for text, _ in pieces[:last]),
        reference=pieces[last][0].strip(),
        other_names=others,
        bot_name=bots[-1] if bots else "",
    )


@dataclass(slots=True)
class Reply:
    text: str  # as streamed by the engine (stop strings already cut)
    cleaned: str  # after bot.prompt.clean_reply
    finish_reason: str
    new_tokens: int
    tried_other: bool  # hit a stop rule, or cleaning cut a header / another speaker's line


async def generate_replies(
    engine: Any, prompts: Sequence[ServedPrompt], params: Any, *, progress: bool = False
) -> tuple[list[Reply], float]:
    """All prompts submitted to the engine at once (it batches them, as it does for channels):
    (replies in prompt order, wall seconds)."""
    from bot.prompt import clean_reply, stop_strings

    start = time.perf_counter()
    gens = []
    for i, sp in enumerate(prompts):
        p = replace(
            params,
            stop=tuple(stop_strings(sp.other_names)),
            seed=None if params.seed is None else params.seed + i,
        )
        gens.append(engine.generate(sp.prompt, p))
    bar = _progress(len(gens), "chat replies", progress)

    async def one(gen: Any) -> None:
        await gen.text_all()
        bar.update(1)

    try:
        await asyncio.gather(*(one(g) for g in gens))
    finally:
        bar.close()
    wall = time.perf_counter() - start
    replies = []
    for sp, gen in zip(prompts, gens, strict=True):
        cleaned = clean_reply(gen.text, sp.other_names, sp.bot_name)
        cut = clean_reply(gen.text, sp.other_names) != gen.text.replace("</s>", "").strip()
        reason = gen.stats.finish_reason
        replies.append(
            Reply(gen.text, cleaned, reason, gen.stats.new_tokens, reason == "stop" or cut)
        )
    return replies, wall


def reply_metrics(replies: Sequence[Reply], wall: float) -> dict[str, Any]:
    """Shares and means over the generated replies."""
    n = len(replies)
    if n == 0:
        return {"replies": 0}

    def share(pred: Callable[[Reply], bool]) -> float:
        return sum(1 for r in replies if pred(r)) / n

    tokens = sum(r.new_tokens for r in replies)
    return {
        "replies": n,
        "clean_end": share(lambda r: r.finish_reason in ("eos", "stop")),
        "eos": share(lambda r: r.finish_reason == "eos"),
        "stopped": share(lambda r: r.finish_reason == "stop"),
        "length": share(lambda r: r.finish_reason == "length"),
        "errors": share(lambda r: r.finish_reason not in ("eos", "stop", "length")),
        "other_speaker_or_header": share(lambda r: r.tried_other),
        "empty": share(lambda r: not r.cleaned),
        "mean_new_tokens": tokens / n,
        "mean_reply_chars": sum(len(r.cleaned) for r in replies) / n,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "wall_s": wall,
    }


# --------------------------------------------------------------------------------------------
# The suite


@dataclass(frozen=True, slots=True)
class ChatOptions:
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: str = DEFAULT_SPLIT_SEED
    max_examples: int = DEFAULT_VAL_EXAMPLES  # validation conversations scored for loss
    samples: int = 64  # validation conversations the model answers (0: no generation)
    max_new_tokens: int | None = None  # default: the bot's MAX_NEW_TOKENS
    seed: int = 1234
    dtype: str = "auto"
    device_map: str = "auto"
    max_batch_tokens: int = 8192
    progress: bool = True
    env_file: str | None = ".env"  # the bot's settings file (the environment wins over it)


def bot_settings(opts: ChatOptions) -> Any:
    """The bot's settings, read as the bot reads them (the environment over `opts.env_file`,
    ENGINE included), with the evaluation's dtype, device map and reply length."""
    from bot.settings import load_settings

    base = load_settings(env_file=opts.env_file)
    changes: dict[str, Any] = {"dtype": opts.dtype, "device_map": opts.device_map}
    if opts.max_new_tokens is not None:
        changes["max_new_tokens"] = opts.max_new_tokens
    return replace(base, **changes)


def remote(settings: Any) -> bool:
    """Whether the model is served by an OpenAI-compatible server (ENGINE=openai): then the
    loss, which needs the weights, is not measured; the replies are, through that server."""
    return bool(settings.engine == "openai")


def load_model(path: str, opts: ChatOptions) -> Any:
    """The model as the bot loads it (bot.engine.plan_load picks dtype and device map)."""
    from transformers import AutoModelForCausalLM

    from bot.engine import EngineError, first_line, plan_load

    plan = plan_load(opts.dtype, opts.device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **plan.kwargs)
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot load the model {path!r}: {first_line(exc)}") from None
    return model.eval()


def evaluate_model(path: str, val: Sequence[Record], opts: ChatOptions) -> dict[str, Any]:
    """Loss and generation figures for one model on the validation records: a model folder,
    or with ENGINE=openai the model's name on the server (replies only, see `remote`)."""
    from bot.engine import make_engine, params_from_settings

    settings = bot_settings(opts)
    if remote(settings):
        settings = replace(settings, openai_model=path)
        out: dict[str, Any] = {"engine": f"openai ({settings.openai_base_url})"}
        out |= {"loss": None, "perplexity": None, "examples": None, "target_tokens": None}
    else:
        out = {"engine": "local", **_loss(path, val, opts)}
    if opts.samples > 0:
        params = params_from_settings(settings, seed=opts.seed)
        prompts = [served_prompt(r) for r in val[: opts.samples]]
        engine = make_engine(settings, model=path)

        async def run() -> tuple[list[Reply], float]:
            await engine.start()
            try:
                return await generate_replies(engine, prompts, params, progress=opts.progress)
            finally:
                await engine.close()

        replies, wall = asyncio.run(run())
        out.update(reply_metrics(replies, wall))
        out["generation"] = {k: v for k, v in asdict(params).items() if k != "stop"}
        out["examples_shown"] = [
            {"reference": p.reference, "reply": r.cleaned, "finish_reason": r.finish_reason}
            for p, r in zip(prompts[:5], replies[:5], strict=False)
        ]
        del engine
        _free_memory()
    return out


def _loss(path: str, val: Sequence[Record], opts: ChatOptions) -> dict[str, Any]:
    """The loss on reply tokens of the model folder at `path` (its weights, loaded here)."""
    from bot.engine import load_tokenizer

    encoder = Encoder(load_tokenizer(path))
    examples = [encoder.encode(r) for r in val[: opts.max_examples]]
    model = load_model(path, opts)
    total, count = reply_nll(
        model,
        examples,
        max_batch_tokens=opts.max_batch_tokens,
        pad_id=encoder.pad,
        progress=opts.progress,
    )
    del model
    _free_memory()
    return {
        "loss": total / count if count else None,
        "perplexity": math.exp(total / count) if count else None,
        "examples": len(examples),
        "target_tokens": count,
    }


def run_chat_suite(
    models: Sequence[str], records: Sequence[Record], opts: ChatOptions, notice: Notice = print
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({model: figures}, settings) on the validation split of `records`."""
    _, val = split_records(records, opts.val_fraction, opts.split_seed)
    if not val:
        raise ValueError(
            f"no validation records among {len(records)} at --val-fraction {opts.val_fraction}; "
            "raise it (1 uses every record)"
        )
    settings = {
        "records": len(records),
        "validation_records": len(val),
        **{k: v for k, v in asdict(opts).items() if k != "progress"},
    }
    out = {}
    for path in models:
        notice(f"chat: {len(val)} validation conversation(s) on {path}")
        out[path] = evaluate_model(path, val, opts)
    return out, settings


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
