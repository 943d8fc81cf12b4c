"""The local engine's continuous-batching loop: prefill chunks, decode steps, the batch cache.

Why a scheduler of our own rather than transformers' `init_continuous_batching` (evaluated on
5.24, see docs/serving.md): its per-request sampling drops repetition penalty (the bot's default
is 1.1), has no per-request seed (regenerate asks for a fresh one), knows no stop strings, and
does not report how much of a prompt came from the cache. It keeps the engine's own
`make_processors` (`sampling.py`) per request, so a reply samples the same way batched or alone.

How it works, all on the one worker thread that owns the model:
- Each request is one `EngineRequest` (`request.py`) whose `state` moves QUEUED -> PREFILL ->
  DECODING -> FINISHED/CANCELLED. Queued requests are admitted by `scheduler.Scheduler`
  (first-in first-out, `max_batch`, the `kv_bytes` budget); the rest wait in its queue.
- A newly admitted request is prefilled alone (batch of one, no padding), in chunks of `prefill_chunk`
  tokens interleaved with decode steps, so a long new prompt does not freeze the other streams;
  while nothing decodes, new prompts of similar length are computed in one padded forward.
  Its channel's cached KV (`kv_cache.PrefixCache`) is cropped to the longest common token prefix first,
  and only the rest is computed.
- Prefilled requests join one left-padded batch cache; each decode step is one forward pass for
  all of them (attention mask hides the padding, position ids count each row's own tokens).
  Rows leave at token granularity (EOS, stop string, length, cancel), and their KV goes back to
  the prefix cache under their channel key.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from typing import Any

from bot.engine.base import EngineError, Outbox, first_line
from bot.engine.decode import IncrementalDecoder
from bot.engine.kv_cache import KV, PrefixCache, cache_kwarg, kv_bytes_per_token, new_cache
from bot.engine.loading import eos_ids
from bot.engine.request import EngineRequest
from bot.engine.sampling import make_processors, sample_rows
from bot.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


class Batcher:
    """Runs every request the engine receives through one continuously batched decode loop."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        kv_bytes: int = 0,  # KV budget for running requests plus cached prefixes; 0 = no cache
        prefill_chunk: int = 512,
    ) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model = model
        self.tokenizer = tokenizer
        probe = DynamicCache(config=self.model.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            raise EngineError(
                "the local engine batches full-attention (Llama-family) models only; this model has "
                "sliding-window or other cache layers: serve it with ENGINE=openai (vLLM)"
            )
        self.prefill_chunk = max(16, prefill_chunk)
        self.device = self.model.get_input_embeddings().weight.device
        self.kw = cache_kwarg(self.model)
        self.bytes_per_token = kv_bytes_per_token(self.model.config, self.model.dtype)
        self.scheduler = Scheduler(max(1, max_batch), kv_bytes, self.bytes_per_token)
        self.prefixes = PrefixCache()
        self._prefilling: deque[EngineRequest] = deque()  # admitted, prompt not yet computed
        self._rows: list[EngineRequest] = []  # the decode batch, in cache row order
        self._cache: Any = None  # batch DynamicCache, left-padded to `_width` columns
        self._width = 0
        self._closing = False

    # ---- public ----------------------------------------------------------------------------

    @property
    def kv_bytes(self) -> int:
        return self.scheduler.kv_bytes

    @property
    def queued(self) -> int:
        return len(self.scheduler.queued)

    @property
    def active(self) -> int:
        return len(self.scheduler.running)

    def serve(self, requests: queue.Queue[EngineRequest | None]) -> None:
        """The worker loop: returns after `None` arrives and every admitted request has ended."""
        import torch

        with torch.inference_mode():
            while True:
                if not self.scheduler.queued and not self.active:
                    if self._closing:
                        break
                    self._take(requests.get())  # idle: block until work arrives
                self._drain(requests)
                try:
                    self._reap_cancelled()
                    self._admit()
                    self._prefill_step()
                    self._decode_step()
                except Exception as exc:  # a bug or OOM outside one forward: fail, live on
                    log.exception("batch step failed")
                    self._fail_running(EngineError(f"generation failed: {first_line(exc)}"))
        self.prefixes.clear()

    def _fail_running(self, error: EngineError) -> None:
        for req in [*self._rows, *self._prefilling]:
            self.scheduler.release(req)
            if not req.stats.finish_reason:
                req.finish("error", error)
            req.kv = None
        self._rows, self._cache, self._width = [], None, 0
        self._prefilling.clear()

    # ---- intake ----------------------------------------------------------------------------

    def _take(self, req: EngineRequest | None) -> None:
        if req is None:
            self._closing = True
            return
        try:
            ids = self.tokenizer(req.prompt).input_ids
        except Exception as exc:  # a prompt the tokenizer rejects fails alone
            req.finish("error", EngineError(f"cannot tokenize the prompt: {first_line(exc)}"))
            return
        self.scheduler.submit(req.tokenized(ids))

    def _drain(self, requests: queue.Queue[EngineRequest | None]) -> None:
        while True:
            try:
                self._take(requests.get_nowait())
            except queue.Empty:
                return

    def _reap_cancelled(self) -> None:
        for req in self.scheduler.drop_cancelled():
            req.finish("cancelled")
        for req in [r for r in self._prefilling if r.cancelled.is_set()]:
            self._prefilling.remove(req)
            self._retire_single(req, "cancelled")
        gone = [i for i, r in enumerate(self._rows) if r.cancelled.is_set()]
        if gone:
            self._leave({i: "cancelled" for i in gone})

    # ---- admission -------------------------------------------------------------------------

    def _admit(self) -> None:
        for req in self.scheduler.admit():
            try:
                self._start(req)
            except Exception as exc:
                log.exception("could not start a request")
                self.scheduler.release(req)
                req.finish("error", EngineError(f"generation failed: {first_line(exc)}"))
                continue
            self._prefilling.append(req)

    def _start(self, req: EngineRequest) -> None:
        """Set up an admitted request: its cache (from its channel's prefix), its sampling."""
        import torch

        p = req.params
        req.stats.started_at = time.perf_counter()
        req.stats.prompt_tokens = req.prompt_len
        self.prefixes.resume(req, enabled=self.kv_bytes > 0)
        if self.kv_bytes > 0:  # make room: running requests come before idle channels' caches
            # (`req` already counts among the running: reserve for the running set alone)
            self.prefixes.shrink(max(self.kv_bytes - self.scheduler.reserved_bytes(), 0))
        generator = torch.Generator(device=self.device)
        if p.seed is not None:
            generator.manual_seed(p.seed)
        else:
            generator.seed()
        history = torch.empty(req.prompt_len + max(p.max_new_tokens, 0), dtype=torch.long)
        history[: req.prompt_len] = torch.tensor(req.ids, dtype=torch.long)
        req.processors = make_processors(p)
        req.generator = generator
        req.decoder = IncrementalDecoder(self.tokenizer)
        req.history = history.to(self.device)
        # read per request (may change); the template's end-of-turn ids come with it
        req.eos = frozenset([*eos_ids(self.tokenizer, self.model), *p.stop_ids])

    # ---- prefill ---------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        """Prefill admitted prompts, oldest first, up to `prefill_chunk` tokens in all.

        The budget bounds how long the running streams wait for this step; within it, several
        short prompts get in at once, so a burst of new messages joins the batch together.
        With nothing decoding nobody waits: prompts that start cold are computed together in
        one padded forward (`_prefill_together`), as a static batch would, since one large
        matmul runs faster than several small ones.
        """
        if not self._rows and len(group := self._cold_group()) > 1:
            self._prefill_together(group)
            return
        budget = self.prefill_chunk
        while self._prefilling and (budget == self.prefill_chunk or budget >= 32):
            budget -= self._prefill_chunk(self._prefilling[0], budget)

    def _prefill_chunk(self, req: EngineRequest, budget: int) -> int:
        """One forward over the next `budget` prompt tokens of `req`; returns tokens computed.

        On the prompt's last chunk it samples the first reply token and moves the request to
        the batch (or ends it).
        """
        import torch

        try:
            if req.params.max_new_tokens <= 0:
                self._prefilling.popleft()
                self._retire_single(req, "length")
                return 0
            start = req.done
            chunk = req.ids[start : start + budget]
            ids = torch.tensor([chunk], device=self.device)
            pos = torch.arange(start, start + len(chunk), device=self.device)[None, :]
            out = self.model(
                input_ids=ids,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{self.kw: req.kv},
            )
            req.done += len(chunk)
            if req.done < len(req.ids):
                return len(chunk)
            self._prefilling.popleft()
            token = sample_rows([req], self._last_logits(out))[0]
        except Exception as exc:
            log.exception("prefill failed")
            if self._prefilling and self._prefilling[0] is req:
                self._prefilling.popleft()
            req.kv = None
            self.scheduler.release(req)
            req.finish("error", EngineError(f"generation failed: {first_line(exc)}"))
            return 1
        self._prefilled(req, token)
        return len(chunk)

    def _prefilled(self, req: EngineRequest, token: int) -> None:
        """A request whose prompt is computed, with its first token: it ends there (EOS, a stop
        string, one token asked) or joins the decode batch."""
        if (reason := self._accept(req, token)) is not None:
            self._retire_single(req, reason)
        else:
            self._join(req)
            self.scheduler.decoding(req)

    def _cold_group(self) -> list[EngineRequest]:
        """The leading prefilling requests with nothing cached, of similar lengths (the shortest
        at least 3/4 of the longest, so padding wastes little), up to `prefill_chunk` x 4 tokens
        of padded batch."""
        group: list[EngineRequest] = []
        lengths: list[int] = []
        for req in self._prefilling:
            lengths.append(len(req.ids))
            if req.done or req.params.max_new_tokens <= 0 or not req.ids:
                break
            if max(lengths) * len(lengths) > 4 * self.prefill_chunk:
                break
            if min(lengths) * 4 < max(lengths) * 3:
                break
            group.append(req)
        return group

    def _prefill_together(self, group: list[EngineRequest]) -> None:
        """One left-padded forward over `group`'s whole prompts; then each request gets its own
        cache (its row without the padding) and its first token, as `_prefill_chunk` gives."""
        import torch

        for _ in group:
            self._prefilling.popleft()
        try:
            lens = torch.tensor([len(r.ids) for r in group], device=self.device)
            width = int(lens.max())
            pad = width - lens
            ids = torch.zeros((len(group), width), dtype=torch.long, device=self.device)
            for i, r in enumerate(group):
                ids[i, int(pad[i]) :] = torch.tensor(r.ids, device=self.device)
            cols = torch.arange(width, device=self.device)
            # a query sees earlier real keys of its row; a padding query sees only itself (with
            # nothing to attend to it would give NaN keys, which poison a masked-out column)
            causal = (cols[None, :] <= cols[:, None])[None] & (cols >= pad[:, None])[:, None, :]
            mask = causal | torch.eye(width, dtype=torch.bool, device=self.device)[None]
            cache = new_cache()
            out = self.model(
                input_ids=ids,
                attention_mask=mask[:, None],
                position_ids=(cols[None, :] - pad[:, None]).clamp(min=0),
                use_cache=True,
                logits_to_keep=1,
                **{self.kw: cache},
            )
            tokens = sample_rows(group, self._last_logits(out))
            for i, r in enumerate(group):
                p = int(pad[i])
                rows = [
                    (la.keys[i : i + 1, :, p:], la.values[i : i + 1, :, p:]) for la in cache.layers
                ]
                r.kv, r.done = new_cache(rows), len(r.ids)
        except Exception as exc:
            log.exception("prefill failed for %d requests", len(group))
            error = EngineError(f"generation failed: {first_line(exc)}")
            for r in group:
                r.kv = None
                self.scheduler.release(r)
                r.finish("error", error)
            return
        for r, token in zip(group, tokens, strict=True):
            self._prefilled(r, token)

    # ---- decode ----------------------------------------------------------------------------

    def _decode_step(self) -> None:
        import torch

        rows = self._rows
        if not rows:
            return
        try:
            width = self._width
            lens = torch.tensor([r.done for r in rows], device=self.device)
            tokens = torch.tensor([[r.next_token] for r in rows], device=self.device)
            cols = torch.arange(width + 1, device=self.device)
            # 4D boolean mask (True = attend), built here: one query per row sees its own tokens,
            # not the left padding. Handing transformers a 4D mask also skips its mask builder,
            # which costs more than a small model's layer on the CPU.
            mask = (cols[None, :] >= (width - lens)[:, None])[:, None, None, :]
            out = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=lens[:, None],
                use_cache=True,
                **{self.kw: self._cache},
            )
            self._width += 1
            for r in rows:
                r.ids.append(r.next_token)
                r.done += 1
            sampled = sample_rows(rows, self._last_logits(out))
        except Exception as exc:
            log.exception("decode step failed for %d requests", len(rows))
            error = EngineError(f"generation failed: {first_line(exc)}")
            for r in rows:
                self.scheduler.release(r)
                r.finish("error", error)
            self._rows, self._cache, self._width = [], None, 0
            return
        leaving = {}
        outbox = Outbox()
        for i, (r, token) in enumerate(zip(rows, sampled, strict=True)):
            if (reason := self._accept(r, token, outbox)) is not None:
                leaving[i] = reason
        outbox.flush()  # before any finish: a reply's last piece must precede its end
        if leaving:
            self._leave(leaving)

    def _last_logits(self, out: Any) -> Any:
        # float32 for sampling; on the input device, where histories and generators live (the
        # LM head may sit on another GPU under device_map="auto")
        return out.logits[:, -1, :].float().to(self.device)

    def _accept(self, req: EngineRequest, token: int, outbox: Outbox | None = None) -> str | None:
        """Record a sampled token; returns why the request ends, or None to go on."""
        if token in req.eos:
            return "eos"
        req.history[req.prompt_len + req.stats.new_tokens] = token
        req.stats.new_tokens += 1
        piece = req.decoder.push(token)
        if piece and not req.emit(piece, outbox):
            return "stop"
        if req.stats.new_tokens >= req.params.max_new_tokens:
            return "length"
        req.next_token = token
        return None

    # ---- the batch cache -------------------------------------------------------------------

    def _join(self, req: EngineRequest) -> None:
        """Add a prefilled request to the batch, left-padding whichever side is shorter."""
        import torch
        import torch.nn.functional as F

        if self._cache is None or not self._rows:
            self._cache, self._width, self._rows = req.kv, req.done, [req]
        else:
            width = max(self._width, req.done)
            for bl, sl in zip(self._cache.layers, req.kv.layers, strict=True):
                pb, ps = (0, 0, width - self._width, 0), (0, 0, width - req.done, 0)
                bl.keys = torch.cat([F.pad(bl.keys, pb), F.pad(sl.keys, ps)], dim=0)
                bl.values = torch.cat([F.pad(bl.values, pb), F.pad(sl.values, ps)], dim=0)
            self._width = width
            self._rows.append(req)
        req.kv = None

    def _leave(self, leaving: dict[int, str]) -> None:
        """Remove finished rows: save their KV for their channel, then narrow the batch."""

        width = self._width
        for i in leaving:  # save every leaving row's KV while all still count as running
            r = self._rows[i]
            if self._cache_worthy(r):
                n = r.done
                kv = [
                    (
                        layer.keys[i : i + 1, :, width - n :, :].clone(),
                        layer.values[i : i + 1, :, width - n :, :].clone(),
                    )
                    for layer in self._cache.layers
                ]
                self._remember(r, kv)
        for i, reason in leaving.items():
            self._finish(self._rows[i], reason)
        remaining = [i for i in range(len(self._rows)) if i not in leaving]
        if not remaining:
            self._rows, self._cache, self._width = [], None, 0
            return
        self._rows = [self._rows[i] for i in remaining]
        new_width = max(r.done for r in self._rows)
        for layer in self._cache.layers:  # a list index works whatever GPU the layer is on
            layer.keys = layer.keys[remaining, :, width - new_width :, :]
            layer.values = layer.values[remaining, :, width - new_width :, :]
        self._width = new_width

    def _retire_single(self, req: EngineRequest, reason: str) -> None:
        """End a request that never joined the batch (its KV is its own cache)."""
        self.scheduler.release(req)  # it left the running set already: do not count it
        if req.kv is not None and self._cache_worthy(req):
            kv = [(layer.keys.contiguous(), layer.values.contiguous()) for layer in req.kv.layers]
            self._remember(req, kv)
        req.kv = None
        self._finish(req, reason)

    def _cache_worthy(self, req: EngineRequest) -> bool:
        return bool(self.kv_bytes > 0 and req.cache_key and req.done > 0)

    def _remember(self, req: EngineRequest, kv: KV) -> None:
        """Keep a leaving request's KV for its channel, in the room the running set leaves."""
        running = self.scheduler.reserved_bytes() if self.active else 0
        self.prefixes.keep(req, kv, self.kv_bytes - running)

    def _finish(self, req: EngineRequest, reason: str) -> None:
        self.scheduler.release(req)
        req.finish(reason)
