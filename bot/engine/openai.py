"""The engine for an OpenAI-compatible server (vLLM, `transformers serve`, ...): how to scale out.

The bot sends the same prompt text it would feed a local model (Alpaca, or the model's chat
template rendered by the bot: `PROMPT_FORMAT`) to `/v1/completions`, so the server never wraps it
a second time, and streams the answer back as server-sent events. With `PROMPT_FORMAT=server` it
sends the defused role messages to `/v1/chat/completions` instead and the server applies its own
template (llama.cpp's `llama-server`, Ollama). Token counting for history fitting
stays local, so only the tokenizer files are needed on the bot's machine.

Failures: connection errors, timeouts, 429 and 5xx are retried with exponential backoff while no
text has arrived yet; once text has been streamed a retry would repeat or contradict it, so the
reply fails instead and the chat cog apologises. Stop strings are sent to the server and also
applied locally (`EngineRequest`'s `StopScanner`), because servers cap or ignore stop lists.

Reading a response is split in three: `sse_events` (the event-stream framing), `read_completion`
(one streamed completion into an `EngineRequest`) and `OpenAIEngine._attempt` (one HTTP request and
its failure rules).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from bot.engine.base import EngineError, EngineInfo, GenerationParams, first_line
from bot.engine.interface import Engine
from bot.engine.loading import load_tokenizer
from bot.engine.request import EngineRequest, RequestState
from bot.engine.servers import KINDS, Detected, SlotMap, detect_server

log = logging.getLogger(__name__)

#: Fields outside the OpenAI schema (each server kind's names, `servers.KINDS`). Known servers
#: accept theirs; strict servers (transformers serve) answer 4xx naming the field, and then the
#: engine stops sending them.
EXTRA_FIELDS = (
    "top_k", "repetition_penalty", "repeat_penalty", "min_p", "options", "cache_prompt", "id_slot"
)  # fmt: skip


class Retryable(Exception):
    """A failure worth another try (connection, timeout, 429/5xx, a stream cut short)."""


class _CancelEvent(threading.Event):
    """`EngineRequest.cancelled` that also interrupts the request's task at once."""

    def __init__(self, on_set: Callable[[], None]) -> None:
        super().__init__()
        self._on_set = on_set

    def set(self) -> None:
        super().set()
        self._on_set()


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data` payloads of a server-sent event stream (multi-line data joined by newlines)."""
    data: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


class OpenAIEngine(Engine):
    """Streams completions from an OpenAI-compatible `/v1/completions` endpoint (or, given role
    messages, from `/v1/chat/completions`)."""

    takes_messages = True

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str = "",
        model: str,
        tokenizer: str,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_stops: int = 16,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.tokenizer_path = tokenizer
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self.max_stops = max_stops
        self.send_extras = True
        self.info = EngineInfo("openai", model, device=self.base_url)
        self.tokenizer: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[asyncio.Task[None], EngineRequest] = {}
        self.server = Detected(KINDS["other"], "not asked yet")  # told at start
        self._slots = SlotMap(0)
        self._slot_of: dict[int, int] = {}  # id(request) -> llama.cpp slot while it runs

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.tokenizer_path)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=self.timeout)
        await self._probe()

    async def _probe(self) -> None:
        """Tell the server kind (`servers.detect_server`) and say once which settings reach it;
        not fatal when the server does not answer, it may still be loading the model."""
        assert self._session is not None
        self.server = found = await detect_server(self._session, self.base_url)
        self._slots = SlotMap(found.slots)
        log.info(
            "OpenAI-compatible server at %s: %s (%s), serves %s",
            self.base_url, found.kind.label, found.evidence, found.models,
        )  # fmt: skip
        if found.models and self.model not in found.models:
            log.warning("OPENAI_MODEL=%s is not among %s", self.model, found.models)
        self.info.notes.append(f"server kind: {found.kind.reach()}")
        if found.slots:
            self.info.notes.append(f"{found.slots} slots: one per channel, prompt cache on")
        if missing := found.kind.unsupported:
            log.warning(
                "%s takes no %s: those settings have no effect with this server",
                found.kind.label, " or ".join(s.upper() for s in missing),
            )  # fmt: skip
        elif found.kind.name == "other":
            log.warning(
                "unknown server kind at %s: TOP_K and REPETITION_PENALTY are sent under vLLM's "
                "names and may be ignored",
                self.base_url,
            )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    @property
    def queue_length(self) -> int:
        """Requests the server has not started answering yet."""
        return sum(1 for gen in self._tasks.values() if gen.state is RequestState.QUEUED)

    # ---- requests ----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        cache_key: str | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> EngineRequest:
        if self._session is None:
            raise EngineError("the engine is not started")
        loop = asyncio.get_running_loop()
        gen = EngineRequest(prompt, params, cache_key, self.finish_hooks, messages=messages)
        task = loop.create_task(self._serve(gen))
        gen.cancelled = _CancelEvent(lambda: _call_soon(loop, task.cancel))
        self._tasks[task] = gen
        task.add_done_callback(lambda t: self._tasks.pop(t, None))
        return gen

    def body(self, gen: EngineRequest) -> dict[str, Any]:
        """The request: the prompt verbatim (or the role messages) and the sampling parameters.

        Messages ending with an assistant message continue it (vLLM's `continue_final_message`;
        llama.cpp's server prefills a final assistant message by itself)."""
        p = gen.params
        body: dict[str, Any] = {"model": self.model}
        if gen.messages is not None:
            body["messages"] = gen.messages
            if gen.messages and gen.messages[-1]["role"] == "assistant":
                body.update(continue_final_message=True, add_generation_prompt=False)
        else:
            body["prompt"] = gen.prompt
        body |= {
            "max_tokens": p.max_new_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p if p.temperature > 0 else 1.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if stops := list(dict.fromkeys(s for s in p.stop if s))[: self.max_stops]:
            body["stop"] = stops
        if p.seed is not None:
            body["seed"] = p.seed
        if self.send_extras:  # each server kind's own names (`servers.py`)
            body.update(self.server.kind.fields(p))
            if (slot := self._slot_of.get(id(gen))) is not None:
                body["id_slot"] = slot
        return body

    async def _serve(self, gen: EngineRequest) -> None:
        gen.stats.prompt_tokens = self.count_tokens(gen.prompt) + 1  # + BOS; usage corrects it
        if self.server.kind.slots and (slot := self._slots.acquire(gen.cache_key)) is not None:
            self._slot_of[id(gen)] = slot
        try:
            for attempt in range(self.retries + 1):
                try:
                    gen.finish(await self._attempt(gen))
                    return
                except Retryable as exc:
                    if attempt == self.retries:
                        raise EngineError(
                            f"the model server at {self.base_url} failed {attempt + 1} times; "
                            f"last: {exc}"
                        ) from None
                    delay = min(self.max_backoff, self.backoff * 2**attempt)
                    delay *= 0.75 + random.random() / 2  # jitter: replicas do not retry in step
                    log.warning("model server: %s; retry %d in %.1fs", exc, attempt + 1, delay)
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:  # the reader left or the engine closes
            if not gen.stats.finish_reason:
                gen.finish("cancelled")
        except EngineError as exc:
            log.error("%s", exc)
            gen.finish("error", exc)
        except Exception as exc:  # anything else still ends the reply with an apology
            log.exception("OpenAI-compatible request failed")
            gen.finish("error", EngineError(f"the model server request failed: {first_line(exc)}"))
        finally:
            self._slots.release(self._slot_of.pop(id(gen), None))

    async def _attempt(self, gen: EngineRequest) -> str:
        """One HTTP request; returns the finish reason.

        Raises Retryable while no text has arrived, EngineError after (a retry would repeat or
        contradict what the user already sees).
        """
        assert self._session is not None
        progress = StreamProgress()
        resp_ref: list[aiohttp.ClientResponse] = []  # to hang up on cancel
        try:
            # The channel rides along as a header so a load balancer can keep a channel on one
            # replica, where its prefix is cached (nginx: `hash $http_x_hermes_channel`).
            headers = {"X-Hermes-Channel": gen.cache_key} if gen.cache_key else None
            path = "/chat/completions" if gen.messages is not None else "/completions"
            async with self._session.post(
                f"{self.base_url}{path}", json=self.body(gen), headers=headers
            ) as resp:
                resp_ref.append(resp)
                if resp.status == 200:
                    return await read_completion(gen, resp, progress)
                again = await self._refuse(resp)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            if progress.received:
                raise EngineError(
                    f"the connection to the model server broke mid-reply: {_describe(exc)}"
                ) from None
            raise Retryable(_describe(exc)) from None
        except Retryable as exc:
            if progress.received:
                raise EngineError(f"the model server broke off the reply: {exc}") from None
            raise
        except json.JSONDecodeError as exc:
            raise EngineError(f"the model server sent malformed data: {exc}") from None
        except asyncio.CancelledError:
            if resp_ref:
                resp_ref[0].close()
            raise
        assert again  # only a refusal that dropped the extra fields gets here
        return await self._attempt(gen)

    async def _refuse(self, resp: aiohttp.ClientResponse) -> bool:
        """Classify a non-200 answer: Retryable, True to ask again without the extra fields,
        or EngineError with the server's reason."""
        detail = (await resp.text())[:300]
        if resp.status in (408, 429) or resp.status >= 500:
            raise Retryable(f"HTTP {resp.status}: {detail}")
        if (
            self.send_extras
            and resp.status in (400, 422)
            and any(f in detail for f in EXTRA_FIELDS)
        ):
            log.warning("the server rejects %s; sending only standard fields", EXTRA_FIELDS)
            self.send_extras = False
            return True
        raise EngineError(
            f"the model server at {self.base_url} refused the request (HTTP {resp.status}): "
            f"{detail}"
        )


class StreamProgress:
    """Whether any text of the reply has reached the user yet (then no retry is allowed)."""

    received: bool = False


async def read_completion(
    gen: EngineRequest, resp: aiohttp.ClientResponse, progress: StreamProgress
) -> str:
    """Stream one `/v1/completions` answer into `gen`; returns the finish reason.

    Raises Retryable for an error event or a stream cut short, json.JSONDecodeError for a
    malformed event; hangs up (closes `resp`) once a stop string ended the reply.
    """
    if gen.stats.started_at is None:
        gen.stats.started_at = time.perf_counter()
    gen.state = RequestState.DECODING  # the server answers: the prompt is in (one state for both)
    finish: str | None = None
    async for data in sse_events(resp.content):
        if data.strip() == "[DONE]":
            finish = finish or "stop"
            break
        event = json.loads(data)
        if "error" in event:
            raise Retryable(f"error in stream: {_message(event['error'])}")
        record_usage(gen, event.get("usage"))
        for choice in event.get("choices") or []:
            text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            if not take_text(gen, text, progress):
                resp.close()  # hang up: the server stops generating
                return "stop"
            finish = choice.get("finish_reason") or finish
    if finish is None:
        raise Retryable("the stream ended before the reply did")
    # The server's "stop" covers EOS and stop strings; EngineRequest.finish turns "eos" into "stop"
    # when our own scanner saw a stop.
    return "length" if finish == "length" else "eos"


def take_text(gen: EngineRequest, text: str, progress: StreamProgress) -> bool:
    """Hand one streamed piece to `gen`; False once a stop string ended the reply."""
    if not text:
        return True
    progress.received = True
    gen.stats.new_tokens += 1  # a piece per token (vLLM); the usage event corrects it
    return gen.emit(text)


def record_usage(gen: EngineRequest, usage: dict[str, Any] | None) -> None:
    """Take the server's own token counts (and cached-prefix count) when it sends them."""
    if not usage:
        return
    if usage.get("prompt_tokens"):
        gen.stats.prompt_tokens = int(usage["prompt_tokens"])
    if usage.get("completion_tokens") is not None:
        gen.stats.new_tokens = int(usage["completion_tokens"])
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens"):  # vLLM with --enable-prompt-tokens-details
        gen.stats.reused_tokens = int(details["cached_tokens"])


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing to stop
        loop.call_soon_threadsafe(callback)


def _message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the model server"
    return first_line(exc)
