"""Tokenizers with a Llama-3-style and a Mistral-style chat template, built on the spot.

The real SmolLM2 tokenizer covers ChatML; these two cover the other template families the bot
must render (`bot.prompt_template`): Llama-3's header tokens with an end-of-turn token that is
not the EOS, and Mistral's `[INST]` markup written as plain text on a SentencePiece tokenizer
with no system role and strict user/assistant alternation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

#: Llama-3's pre-tokenizer split (tokenizer.json of Meta-Llama-3): newlines run together.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def llama3_tokenizer(folder: Path) -> Any:
    """A byte-level BPE tokenizer with Llama-3's pre-tokenizer, special tokens and chat template
    (BOS added by the tokenizer, EOS `<|end_of_text|>`, end of turn `<|eot_id|>`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tests.tiny import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=LLAMA3_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        additional_special_tokens=LLAMA3_SPECIAL[2:],
    )
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def mistral_tokenizer(llama2_folder: Path, folder: Path) -> Any:
    """The Llama 2 SentencePiece tokenizer (adds BOS `<s>`, EOS `</s>`) with Mistral's template:
    `[INST]` is plain text there, no system role, roles must alternate."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2_folder)
    tok.chat_template = MISTRAL_TEMPLATE
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
