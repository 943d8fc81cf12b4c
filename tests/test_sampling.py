"""The local engine's sampling (`bot/engine/sampling.py`): temperature, top-k and top-p on the
top-k candidates give the distribution transformers' warpers give over the whole vocabulary."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bot.engine import GenerationParams
from bot.engine.sampling import warped

VOCAB = 5000


def transformers_probs(scores: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """What `generate` samples from: its warpers in its order, then a softmax."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if 0 < p.top_p < 1:
        warpers.append(TopPLogitsWarper(p.top_p))
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    return warpers(ids, scores.clone()).softmax(dim=-1)


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(),  # the bot's default: temperature 0.7, top-k 40, top-p 0.9
        GenerationParams(temperature=1.3, top_k=0, top_p=0.5),
        GenerationParams(temperature=1.0, top_k=5, top_p=1.0),
        GenerationParams(temperature=0.2, top_k=0, top_p=1.0),
        GenerationParams(temperature=0.9, top_k=VOCAB * 2, top_p=0.97),
    ],
)
def test_warped_is_transformers_warpers_distribution(params: GenerationParams):
    gen = torch.Generator().manual_seed(0)
    # peaked rows (one clear favourite), flat rows, and rows in between
    scores = torch.randn(6, VOCAB, generator=gen) * torch.tensor([0.3, 1, 2, 4, 8, 16])[:, None]
    probs, ids = warped(scores, params)
    ours = torch.zeros_like(scores).scatter_(1, ids, probs)
    torch.testing.assert_close(ours, transformers_probs(scores, params), atol=1e-6, rtol=1e-5)
    assert ids.shape[1] == min(params.top_k or VOCAB, VOCAB)
