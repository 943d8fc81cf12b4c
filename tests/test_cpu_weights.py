"""The local engine's CPU layout (`bot/engine/cpu_weights.py`): transposed matmul weights and
fused Llama decoder layers compute what transformers' layers compute, on tiny models saved
and loaded as the engine loads them; what the layout does not cover is left as loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from bot.engine import LocalEngine
from bot.engine.cpu_weights import classes, prepare_for_cpu_decoding
from bot.engine.kv_cache import new_cache
from bot.engine.loading import load_model, plan_load

SHAPE = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, as SmolLM2 and Llama 3
    "max_position_embeddings": 256,
}
KINDS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SHAPE)),
    "llama with biases and scaled rope": (
        LlamaForCausalLM,
        LlamaConfig(
            **SHAPE,
            attention_bias=True,
            mlp_bias=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),  # fmt: skip
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, sliding_window=None)),
    "llama with tied embeddings": (
        LlamaForCausalLM,
        LlamaConfig(**SHAPE, tie_word_embeddings=True),
    ),
}


class KeptLinear(torch.nn.Linear):
    """An `nn.Linear` subclass, as bitsandbytes' quantized layers are."""


def saved(folder: Path, kind: str) -> Path:
    cls, config = KINDS[kind]
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def both(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    plan = plan_load("float32", "none", cuda=False)
    plain, fused = load_model(str(folder), plan), load_model(str(folder), plan)
    return plain, fused, prepare_for_cpu_decoding(fused)


def logits(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=True, **kw).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_layers_compute_what_transformers_computes(tmp_path: Path, kind: str):
    plain, fused, done = both(saved(tmp_path / kind, kind))
    layers = SHAPE["num_hidden_layers"]
    assert done == f"{7 * layers + 1} matmul weights transposed, {layers} decoder layers fused"
    assert all(isinstance(m, classes()["FusedDecoderLayer"]) for m in fused.model.layers)
    assert isinstance(fused.lm_head, classes()["DecodeLinear"])
    # the same bytes: a tied embedding reads the head's transposed matrix, not a copy of it
    assert fused.get_memory_footprint() == plain.get_memory_footprint()
    tied = plain.config.tie_word_embeddings
    assert isinstance(fused.get_input_embeddings(), classes()["TiedEmbedding"]) == tied

    ids = torch.randint(3, SHAPE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    # a whole prompt at once (causal attention, no mask)
    torch.testing.assert_close(logits(fused, ids), logits(plain, ids), atol=1e-4, rtol=1e-4)

    # a prompt in two chunks, the second after cached tokens, then one decode step
    caches = {"plain": new_cache(), "fused": new_cache()}
    for name, model in (("plain", plain), ("fused", fused)):
        logits(model, ids[:, :25], cache=caches[name])
        second = logits(model, ids[:, 25:], cache=caches[name])
        caches[name + " second"] = second
    torch.testing.assert_close(caches["fused second"], caches["plain second"], atol=1e-4, rtol=1e-4)

    # a left-padded batch decode step with the boolean 4D mask the batcher builds
    width, lens = 40, torch.tensor([40, 31, 12])
    batch = torch.randint(
        3, SHAPE["vocab_size"], (3, width), generator=torch.Generator().manual_seed(2)
    )
    cols = torch.arange(width + 1)
    mask = (cols[None, :] >= (width - lens)[:, None])[:, None, None, :]
    step = {}
    for name, model in (("plain", plain), ("fused", fused)):
        cache = new_cache()
        pad = (cols[None, :width] >= (width - lens)[:, None])[:, None, None, :]
        pad = pad & torch.ones(width, width, dtype=torch.bool).tril()[None, None]
        pos = (torch.arange(width)[None, :] - (width - lens)[:, None]).clamp(min=0)
        logits(model, batch, cache=cache, attention_mask=pad, position_ids=pos)
        step[name] = logits(
            model, batch[:, -1:], cache=cache, attention_mask=mask, position_ids=lens[:, None]
        )
    torch.testing.assert_close(step["fused"], step["plain"], atol=1e-4, rtol=1e-4)


def test_other_dtypes_and_layers_are_left_as_loaded(tmp_path: Path):
    folder = saved(tmp_path / "llama", "llama")
    half = load_model(str(folder), plan_load("bfloat16", "none", cuda=False))
    assert prepare_for_cpu_decoding(half) == ""
    assert not any(isinstance(m, tuple(classes().values())) for m in half.modules())

    # a layer with a projection of another Linear class (as bitsandbytes' layers are) keeps
    # that projection and is not fused; the model still computes what transformers computes
    plan = plan_load("float32", "none", cuda=False)
    plain, mixed = load_model(str(folder), plan), load_model(str(folder), plan)
    mlp = mixed.model.layers[1].mlp
    kept = KeptLinear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    kept.load_state_dict(mlp.down_proj.state_dict())
    mlp.down_proj = kept
    layers = SHAPE["num_hidden_layers"]
    assert prepare_for_cpu_decoding(mixed) == (
        f"{7 * layers} matmul weights transposed, {layers - 1} decoder layers fused"
    )
    assert type(mixed.model.layers[1]).__name__ == "LlamaDecoderLayer"
    assert mixed.model.layers[1].mlp.down_proj is kept
    ids = torch.arange(3, 30)[None, :]
    torch.testing.assert_close(logits(mixed, ids), logits(plain, ids), atol=1e-4, rtol=1e-4)


async def test_the_local_engine_serves_the_fused_model_on_the_cpu(tiny_model: Path):
    eng = LocalEngine(tiny_model, dtype="float32", device_map="none")
    await eng.start()
    try:
        layers = eng.model.model.layers
        assert layers and all(isinstance(m, classes()["FusedDecoderLayer"]) for m in layers)
    finally:
        await eng.close()
