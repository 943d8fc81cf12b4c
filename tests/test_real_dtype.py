"""bf16 against fp32 on the real model: what DTYPE=auto's bf16 (on CPUs with native bf16) costs
in greedy output, on `bench/agreement.py`'s fixed chat prompts (the bench prints the same measure).

Measured on the 2-core AVX2 development CPU (bf16 emulated by torch): over 32 tokens, 3 of the 4
prompts are identical and the fourth parts at token 17. The test holds the first 8 tokens of
every prompt to identity, a margin of two against that first divergence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.agreement import QUESTIONS, greedy_agreement
from bot.engine.loading import load_model, load_tokenizer, plan_load

pytestmark = pytest.mark.real_model

#: Tokens per reply compared; every prompt must agree on all of them.
TOKENS = 8


@pytest.fixture
def one_thread():
    """One torch thread, as the bench runs: a 135M model only loses time to a second thread on
    a shared 2-core CPU (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_bf16_greedy_first_tokens_match_fp32(smollm2_hf: Path):
    tokenizer = load_tokenizer(str(smollm2_hf))
    fp32 = load_model(str(smollm2_hf), plan_load("float32", "none", cuda=False))
    bf16 = load_model(str(smollm2_hf), plan_load("bfloat16", "none", cuda=False))
    assert next(bf16.parameters()).dtype is torch.bfloat16
    assert next(fp32.parameters()).dtype is torch.float32

    agreement = greedy_agreement(bf16, fp32, tokenizer, TOKENS)

    assert len(agreement.divergence) == len(QUESTIONS)
    assert all(n > 0 for n in agreement.written), agreement  # replies were written
    assert agreement.identical == len(QUESTIONS), agreement.describe("bf16", "fp32")
