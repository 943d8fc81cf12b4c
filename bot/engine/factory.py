"""`make_engine(settings)`: the engine the settings ask for: local, llamacpp or OpenAI-compatible.

The only module that knows both implementations; each is imported when chosen, so a bot that
talks to a vLLM server never imports torch here, and one that runs locally never needs aiohttp's
streaming code loaded.
"""

from __future__ import annotations

from typing import Any, Protocol

from bot.engine.interface import Engine


class EngineFactory(Protocol):
    """What builds an engine: `make_engine`, or whatever a caller hands the bot instead."""

    def __call__(self, settings: Any, *, model: str | None = None) -> Engine: ...


def make_engine(settings: Any, *, model: str | None = None) -> Engine:
    """The engine the settings ask for (`ENGINE=auto`: see `bot.engine_choice.choose_engine`); `model`
    overrides MODEL (console --model, reload). The engine's `info.notes` say why it was chosen."""
    from bot.engine_choice import choose_engine

    model_path = model or settings.model
    kind, why = choose_engine(settings, model_path)
    engine = _build(kind, settings, model_path)
    engine.info.notes.insert(0, f"engine {kind}: {why}")
    return engine


def _build(kind: str, settings: Any, model_path: str) -> Engine:
    if kind == "llamacpp":
        from bot.engine.llamacpp import LlamaCppEngine

        return LlamaCppEngine(
            model_path,
            threads=settings.threads,
            n_gpu_layers=settings.n_gpu_layers,
            max_batch=settings.max_batch,
            context_tokens=settings.context_tokens,
            kv_cache_mb=settings.kv_cache_mb,
            tokenizer=settings.tokenizer or None,
        )
    if kind == "openai":
        from bot.engine.openai import OpenAIEngine

        return OpenAIEngine(
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key,
            model=settings.openai_model or model_path,
            tokenizer=settings.tokenizer or model_path,
        )
    from bot.engine.local import LocalEngine

    return LocalEngine(
        model_path,
        dtype=settings.dtype,
        device_map=settings.device_map,
        quantization=settings.quantization,
        tokenizer=settings.tokenizer or None,
        max_batch=settings.max_batch,
        kv_cache_mb=settings.kv_cache_mb,
    )
