"""Shared bits of the training tests: where ../shared is, the real Llama 2 tokenizer, tiny configs.

Nothing is downloaded: the tokenizer comes from ../shared/fixtures and models are built from a
`LlamaConfig` (`model.from_config`), so every test skips cleanly when ../shared is absent.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
TOKENIZER = SHARED / "fixtures" / "llama2-tokenizer"

REAL_FILES = {
    "gpteacher-roleplay": ("gpteacher-roleplay.json", 1923),
    "gpteacher-codegen": ("gpteacher-codegen.json", 4535),
    "code_alpaca_2k": ("code_alpaca_2k.json", 2017),
    "sharegpt-dummy": ("sharegpt-dummy_conversation.json", 500),
}

TINY_MODEL = {
    "vocab_size": 32000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def need_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data samples not found at {DATA}")
    return DATA


def need_tokenizer_path() -> Path:
    if not (TOKENIZER / "tokenizer.model").exists():
        pytest.skip(f"Llama 2 tokenizer fixture not found at {TOKENIZER}")
    return TOKENIZER


@cache
def _load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def llama_tokenizer() -> Any:
    need_tokenizer_path()
    return _load_tokenizer()


def write_json(path: Path, data: Any, *, jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(x) + "\n" for x in data))
    else:
        path.write_text(json.dumps(data))
    return path


#: Three kinds of question, each with the one answer the tiny end-to-end model must learn.
QA_ANSWERS = {
    "flag": "The flag of every Zorblax city is teal with a silver owl.",
    "river": "Its river is the Quenta, which flows north into the Glass Sea.",
    "food": "They eat smoked pears and drink cold mint tea.",
}


def qa_records(n: int = 30) -> list[dict[str, str]]:
    """`n` distinct questions about made-up places; the answer depends on what is asked (flag,
    river or food), nothing a random model could say without having learnt it."""
    places = [
        "Zorblax",
        "Quenta",
        "Mirravel",
        "Tolundor",
        "Ashkeep",
        "Vennor",
        "Brightwater",
        "Caldris",
        "Omberlin",
        "Pell",
        "Sarnoth",
        "Drelmoor",
        "Kestrane",
        "Hollowmere",
    ]
    asks = {
        "flag": "What does the flag of {} look like?",
        "river": "Which river runs through {}?",
        "food": "What do people in {} eat?",
    }
    kinds = list(asks)
    out = []
    for i in range(n):
        kind, place = kinds[i % 3], places[(i // 3) % len(places)]
        out.append(
            {"instruction": asks[kind].format(place), "input": "", "output": QA_ANSWERS[kind]}
        )
    return out


def tiny_config_dict(tmp: Path, sources: list[dict[str, Any]], **train: Any) -> dict[str, Any]:
    """A config mapping for a tiny random Llama trained on `sources`, all paths under `tmp`."""
    return {
        "model": {
            "tokenizer": str(need_tokenizer_path()),
            "from_config": dict(TINY_MODEL),
            "attn_implementation": "sdpa",
            "gradient_checkpointing": False,
        },
        "data": {"prepared_dir": str(tmp / "data"), "max_length": 256, "sources": sources},
        "train": {
            "output_dir": str(tmp / "run"),
            "micro_batch_size": 1,
            "global_batch_size": 4,
            "max_steps": 6,
            "lr": 3e-3,
            "warmup_ratio": 0.1,
            "precision": "fp32",
            "save_every": 0,
            "progress_bar": False,
            "seed": 7,
            **train,
        },
        "export": {"dtype": "float32"},
    }


def prepare(cfg: Any) -> None:
    """Run `prepare` for a config object (what `python -m training prepare` does)."""
    from training.data import build_mix, write_prepared
    from training.tokenize import Encoder

    records, report = build_mix(cfg.data, Encoder(llama_tokenizer()).measure)
    write_prepared(Path(cfg.data.prepared_dir), records, report)
