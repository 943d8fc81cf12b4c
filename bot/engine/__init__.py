"""Text generation behind one async interface, wherever the model runs.

The package, by module (each imports only those above it, never back):
- `base`: the value types (`GenerationParams`, `ReplyStats`, `EngineInfo`, `EngineError`),
  stop-string scanning, `params_from_settings`.
- `request`: `EngineRequest`, one reply's request from `generate` to its end, and its
  `RequestState` (QUEUED, PREFILL, DECODING, FINISHED, CANCELLED); `interface`: `Engine`.
- `loading`: `plan_load` (dtype, device map, quantization) and model/tokenizer loading.
- `kv_cache`, `decode`, `sampling`, `scheduler`: the local engine's parts (growing KV layer and
  per-channel prefix cache; incremental decoding; sampling; admission against the KV budget),
  each working on `EngineRequest`s.
- `batching`: the continuous-batching loop built from those parts; `local`: `LocalEngine`.
- `openai`: `OpenAIEngine`, for an OpenAI-compatible server; `factory`: `make_engine(settings)`.

Importing the package is cheap: torch and transformers load when a local engine starts, and
the OpenAI engine (aiohttp) loads on first use of `OpenAIEngine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.engine.base import (
    EngineError,
    EngineInfo,
    FinishHook,
    GenerationParams,
    Outbox,
    ReplyStats,
    StopScanner,
    first_line,
    params_from_settings,
)
from bot.engine.factory import EngineFactory, make_engine
from bot.engine.interface import Engine
from bot.engine.loading import LoadPlan, eos_ids, load_model, load_tokenizer, plan_load
from bot.engine.local import LocalEngine
from bot.engine.request import EngineRequest, RequestState

if TYPE_CHECKING:
    from bot.engine.openai import OpenAIEngine

__all__ = [
    "Engine",
    "EngineError",
    "EngineFactory",
    "EngineInfo",
    "EngineRequest",
    "FinishHook",
    "GenerationParams",
    "LoadPlan",
    "LocalEngine",
    "OpenAIEngine",
    "Outbox",
    "ReplyStats",
    "RequestState",
    "StopScanner",
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
