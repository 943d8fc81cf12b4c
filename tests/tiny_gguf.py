"""Tiny GGUF files written on the spot with the `gguf` package's writer (what llama.cpp's own
converters use), so the GGUF paths are tested without a 93 MB download: a 2-layer Llama with the
tiny byte-level BPE tokenizer of tests/tiny.py and a ChatML chat template, or the same header
with an architecture or a quantization transformers cannot load.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HIDDEN, LAYERS, HEADS, FFN = 32, 2, 4, 64


def _vocab() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of the tiny BPE tokenizer plus ChatML's two control tokens."""
    from tests.tiny import make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer(Path(tmp))
        data = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] + [
        "<|im_start|>",
        "<|im_end|>",
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    control = {"<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"}
    types = [3 if t in control else 1 for t in tokens]  # 3: CONTROL, 1: NORMAL
    return tokens, types, merges


def make_gguf(path: Path, *, arch: str = "llama", quant: str = "F32", seed: int = 0) -> Path:
    """Write a tiny random model as GGUF at `path`: `arch` goes into `general.architecture`;
    `quant` is F32, Q8_0 (dequantizable) or Q8_1 (no dequantizer in the gguf package)."""
    import gguf
    import numpy as np

    tokens, types, merges = _vocab()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHATML)

    qtype = getattr(gguf.GGMLQuantizationType, quant)

    def add(name: str, *shape: int) -> None:
        data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)  # norms stay F32, as llama.cpp keeps them
            writer.add_tensor(name, data)
        elif quant == "F32":
            writer.add_tensor(name, data)
        elif quant == "Q8_0":
            writer.add_tensor(name, gguf.quantize(data, qtype), raw_dtype=qtype)
        else:  # bytes of the right size for a type nothing can dequantize
            raw = np.zeros(gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)

    add("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", HIDDEN)
        add(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.attn_k.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.attn_v.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.ffn_norm.weight", HIDDEN)
        add(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    add("output_norm.weight", HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
