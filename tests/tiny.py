"""Tiny Llama models and tokenizers built on the spot, so no test needs a model hub.

The model is a real `LlamaForCausalLM` from a `LlamaConfig`, saved with `save_pretrained`, so the
code under test loads it through the same `from_pretrained` path as the 7B weights.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "### Instruction:\nAlice: hello there, how are you?\n\n### Response:\nI am fine, thank you!\n\n",
    "### Input:\nYou are Hermes, a helpful assistant.\n\n",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,:;'\"()[]{}<>@#&*-_=+/\\|`~",
    "Discord bots answer questions about code, music, games and the weather.",
    "```python\nprint('hi')\n```",
]


def make_tokenizer(folder: Path, vocab_size: int = 384) -> None:
    """Train a byte-level BPE tokenizer with Llama's special tokens and save it to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


def make_model(
    folder: Path,
    *,
    seed: int = 0,
    vocab_size: int = 384,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 4096,
) -> Path:
    """Save a randomly initialised tiny Llama plus its tokenizer into `folder`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(folder)
    return folder
