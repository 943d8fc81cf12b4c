"""Sampling for the local engine: per-request logits processors, and many rows sampled at once.

`make_processors` builds transformers' repetition penalty for one request's `GenerationParams`,
so a reply samples the same way batched or alone; `sample_rows` samples the next token of every
running row (an `EngineRequest` in prefill or in the decode batch), each with its own history
and random generator. `warped` is temperature, top-k and top-p as transformers' warpers apply
them, computed on the top-k candidates only: their distribution is the warpers' (ties at the
k-th score aside), without sorting the whole vocabulary for top-p every step, which was 14% of
an 8-row SmolLM2 decode step (`docs/serving.md`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from bot.engine.base import GenerationParams
from bot.engine.request import EngineRequest


def sample_key(request: EngineRequest) -> tuple[float, int, float, float]:
    """Requests with equal keys sample alike, so their rows are processed as one block."""
    p = request.params
    return (p.temperature, p.top_k, p.top_p, p.repetition_penalty)


def make_processors(p: GenerationParams) -> Any:
    """transformers' processors that run before the warpers: the repetition penalty."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
    )

    procs = LogitsProcessorList()
    if p.repetition_penalty and p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    return procs


def warped(scores: Any, p: GenerationParams) -> tuple[Any, Any]:
    """(probabilities, token ids), each [rows, candidates], of sampling `scores` with `p`'s
    temperature (> 0), top-k and top-p, in transformers' order (temperature, top-k, top-p).

    Top-k first: `topk` returns the k best scores sorted, so top-p's sort is already done and
    the softmax runs over k values; a token outside them has probability 0 either way. Top-p
    keeps a token when the mass of the tokens above it is under `top_p` (transformers' rule:
    drop what lies in the lowest 1 - top_p of the mass), and always the best one.
    """
    import torch

    k = p.top_k if 0 < p.top_k < scores.shape[-1] else scores.shape[-1]
    values, ids = scores.topk(k, dim=-1)
    values = values / p.temperature
    if 0 < p.top_p < 1.0:
        probs = values.softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs
        values = values.masked_fill(above >= p.top_p, float("-inf"))
    return torch.softmax(values, dim=-1), ids


def sample_rows(rows: Sequence[EngineRequest], logits: Any) -> list[int]:
    """The next token of every row, each with its own processors and random generator.

    Rows that share sampling settings are processed as one block (the processors are row-wise,
    so the result equals processing each row alone); repetition penalty reads each row's own
    history, padded with that row's first id (a repeat changes nothing). One device-to-host copy
    at the end, not one per row.
    """
    import torch

    groups: dict[tuple[float, int, float, float], list[int]] = {}
    for i, s in enumerate(rows):
        groups.setdefault(sample_key(s), []).append(i)
    picks: list[Any] = [None] * len(rows)
    for idx in groups.values():
        first = rows[idx[0]]
        scores = logits[idx] if len(idx) < len(rows) else logits
        if len(first.processors):
            scores = first.processors(histories([rows[i] for i in idx]), scores)
        if first.params.temperature <= 0:
            chosen = scores.argmax(dim=-1)
            for j, i in enumerate(idx):
                picks[i] = chosen[j]
        else:
            probs, ids = warped(scores, first.params)
            for j, i in enumerate(idx):
                drawn = torch.multinomial(probs[j : j + 1], 1, generator=rows[i].generator)
                picks[i] = ids[j, drawn[0, 0]]
    return [int(t) for t in torch.stack(picks).tolist()]


def histories(rows: Iterable[EngineRequest]) -> Any:
    import torch

    views = [s.history[: s.prompt_len + s.stats.new_tokens] for s in rows]
    longest = max(v.shape[0] for v in views)
    return torch.stack(
        [
            v if v.shape[0] == longest else torch.cat([v, v[:1].expand(longest - v.shape[0])])
            for v in views
        ]
    )
