"""Greedy agreement between two copies of one model in different dtypes (bf16 against fp32).

`DTYPE=auto` picks bf16 on CPUs with native bf16 (bot/engine/loading.py); this says what that
costs in output: each of a fixed set of short chat prompts (in the model's own chat template)
is decoded greedily by both copies, and the first token where they part is reported. A reply
that ends (EOS) identically in both counts as identical however short it is.

Used by `bench/engine.py` S (`--only s` with `--model`) and by tests/test_real_dtype.py, so the
bench's line and the test's assertion are about the same prompts and the same measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Four short questions of different kinds (fact, fact, verse, list), one user turn each.
QUESTIONS = (
    "How many legs does a spider have?",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to code.",
)


@dataclass(frozen=True, slots=True)
class Agreement:
    """How far two dtypes' greedy replies agree, per prompt: the first differing token's index
    (None where the first `tokens` tokens, or the whole replies, are identical), and how many
    tokens the first model wrote (so an empty pair of replies is not mistaken for agreement)."""

    tokens: int
    divergence: tuple[int | None, ...]
    written: tuple[int, ...]

    @property
    def identical(self) -> int:
        return sum(d is None for d in self.divergence)

    @property
    def first_divergence(self) -> int | None:
        """The earliest token where any prompt's replies part (None: all identical)."""
        parted = [d for d in self.divergence if d is not None]
        return min(parted) if parted else None

    def describe(self, a: str, b: str) -> str:
        """The bench's line: "greedy agreement A vs B: k of n prompts identical for N tokens,
        first divergence at token t" (or "no divergence")."""
        where = self.first_divergence
        said = "no divergence" if where is None else f"first divergence at token {where}"
        return (
            f"greedy agreement {a} vs {b}: {self.identical} of {len(self.divergence)} prompts "
            f"identical for {self.tokens} tokens, {said}"
        )


def chat_prompts(tokenizer: Any) -> list[str]:
    """`QUESTIONS` in the tokenizer's own chat template, ready for the assistant's reply; the
    project's Alpaca prompt (`bot.prompt.format_single`) for a tokenizer without one."""
    from bot.prompt import format_single

    if not getattr(tokenizer, "chat_template", None):
        return [format_single(q) for q in QUESTIONS]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]


def greedy_ids(model: Any, tokenizer: Any, prompt: str, tokens: int) -> list[int]:
    """The model's greedy reply to `prompt`, at most `tokens` ids, cut at its EOS (inclusive).
    One prompt at a time: padding a batch would change the numerics being compared."""
    import torch

    device = model.get_input_embeddings().weight.device
    # a chat template writes its own BOS where the model wants one; the Alpaca prompt does not
    special = not getattr(tokenizer, "chat_template", None)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=special).to(device)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return out[0, enc.input_ids.shape[1] :].tolist()


def divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where `a` and `b` differ, None where they are the same."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_agreement(model_a: Any, model_b: Any, tokenizer: Any, tokens: int) -> Agreement:
    """Decode `chat_prompts` greedily with both models, `tokens` new tokens at most each."""
    found, written = [], []
    for prompt in chat_prompts(tokenizer):
        a = greedy_ids(model_a, tokenizer, prompt, tokens)
        b = greedy_ids(model_b, tokenizer, prompt, tokens)
        found.append(divergence(a, b))
        written.append(len(a))
    return Agreement(tokens, tuple(found), tuple(written))
