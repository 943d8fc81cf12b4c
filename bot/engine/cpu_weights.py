"""How the local engine holds a Llama-family model on the CPU for decoding: transposed matmul
weights, and decoder layers fused into a few operations.

Why: a decode step multiplies one row per request by every weight matrix, and on the CPU that
is memory-bound (every weight byte is read once per step). `nn.Linear` keeps its weight as
[out, in] and computes `x @ W.T`; for one row, MKL's kernel for that shape streams the weights
well under the machine's bandwidth. With the same weight stored [in, out], contiguous, the
same product is `x @ W_t`, which MKL runs as a plain GEMM. Measured on SmolLM2-135M's matrices,
one torch thread, a 2-core AMD EPYC (AVX2): one row 63.7 -> 40.3 ms for all of a step's
matmuls (LM head included), two rows 104.5 -> 59.9 ms, eight rows 125 -> 124 ms, a 200-token
prefill within noise.

The rest of a small model's step is not arithmetic but dispatch: transformers' decoder layer
runs some fifty tensor operations and a dozen module calls per token. `FusedDecoderLayer` does
the same computation in about twenty (one matmul for q, k and v, one for gate and up,
`F.rms_norm`, SDPA with grouped-query heads): SmolLM2's 30 layers 56 -> 38 ms per decode step,
same outputs to float32 rounding (`tests/test_cpu_weights.py`).

What changes, for a model wholly on the CPU: each plain `nn.Linear` with a float32 weight
becomes a `DecodeLinear` holding `weight_t` (the same bytes; an input embedding tied to the LM
head looks its rows up in the head's transposed matrix, so a tied model keeps one copy); then
each Llama or Mistral decoder layer whose linears were all transposed (SDPA attention, SiLU
MLP) becomes a `FusedDecoderLayer` over the same weights. GPUs, other dtypes, quantized layers
(bitsandbytes' layers are `nn.Linear` subclasses) and other architectures are left as loaded.
The engine owns its model object, so nothing else sees the change; `load_model` still returns
the model as transformers built it.
"""

from __future__ import annotations

from typing import Any

#: decoder layers `FusedDecoderLayer` computes exactly (their attention and MLP are Llama's)
FUSABLE_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer"})

_CLASSES: dict[str, type] = {}


