"""Sampling for the local engine: per-request logits processors, and many rows sampled at once.

`make_processors` builds transformers' processors for one request's `GenerationParams`, so a
reply samples the same way batched or alone; `sample_rows` samples the next token of every
running row, each with its own processors, history and random generator. Rows are described by
the `SamplingRow` protocol, so this module needs nothing of the scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from bot.engine.base import GenerationParams


class SamplingRow(Protocol):
    """What sampling reads of a running sequence."""

    processors: Any
    generator: Any
    history: Any  # LongTensor of prompt + generated ids
    prompt_len: int
    new_tokens: int

    @property
    def params(self) -> GenerationParams: ...

    def sample_key(self) -> tuple[float, int, float, float]: ...


def make_processors(p: GenerationParams) -> Any:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if p.repetition_penalty and p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature > 0:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k > 0:
            procs.append(TopKLogitsWarper(p.top_k))
        if 0 < p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
    return procs


def sample_rows(rows: Sequence[SamplingRow], logits: Any) -> list[int]:
    """The next token of every row, each with its own processors and random generator.

    Rows that share sampling settings are processed as one block (the processors are row-wise,
    so the result equals processing each row alone); repetition penalty reads each row's own
    history, padded with that row's first id (a repeat changes nothing). One device-to-host copy
    at the end, not one per row.
    """
    import torch

    groups: dict[tuple[float, int, float, float], list[int]] = {}
    for i, s in enumerate(rows):
        groups.setdefault(s.sample_key(), []).append(i)
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
            probs = torch.softmax(scores, dim=-1)
            for j, i in enumerate(idx):
                picks[i] = torch.multinomial(probs[j : j + 1], 1, generator=rows[i].generator)[0, 0]
    return [int(t) for t in torch.stack(picks).tolist()]


def histories(rows: Iterable[SamplingRow]) -> Any:
    import torch

    views = [s.history[: s.prompt_len + s.new_tokens] for s in rows]
    longest = max(v.shape[0] for v in views)
    return torch.stack(
        [
            v if v.shape[0] == longest else torch.cat([v, v[:1].expand(longest - v.shape[0])])
            for v in views
        ]
    )
