"""Text generation behind one async interface, wherever the model runs.

`Engine.generate(prompt, params)` returns a `Generation`: an async iterator of text pieces that
can be cancelled and that carries the reply's stats when done. Two implementations share it:
`LocalEngine` (transformers in this process, this module) and `OpenAIEngine` (an
OpenAI-compatible server such as vLLM, `bot/openai_engine.py`). Callers never know which one
they hold.

The local engine puts a queue in front of the model, not a lock around it: requests are handed
to one worker thread that owns the model, so the event loop (and Discord's heartbeat) never
waits on a forward pass, and the worker is free to batch requests from many channels.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bot.settings import TUNABLE

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A problem the user can fix (bad model path, quantization without CUDA, ...)."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_new_tokens: int = 400
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(slots=True)
class ReplyStats:
    """What one reply cost; feeds `/admin model status` and the metrics endpoint."""

    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str = ""  # eos | stop | length | cancelled | error

    @property
    def queue_wait(self) -> float:
        return (self.started_at or self.queued_at) - self.queued_at

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.queued_at

    @property
    def tokens_per_s(self) -> float:
        if not self.finished_at or not self.started_at or self.new_tokens == 0:
            return 0.0
        return self.new_tokens / max(self.finished_at - self.started_at, 1e-9)


@dataclass(slots=True)
class EngineInfo:
    engine: str
    model: str
    dtype: str = ""
    quantization: str = "none"
    device: str = ""
    started: float = field(default_factory=time.time)


class StopScanner:
    """Releases streamed text only once it cannot be the start of a stop string.

    Stops may arrive split across pieces ("\\n###" then " Instruction:"), so the tail that could
    still grow into a stop is held back until it can't.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self.flush()
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        safe = len(self.text) - hold
        out = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


#: Called with each reply's stats when it ends (from the worker thread or the event loop); the
#: metrics exporter registers here. Must be quick and must not raise.
FINISH_HOOKS: list[Callable[[ReplyStats], None]] = []


class Outbox:
    """Text pieces for several generations, delivered with one wake-up per event loop."""

    def __init__(self) -> None:
        self._items: dict[Any, list[tuple[asyncio.Queue[Any], str]]] = {}

    def put(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[Any], text: str) -> None:
        self._items.setdefault(loop, []).append((q, text))

    def flush(self) -> None:
        for loop, items in self._items.items():
            loop.call_soon_threadsafe(_deliver, items)
        self._items = {}


def _deliver(items: list[tuple[asyncio.Queue[Any], str]]) -> None:
    for q, text in items:
        q.put_nowait(text)


class Generation:
    """One request's stream of text pieces. Iterate it; `cancel()` or break to stop early."""

    def __init__(self, prompt: str, params: GenerationParams, cache_key: str | None) -> None:
        self.prompt = prompt
        self.params = params
        self.cache_key = cache_key
        self.stats = ReplyStats()
        self.cancelled = threading.Event()
        self._queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._scanner = StopScanner(params.stop)
        self.text = ""

    # --- called from the worker thread ---
    def emit(self, piece: str, outbox: Outbox | None = None) -> bool:
        """Feed raw model text; returns False once a stop string ended the reply.

        With an `outbox`, the text is handed over when the outbox is flushed, so a batch step
        wakes the event loop once for all its rows rather than once per row.
        """
        if self.stats.first_token_at is None and piece:
            self.stats.first_token_at = time.perf_counter()
        safe = self._scanner.feed(piece)
        if safe:
            if outbox is not None:
                outbox.put(self._loop, self._queue, safe)
            else:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, safe)
        return not self._scanner.stopped

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        if rest := self._scanner.flush():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, rest)
        if self._scanner.stopped and reason in ("eos", "length"):
            reason = "stop"
        self.stats.finish_reason = reason
        self.stats.finished_at = time.perf_counter()
        for hook in FINISH_HOOKS:
            try:
                hook(self.stats)
            except Exception:  # metrics must never break a reply
                log.exception("finish hook failed")
        self._loop.call_soon_threadsafe(self._queue.put_nowait, error)

    # --- called from the event loop ---
    def cancel(self) -> None:
        self.cancelled.set()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.text += item
                yield item
        finally:
            self.cancelled.set()  # the consumer left (break, error or task cancel): stop work

    async def text_all(self) -> str:
        async for _ in self:
            pass
        return self.text


class Engine:
    """The interface both engines implement."""

    info: EngineInfo

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def generate(
        self, prompt: str, params: GenerationParams, *, cache_key: str | None = None
    ) -> Generation:
        raise NotImplementedError

    @property
    def queue_length(self) -> int:
        return 0

    async def complete(self, prompt: str, params: GenerationParams) -> str:
        return await self.generate(prompt, params).text_all()


# --------------------------------------------------------------------------------------------
# Local transformers engine


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """How `from_pretrained` will be called; decided apart from loading so it can be tested."""

    dtype: str
    device_map: str | None
    quantization: str
    kwargs: dict[str, Any]


