"""training.packing: bins are valid and full, and a packed batch is exactly its samples apart."""

from __future__ import annotations

import random

import pytest
import torch

from tests.packing_reference import (
    block_causal_mask,
    document_ids,
    forward_packed,
    token_loss_sum,
)
from tests.training_helpers import DATA, REAL_FILES, llama_tokenizer, need_data
from training.config import DataConfig, SourceConfig
from training.data import build_mix
from training.packing import collate_packed, collate_rows, pack_lengths, packed_loss_sum
from training.tokenize import IGNORE_INDEX, Encoder, Example


def random_examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(4, 60)
        ids = [1] + [rng.randrange(3, vocab) for _ in range(length - 2)] + [2]
        prompt = rng.randint(1, length - 2)
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_pack_lengths_is_a_valid_best_fit() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    bins = pack_lengths(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert bins == pack_lengths(lengths, 512)  # deterministic
    assert len(bins) <= 1.05 * sum(lengths) / 512 + 1
    with pytest.raises(ValueError, match="more than the packing length"):
        pack_lengths([10, 600], 512)


def test_real_data_packs_to_at_least_98_percent_at_4096() -> None:
    need_data()
    enc = Encoder(llama_tokenizer())
    cfg = DataConfig(
        sources=[SourceConfig(name=k, path=str(DATA / f)) for k, (f, _) in REAL_FILES.items()]
    )
    records, report = build_mix(cfg, enc.measure)
    lengths = [enc.measure(r)[0] for r in records]
    bins = pack_lengths(lengths, 4096)
    assert sum(lengths) / (len(bins) * 4096) >= 0.98


def test_collate_restarts_positions_and_masks_boundaries() -> None:
    a = Example([1, 5, 6, 2], [IGNORE_INDEX, IGNORE_INDEX, 6, 2])
    b = Example([1, 7, 2], [1, 7, 2])  # even a label on a first token is never trained
    batch = collate_packed([a, b], pad_id=0, length=10)
    assert batch.input_ids.tolist() == [[1, 5, 6, 2, 1, 7, 2, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    assert batch.labels.tolist() == [[-100, -100, 6, 2, -100, 7, 2, -100, -100, -100]]
    assert (batch.n_real, batch.n_targets) == (7, 4)
    assert document_ids(batch.position_ids).tolist() == [[1, 1, 1, 1, 2, 2, 2, 3, 3, 3]]
    mask = block_causal_mask(batch.position_ids)[0, 0]
    assert mask[5, 4] and not mask[5, 3] and not mask[4, 5]
    rows = collate_rows([[a], [b]], pad_id=0, length=5)
    assert rows.input_ids.shape == (1, 10) and rows.position_ids.tolist() == [
        [0, 1, 2, 3, 0, 0, 1, 2, 0, 1]
    ]


def tiny_model(impl: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation=impl,
    )
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.double()  # float64 so "equal" can mean 1e-10


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("explicit_mask", [False, True])
def test_packed_loss_equals_token_weighted_mean_of_separate_losses(
    impl: str, explicit_mask: bool
) -> None:
    model = tiny_model(impl)
    examples = random_examples(9, 128)
    bins = pack_lengths([len(e) for e in examples], 128)
    assert len(bins) >= 2 and max(len(b) for b in bins) >= 3  # several samples per row

    # separately: each sample alone, its mean loss, weighted by its target tokens (float64;
    # transformers' own loss is float32 inside, so it is compared at 1e-6 below)
    model.zero_grad()
    losses, weights = [], []
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits
        losses.append(token_loss_sum(logits, torch.tensor([ex.labels])) / ex.n_targets)
        weights.append(ex.n_targets)
    w = torch.tensor(weights, dtype=torch.float64)
    expected = (torch.stack(losses) * w).sum() / w.sum()
    expected.backward()
    grads = [p.grad.clone() for p in model.parameters()]

    # packed: every bin a row of 128 tokens, all rows flattened into one sequence
    model.zero_grad()
    batch = collate_rows([[examples[i] for i in b] for b in bins], pad_id=0, length=128)
    logits = forward_packed(model, batch, explicit_mask=explicit_mask)
    packed = token_loss_sum(logits, batch.labels) / batch.n_targets
    packed.backward()
    assert batch.n_targets == w.sum()
    torch.testing.assert_close(packed, expected, rtol=1e-10, atol=1e-10)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)  # eager softmax is fp32

    # the training loss, which projects to the vocabulary only at target positions, agrees
    torch.testing.assert_close(
        packed_loss_sum(model, batch) / batch.n_targets, expected.detach(), rtol=1e-10, atol=1e-10
    )
    # and transformers' own loss on the packed row agrees (it computes in float32)
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        labels=batch.labels,
        use_cache=False,
    )
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-6, atol=1e-6)


def test_packed_logits_equal_separate_logits() -> None:
    model = tiny_model("sdpa").eval()
    examples = random_examples(4, 128, seed=3)
    batch = collate_packed(examples, pad_id=0, length=256)
    with torch.no_grad():
        logits = forward_packed(model, batch)[0]
        start = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            torch.testing.assert_close(logits[start : start + len(ex)], alone, rtol=1e-9, atol=1e-9)
            start += len(ex)