def _make_classes() -> dict[str, type]:
    import torch
    import torch.nn.functional as F

    class DecodeLinear(torch.nn.Module):
        """`nn.Linear` with its weight stored transposed ([in, out], contiguous)."""

        def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
            super().__init__()
            self.in_features, self.out_features = weight_t.shape
            self.weight_t = torch.nn.Parameter(weight_t, requires_grad=False)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

        @classmethod
        def of(cls, linear: torch.nn.Linear) -> DecodeLinear:
            bias = None if linear.bias is None else linear.bias.detach()
            return cls(linear.weight.detach().t().contiguous(), bias)

        @classmethod
        def joined(cls, parts: list[DecodeLinear]) -> DecodeLinear:
            """One matmul for several projections of the same input (q, k, v; gate, up)."""
            weight_t = torch.cat([p.weight_t for p in parts], dim=1).contiguous()
            if all(p.bias is None for p in parts):
                return cls(weight_t, None)
            biases = [p.bias if p.bias is not None else p.weight_t.new_zeros(p.out_features)
                      for p in parts]  # fmt: skip
            return cls(weight_t, torch.cat(biases))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.matmul(x, self.weight_t)
            return y if self.bias is None else y + self.bias

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, transposed"

    class FusedDecoderLayer(torch.nn.Module):
        """A Llama decoder layer in few operations; called as transformers calls its layers.

        Attention follows transformers' SDPA path: the mask it is handed (boolean, True =
        attend) or, with none, causal attention (transformers makes a mask whenever cached
        tokens precede the new ones; the engine's caches are dynamic, never static). Rotary
        cos/sin come from the model's `rotary_emb` (`position_embeddings`), so every RoPE
        scaling works unchanged.
        """

        def __init__(self, layer: Any) -> None:
            super().__init__()
            attn, mlp = layer.self_attn, layer.mlp
            self.layer_idx = attn.layer_idx
            self.head_dim = attn.head_dim
            self.heads = attn.q_proj.out_features // attn.head_dim
            self.kv_heads = attn.k_proj.out_features // attn.head_dim
            self.scaling = attn.scaling
            self.qkv = DecodeLinear.joined([attn.q_proj, attn.k_proj, attn.v_proj])
            self.o = attn.o_proj
            self.gate_up = DecodeLinear.joined([mlp.gate_proj, mlp.up_proj])
            self.down = mlp.down_proj
            self.norm1 = layer.input_layernorm.weight
            self.eps1 = layer.input_layernorm.variance_epsilon
            self.norm2 = layer.post_attention_layernorm.weight
            self.eps2 = layer.post_attention_layernorm.variance_epsilon

        def forward(
            self,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
            cache: Any = None,
            past_key_values: Any = None,
            **_: Any,
        ) -> torch.Tensor:
            assert position_embeddings is not None
            cache = cache if cache is not None else past_key_values
            q, k, v = self.project_in(hidden_states, *position_embeddings)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask,
                is_causal=attention_mask is None and hidden_states.shape[1] > 1,
                scale=self.scaling, enable_gqa=self.kv_heads != self.heads,
            )  # fmt: skip
            return self.project_out(hidden_states, out)

        def project_in(
            self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """q, k (rotated) and v for the attention, [batch, heads, length, head_dim]: pure
            tensor work before the cache (`bench/profile_decode.py --compile` compiles it)."""
            batch, length, width = h.shape
            x = F.rms_norm(h, (width,), self.norm1, self.eps1)
            qkv = self.qkv(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            qk = rotate(qkv[:, : self.heads + self.kv_heads], cos.unsqueeze(1), sin.unsqueeze(1))
            q, k = qk.split([self.heads, self.kv_heads], dim=1)  # q and k rotated in one go
            return q, k, qkv[:, self.heads + self.kv_heads :]

        def project_out(self, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
            """The layer's output from its input `h` and the attention's: o projection, residual,
            norm, SiLU MLP, residual (pure tensor work after the cache, as `project_in`)."""
            batch, length, width = h.shape
            h = h + self.o(attended.transpose(1, 2).reshape(batch, length, -1))
            gate, up = self.gate_up(F.rms_norm(h, (width,), self.norm2, self.eps2)).chunk(2, dim=-1)
            return h + self.down(F.silu(gate) * up)

    class TiedEmbedding(torch.nn.Module):
        """The input embedding of a model whose LM head shares its weight, looked up in the
        head's transposed weight: one copy of the matrix, as the model had (a lookup reads a
        strided column per token, which costs nothing beside a step)."""

        def __init__(self, head: DecodeLinear) -> None:
            super().__init__()
            self.head_weight_t = head.weight_t  # the same Parameter: counted once

        @property
        def weight(self) -> torch.Tensor:
            return self.head_weight_t.t()  # [vocab, hidden], a view

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.weight[input_ids]

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE as transformers' `apply_rotary_pos_emb` computes it (rotate-half layout)."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    return {
        "DecodeLinear": DecodeLinear,
        "FusedDecoderLayer": FusedDecoderLayer,
        "TiedEmbedding": TiedEmbedding,
    }


def classes() -> dict[str, type]:
    """`DecodeLinear`, `FusedDecoderLayer` and `TiedEmbedding` (made once, when torch is first
    needed)."""
    if not _CLASSES:
        _CLASSES.update(_make_classes())
    return _CLASSES


def prepare_for_cpu_decoding(model: Any) -> str:
    """Transpose `model`'s float32 CPU linears and fuse its Llama decoder layers, in place;
    returns what was done, for the startup log ("" when nothing applied)."""
    import torch

    if {p.device.type for p in model.parameters()} != {"cpu"}:
        return ""  # on a GPU, or split across devices / offloaded by accelerate: left as loaded
    linear, fused = classes()["DecodeLinear"], classes()["FusedDecoderLayer"]
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
    ]
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = (
        type(embedding) is torch.nn.Embedding and getattr(head, "weight", None) is embedding.weight
    )
    with torch.no_grad():
        for parent, name, child in found:
            setattr(parent, name, linear.of(child))
        head = model.get_output_embeddings()
        if tied and isinstance(head, linear):  # keep one copy of a tied matrix
            model.set_input_embeddings(classes()["TiedEmbedding"](head))
        layers = _fusable_layers(model, linear)
        for parent, name, layer in layers:
            setattr(parent, name, fused(layer))
    if not found:
        return ""
    return f"{len(found)} matmul weights transposed, {len(layers)} decoder layers fused"


def _fusable_layers(model: Any, linear: type) -> list[tuple[Any, str, Any]]:
    config = model.config.get_text_config(decoder=True)
    if config._attn_implementation != "sdpa" or getattr(config, "hidden_act", "") != "silu":
        return []
    return [
        (parent, name, layer)
        for parent in model.modules()
        for name, layer in parent.named_children()
        if type(layer).__name__ in FUSABLE_LAYERS and _all_transposed(layer, linear)
    ]


def _all_transposed(layer: Any, linear: type) -> bool:
    """The layer's attention is exactly q/k/v/o (no q/k norms) and every projection of it and
    of the MLP was transposed (a quantized or half-precision one keeps the layer as loaded)."""
    attn, mlp = dict(layer.self_attn.named_children()), dict(layer.mlp.named_children())
    projections = [attn.pop(n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [mlp.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
    return not attn and all(isinstance(p, linear) for p in projections)