def plan_load(
    dtype: str = "auto",
    device_map: str = "auto",
    quantization: str = "none",
    *,
    cuda: bool | None = None,
) -> LoadPlan:
    """Pick dtype, device map and quantization config; raise EngineError for what cannot work."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if dtype == "auto":  # bf16 where the GPU has it (Ampere+), fp16 on older GPUs, fp32 on CPU
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        dtype = ("bfloat16" if bf16 else "float16") if cuda else "float32"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise EngineError(f"DTYPE={dtype!r} is not valid; use auto, bfloat16, float16 or float32")
    dm: str | None = None if device_map in ("", "none") else device_map
    if dm == "auto" and not cuda:
        dm = None  # plain CPU load; accelerate's dispatch buys nothing without a GPU
    if dm is not None and dm.startswith("cuda") and not cuda:
        raise EngineError(f"DEVICE_MAP={device_map} asks for a GPU, but CUDA is not available")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "low_cpu_mem_usage": True}
    if quantization != "none":
        if quantization not in ("4bit", "8bit"):
            raise EngineError(f"QUANTIZATION={quantization!r} is not valid; use none, 8bit or 4bit")
        if not cuda:
            raise EngineError(
                f"QUANTIZATION={quantization} needs a CUDA GPU (bitsandbytes), and none was found; "
                "set QUANTIZATION=none to run on the CPU"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise EngineError(
                f"QUANTIZATION={quantization} needs bitsandbytes: pip install 'hermes-discord[gpu]'"
            ) from None
        from transformers import BitsAndBytesConfig

        if quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=getattr(torch, dtype),
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        dm = dm or "auto"
    if dm is not None:
        kwargs["device_map"] = dm
    return LoadPlan(dtype, dm, quantization, kwargs)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise EngineError(f"cannot load a tokenizer from {path!r}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class LocalEngine(Engine):
    """transformers model in this process, driven by one worker thread."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        device_map: str = "auto",
        quantization: str = "none",
        tokenizer: str | None = None,
        max_batch: int = 8,
        kv_cache_mb: float = 0,
        prefill_chunk: int = 512,
    ) -> None:
        self.model_path = str(model_path)
        self.tokenizer_path = tokenizer or self.model_path
        self.plan = plan_load(dtype, device_map, quantization)
        self.max_batch = max_batch
        self.kv_cache_mb = kv_cache_mb
        self.prefill_chunk = prefill_chunk
        self.batcher: Any = None  # bot.batching.Batcher, made at start
        self.info = EngineInfo("local", self.model_path, self.plan.dtype, quantization)
        self.model: Any = None
        self.tokenizer: Any = None
        self._requests: queue.Queue[Generation | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    async def start(self) -> None:
        from bot.batching import Batcher

        self.model, self.tokenizer = await asyncio.to_thread(self._load)
        self.info.device = str(self._device())
        self.batcher = Batcher(
            self.model,
            self.tokenizer,
            max_batch=self.max_batch,
            kv_bytes=int(self.kv_cache_mb * 2**20),
            prefill_chunk=self.prefill_chunk,
        )
        self._worker = threading.Thread(target=self._serve, name="hermes-engine", daemon=True)
        self._worker.start()

    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(self.tokenizer_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.model_path, **self.plan.kwargs)
        except (OSError, ValueError) as exc:
            raise EngineError(
                f"cannot load the model {self.model_path!r}: {first_line(exc)}"
            ) from None
        model.eval()
        return model, tokenizer

    def _device(self) -> Any:
        return self.model.get_input_embeddings().weight.device

    async def close(self) -> None:
        if self._worker is not None:
            self._requests.put(None)
            await asyncio.to_thread(self._worker.join, 30)
            self._worker = None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    @property
    def queue_length(self) -> int:
        return self._requests.qsize() + (self.batcher.waiting if self.batcher else 0)

    def generate(
        self, prompt: str, params: GenerationParams, *, cache_key: str | None = None
    ) -> Generation:
        if self._worker is None:
            raise EngineError("the engine is not started")
        gen = Generation(prompt, params, cache_key)
        self._requests.put(gen)
        return gen

    # --- worker thread ---

    def _serve(self) -> None:
        """Continuous batching across channels, with per-channel prompt caches (bot/batching.py)."""
        self.batcher.serve(self._requests)


def cache_kwarg(model: Any) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; accept both generations."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _eos_ids(tok: Any, model: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return ids


def make_processors(p: GenerationParams) -> Any:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if p.repetition_penalty and p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature > 0:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k > 0:
            procs.append(TopKLogitsWarper(p.top_k))
        if 0 < p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
    return procs


def engine_from_settings(settings: Any, *, model: str | None = None) -> Engine:
    """The engine the settings ask for; `model` overrides MODEL (console --model, reload)."""
    model_path = model or settings.model
    if settings.engine == "openai":
        from bot.openai_engine import OpenAIEngine

        return OpenAIEngine(
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key,
            model=settings.openai_model or model_path,
            tokenizer=settings.tokenizer or model_path,
        )
    return LocalEngine(
        model_path,
        dtype=settings.dtype,
        device_map=settings.device_map,
        quantization=settings.quantization,
        tokenizer=settings.tokenizer or None,
        max_batch=settings.max_batch,
        kv_cache_mb=settings.kv_cache_mb,
    )


def params_from_settings(settings: Any, **overrides: Any) -> GenerationParams:
    """The tunable settings (`bot.settings.TUNABLE`) that are sampling parameters, then overrides."""
    names = {f.name for f in fields(GenerationParams)} & set(TUNABLE)
    base = GenerationParams(**{name: getattr(settings, name) for name in names})
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
