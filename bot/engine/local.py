"""`LocalEngine`: a transformers model in this process, driven by one worker thread.

The engine puts a queue in front of the model, not a lock around it: requests are handed to one
worker thread that owns the model, so the event loop (and Discord's heartbeat) never waits on a
forward pass, and the worker is free to batch requests from many channels (`batching.py`).
Loading is `loading.py`'s; torch and transformers are imported only when the engine starts.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from bot.engine.base import EngineError, EngineInfo, GenerationParams
from bot.engine.batching import Batcher
from bot.engine.cpu_weights import prepare_for_cpu_decoding
from bot.engine.interface import Engine
from bot.engine.loading import checked_source, load_model, load_tokenizer, plan_load
from bot.engine.quantize import footprint_mb
from bot.engine.request import EngineRequest

log = logging.getLogger(__name__)


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
        self.batcher: Batcher | None = None  # made at start
        self.info = EngineInfo(
            "local", self.model_path, self.plan.dtype, quantization, dtype_why=self.plan.why
        )
        self.model: Any = None
        self.tokenizer: Any = None
        self._requests: queue.Queue[EngineRequest | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    async def start(self) -> None:
        if self._worker is not None:
            return
        begin = time.perf_counter()
        self.model, self.tokenizer = await asyncio.to_thread(self._load)
        self.info.device = str(self._device())
        self.info.dtype = self.plan.dtype
        self.info.footprint_mb = footprint_mb(self.model)
        log.info(
            "model %s loaded in %.1fs: %s",
            self.model_path, time.perf_counter() - begin, self.info.describe(),
        )
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
        checked_source(self.model_path, "model")  # a missing model is named as the model
        tokenizer = load_tokenizer(self.tokenizer_path)
        model = load_model(self.model_path, self.plan)
        if done := prepare_for_cpu_decoding(model):  # fp32 on the CPU: see cpu_weights.py
            log.info("CPU decoding: %s", done)
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
        return self._requests.qsize() + (self.batcher.queued if self.batcher else 0)

    def generate(
        self, prompt: str, params: GenerationParams, *, cache_key: str | None = None
    ) -> EngineRequest:
        if self._worker is None:
            raise EngineError("the engine is not started")
        request = EngineRequest(prompt, params, cache_key, self.finish_hooks)
        self._requests.put(request)
        return request

    # --- worker thread ---

    def _serve(self) -> None:
        """Continuous batching across channels, with per-channel prompt caches (`batching.py`)."""
        assert self.batcher is not None
        self.batcher.serve(self._requests)
