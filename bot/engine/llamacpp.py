"""`LlamaCppEngine`: a `.gguf` model served in this process by llama.cpp (`llama-cpp-python`).

What a CPU machine runs best: the file's quantized weights as they are (a 7B Q4_K_M is 3.8 GB
where fp32 transformers weights are 27 GB), its tokenizer and chat template from the same file.
One worker thread owns the llama.cpp context and decodes every active channel in one batch
(`llamacpp_batch.SlotBatcher`), each channel in its own KV sequence so its next message reuses
the cached prefix. `THREADS` and `N_GPU_LAYERS` go to llama.cpp; the KV budget
(`KV_CACHE_MB`) decides how many sequences fit beside `MAX_BATCH`.

`llama-cpp-python` is the optional extra `llamacpp` (it compiles llama.cpp on install); it is
imported when the engine starts, so the rest of the bot never needs it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

from bot.engine.base import EngineError, EngineInfo, GenerationParams
from bot.engine.interface import Engine
from bot.engine.request import EngineRequest
from bot.engine_choice import INSTALL_HINT

log = logging.getLogger(__name__)


def import_llama() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineError(f"ENGINE=llamacpp needs llama-cpp-python: {INSTALL_HINT}") from exc
    return llama_cpp


class LlamaCppEngine(Engine):
    """A GGUF model in this process, on llama.cpp, several channels per decode step."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        threads: int = 0,
        n_gpu_layers: int = 0,
        max_batch: int = 8,
        context_tokens: int = 4096,
        kv_cache_mb: float = 0,
        batch_tokens: int = 512,
        tokenizer: str | None = None,
    ) -> None:
        self.model_path = str(Path(model_path).expanduser())
        self.tokenizer_path = tokenizer
        self.threads = threads or os.cpu_count() or 1
        self.n_gpu_layers = n_gpu_layers
        self.max_batch = max_batch
        self.context_tokens = context_tokens
        self.kv_cache_mb = kv_cache_mb
        self.batch_tokens = batch_tokens
        self.info = EngineInfo("llamacpp", self.model_path, device="cpu")
        self.chat_template = ""  # the file's `tokenizer.chat_template`
        #: the same vocabulary as a transformers tokenizer (from the file, or TOKENIZER): the
        #: conversation layer reads the prompt format and its control tokens from it, as it does
        #: for the other engines; llama.cpp's own tokenizer counts and feeds the tokens
        self.tokenizer: Any = None
        self.control_tokens: tuple[str, ...] = ()  # the vocabulary's control tokens, as text
        self.eog_tokens: tuple[str, ...] = ()  # end-of-generation tokens (EOS, end of turn)
        self.llama: Any = None
        self.batcher: Any = None
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._tok_lock = threading.Lock()
        self._requests: queue.Queue[EngineRequest | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._worker is not None:
            return
        await asyncio.to_thread(self._load)
        self._worker = threading.Thread(target=self._serve, name="hermes-llamacpp", daemon=True)
        self._worker.start()

    def _load(self) -> None:
        if not Path(self.model_path).is_file():
            raise EngineError(f"model file not found: {self.model_path}")
        ll = self.llama = import_llama()
        ll.llama_backend_init()
        _quiet(ll)
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = self.n_gpu_layers
        model = ll.llama_model_load_from_file(self.model_path.encode(), mparams)
        if not model:
            raise EngineError(f"llama.cpp cannot load {self.model_path} (not a GGUF model?)")
        self._model = model
        self._vocab = ll.llama_model_get_vocab(model)
        slots = self._slots(ll, model)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self.context_tokens * slots
        cparams.n_batch = cparams.n_ubatch = self.batch_tokens
        cparams.n_seq_max = slots
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.kv_unified = False  # one KV stream per slot: each attends over its own tokens
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            raise EngineError(
                f"llama.cpp cannot make a {cparams.n_ctx}-token context for {slots} slots "
                "(lower CONTEXT_TOKENS or MAX_BATCH)"
            )
        self._ctx = ctx
        from bot.engine.llamacpp_batch import SlotBatcher

        self.batcher = SlotBatcher(
            ll, ctx, self._vocab, slots=slots, n_ctx_seq=ll.llama_n_ctx_seq(ctx),
            n_batch=self.batch_tokens, tokenize=self.tokenize,
        )  # fmt: skip
        self._describe(ll, model, slots)
        self.tokenizer = self._hf_tokenizer()

    def _hf_tokenizer(self) -> Any:
        if self.tokenizer_path:
            from bot.engine.loading import load_tokenizer

            return load_tokenizer(self.tokenizer_path)
        from bot.gguf import GGUFError, load_gguf_tokenizer

        try:
            return load_gguf_tokenizer(self.model_path)
        except GGUFError as exc:  # llama.cpp reads more files than transformers does
            log.warning("%s; prompts use the Alpaca format (set TOKENIZER to change)", exc)
            return None

    def _slots(self, ll: Any, model: Any) -> int:
        """MAX_BATCH sequences, fewer when their whole windows would pass KV_CACHE_MB."""
        layers = ll.llama_model_n_layer(model)
        kv_heads = ll.llama_model_n_head_kv(model) or ll.llama_model_n_head(model)
        head_dim = ll.llama_model_n_embd(model) // max(ll.llama_model_n_head(model), 1)
        per_token = 2 * layers * kv_heads * head_dim * 2  # K and V, f16
        if self.kv_cache_mb <= 0:
            return self.max_batch
        fit = int(self.kv_cache_mb * 2**20 // (per_token * self.context_tokens))
        if fit < self.max_batch:
            log.warning(
                "KV_CACHE_MB=%s holds %d %d-token windows: llama.cpp runs %d channels at once",
                self.kv_cache_mb, fit, self.context_tokens, max(fit, 1),
            )  # fmt: skip
        return max(1, min(self.max_batch, fit))

    def _describe(self, ll: Any, model: Any, slots: int) -> None:
        buf = ctypes.create_string_buffer(256)
        ll.llama_model_desc(model, buf, 256)
        desc = buf.value.decode(errors="replace")  # e.g. "llama 135M Q4_1"
        self.info.dtype = desc.rsplit(" ", 1)[-1] if " " in desc else desc
        self.info.quantization = f"gguf {self.info.dtype}"
        gpu = self.n_gpu_layers and ll.llama_supports_gpu_offload()
        self.info.device = f"cpu, {self.threads} threads" + (
            f", {self.n_gpu_layers} layers on GPU" if gpu else ""
        )
        self.info.notes.append(f"llama.cpp: {desc}, {slots} slots of {self.context_tokens} tokens")
        template = ll.llama_model_chat_template(model, None)
        self.chat_template = template.decode(errors="replace") if template else ""
        control, eog = [], []
        for token in range(ll.llama_vocab_n_tokens(self._vocab)):
            attr = ll.llama_vocab_get_attr(self._vocab, token)
            if attr & ll.LLAMA_TOKEN_ATTR_CONTROL:
                text = ll.llama_vocab_get_text(self._vocab, token).decode(errors="replace")
                control.append(text)
                if ll.llama_vocab_is_eog(self._vocab, token):
                    eog.append(text)
        self.control_tokens, self.eog_tokens = tuple(control), tuple(eog)

    async def close(self) -> None:
        if self._worker is not None:
            self._requests.put(None)
            await asyncio.to_thread(self._worker.join, 60)
            self._worker = None
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        if self._ctx is not None:
            self.llama.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self.llama.llama_model_free(self._model)
            self._model = None

    # ---- tokens ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """llama.cpp's token ids of `text`; control tokens written in it (the template's
        `<|im_start|>`) are parsed as such, which is why untrusted text is defused first."""
        ll = self.llama
        data = text.encode()
        with self._tok_lock:
            n = len(data) + 8
            buf = (ll.llama_token * n)()
            got = ll.llama_tokenize(self._vocab, data, len(data), buf, n, add_special, True)
            if got < 0:
                buf = (ll.llama_token * -got)()
                got = ll.llama_tokenize(self._vocab, data, len(data), buf, -got, add_special, True)
        return list(buf[:got])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_special=False))

    def control_token_count(self, text: str) -> int:
        """How many of `text`'s llama.cpp tokens are control tokens (the check that defused
        text holds none: it must be 0 for anything a member wrote)."""
        ll = self.llama
        return sum(
            bool(ll.llama_vocab_get_attr(self._vocab, t) & ll.LLAMA_TOKEN_ATTR_CONTROL)
            for t in self.tokenize(text, add_special=False)
        )

    # ---- requests ----------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return self._requests.qsize() + (len(self.batcher.waiting) if self.batcher else 0)

    def generate(
        self, prompt: str, params: GenerationParams, *, cache_key: str | None = None
    ) -> EngineRequest:
        if self._worker is None:
            raise EngineError("the engine is not started")
        gen = EngineRequest(prompt, params, cache_key, self.finish_hooks)
        self._requests.put(gen)
        return gen

    def _serve(self) -> None:
        assert self.batcher is not None
        try:
            self.batcher.serve(self._requests)
        except Exception:  # a bug must not leave replies waiting forever
            log.exception("the llama.cpp worker failed")
            raise


def _quiet(ll: Any) -> None:
    """llama.cpp logs every tensor on load to stderr; keep warnings and errors only."""

    @ll.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        if level in (3, 4) and text:  # GGML_LOG_LEVEL_WARN, _ERROR
            log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())

    _quiet.callback = callback  # type: ignore[attr-defined]  # kept alive for the C side
    ll.llama_log_set(callback, ctypes.c_void_p(0))
