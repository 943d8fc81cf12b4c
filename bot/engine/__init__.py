"""Text generation behind one async interface, wherever the model runs.

The package, by module (each imports only those above it, never back):
- `base`: the interface and value types (`Engine`, `Generation`, `GenerationParams`,
  `ReplyStats`, `EngineInfo`, `EngineError`), stop-string scanning, `params_from_settings`.
- `loading`: `plan_load` (dtype, device map, quantization) and model/tokenizer loading.
- `kv_cache`, `decode`, `sampling`, `scheduler`: the local engine's parts (growing KV layer and
  per-channel prefix cache; incremental decoding; sampling; admission against the KV budget).
- `batching`: the continuous-batching loop built from those parts; `local`: `LocalEngine`.
- `openai`: `OpenAIEngine`, for an OpenAI-compatible server; `factory`: `make_engine(settings)`.

Importing the package is cheap: torch and transformers load when a local engine starts, and
the OpenAI engine (aiohttp) loads on first use of `OpenAIEngine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.engine.base import (
    Engine,
    EngineError,
    EngineInfo,
    FinishHook,
    Generation,
    GenerationParams,
    Outbox,
    ReplyStats,
    StopScanner,
    first_line,
    params_from_settings,
)
from bot.engine.factory import engine_from_settings, make_engine
from bot.engine.loading import LoadPlan, eos_ids, load_model, load_tokenizer, plan_load
from bot.engine.local import LocalEngine

if TYPE_CHECKING:
    from bot.engine.openai import OpenAIEngine

__all__ = [
    "Engine",
    "EngineError",
    "EngineInfo",
    "FinishHook",
    "Generation",
    "GenerationParams",
    "LoadPlan",
    "LocalEngine",
    "OpenAIEngine",
    "Outbox",
    "ReplyStats",
    "StopScanner",
    "engine_from_settings",
    "eos_ids",
    "first_line",
    "load_model",
    "load_tokenizer",
    "make_engine",
    "params_from_settings",
    "plan_load",
]


def __getattr__(name: str) -> Any:
    """`OpenAIEngine` on first use: it pulls in aiohttp, which a local-only bot does not need."""
    if name == "OpenAIEngine":
        from bot.engine.openai import OpenAIEngine

        return OpenAIEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
