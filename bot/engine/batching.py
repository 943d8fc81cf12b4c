"""The local engine's continuous-batching loop: prefill chunks, decode steps, the batch cache.

Why a scheduler of our own rather than transformers' `init_continuous_batching` (evaluated on
5.24, see docs/serving.md): its per-request sampling drops repetition penalty (the bot's default
is 1.1), has no per-request seed (regenerate asks for a fresh one), knows no stop strings, and
does not report how much of a prompt came from the cache. It keeps the engine's own
`make_processors` (`sampling.py`) per request, so a reply samples the same way batched or alone.

How it works, all on the one worker thread that owns the model:
- Waiting requests are admitted by `scheduler.Scheduler` (first-in first-out, `max_batch`, the
  `kv_bytes` budget); the rest wait in its queue.
- A new sequence is prefilled alone (batch of one, no padding), in chunks of `prefill_chunk`
  tokens interleaved with decode steps, so a long new prompt does not freeze the other streams.
  Its channel's cached KV (`kv_cache.PrefixCache`) is cropped to the longest common token prefix first,
  and only the rest is computed.
- Prefilled sequences join one left-padded batch cache; each decode step is one forward pass for
  all of them (attention mask hides the padding, position ids count each row's own tokens).
  Rows leave at token granularity (EOS, stop string, length, cancel), and their KV goes back to
  the prefix cache under their channel key.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from bot.engine.base import EngineError, Generation, GenerationParams, Outbox, first_line
from bot.engine.decode import IncrementalDecoder
from bot.engine.kv_cache import (
    KV,
    CachedPrefix,
    PrefixCache,
    cache_kwarg,
    common_prefix,
    kv_bytes_per_token,
    kv_nbytes,
    new_cache,
)
from bot.engine.loading import eos_ids
from bot.engine.sampling import make_processors, sample_rows
from bot.engine.scheduler import Request, Scheduler

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    """One admitted request: its tokens, its own cache while prefilling, its sampling state."""

    gen: Generation
    req: Request  # its place in the scheduler
    ids: list[int]  # tokens whose KV is computed (`done` of them) or still to prefill
    prompt_len: int
    processors: Any
    generator: Any
    decoder: IncrementalDecoder
    history: Any  # LongTensor buffer of prompt + generated ids, for repetition penalty
    done: int = 0  # tokens of `ids` whose KV is in the cache
    kv: Any = None  # own DynamicCache while prefilling; None once in the batch
    next_token: int | None = None  # sampled, not yet fed
    new_tokens: int = 0
    eos: frozenset[int] = frozenset()

    @property
    def params(self) -> GenerationParams:
        return self.gen.params

    def sample_key(self) -> tuple[float, int, float, float]:
        p = self.params
        return (p.temperature, p.top_k, p.top_p, p.repetition_penalty)


@dataclass(slots=True)
class BatcherStats:
    """Counters for tests, `/admin model status` and the metrics endpoint."""

    peak_active: int = 0
    decode_steps: int = 0
    prefill_chunks: int = 0
    reused_tokens: int = 0
    admitted: int = 0
    finished: int = 0


@dataclass(slots=True)
class Waiting:
    """What a waiting request carries until it is admitted: its generation and prompt ids."""

    gen: Generation
    ids: list[int]


class Batcher:
    """Runs every request the engine receives through one continuously batched decode loop."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        kv_bytes: int = 0,  # KV budget for running sequences plus cached prefixes; 0 = no cache
        prefill_chunk: int = 512,
    ) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model = model
        self.tokenizer = tokenizer
        self.stats = BatcherStats()
        probe = DynamicCache(config=self.model.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            raise EngineError(
                "the local engine batches full-attention (Llama-family) models only; this model has "
                "sliding-window or other cache layers: serve it with ENGINE=openai (vLLM)"
            )
        self.prefill_chunk = max(16, prefill_chunk)
        self.device = self.model.get_input_embeddings().weight.device
        self.kw = cache_kwarg(self.model)
        self.bytes_per_token = kv_bytes_per_token(self.model)
        self.scheduler = Scheduler(max(1, max_batch), kv_bytes, self.bytes_per_token)
        self.prefixes = PrefixCache()
        self._prefilling: deque[Sequence] = deque()
        self._rows: list[Sequence] = []  # the decode batch, in cache row order
        self._cache: Any = None  # batch DynamicCache, left-padded to `_width` columns
        self._width = 0
        self._closing = False

    # ---- public ----------------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self.scheduler.max_batch = max(1, value)

    @property
    def kv_bytes(self) -> int:
        return self.scheduler.kv_bytes

    @kv_bytes.setter
    def kv_bytes(self, value: int) -> None:
        self.scheduler.kv_bytes = value

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def active(self) -> int:
        return len(self.scheduler.running)

    def serve(self, requests: queue.Queue[Generation | None]) -> None:
        """The worker loop: returns after `None` arrives and every admitted request has ended."""
        import torch

        with torch.inference_mode():
            while True:
                if not self.scheduler.waiting and not self.active:
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
        for seq in [*self._rows, *self._prefilling]:
            self.scheduler.release(seq.req)
            if not seq.gen.stats.finish_reason:
                seq.gen.finish("error", error)
            seq.kv = None
        self._rows, self._cache, self._width = [], None, 0
        self._prefilling.clear()

    # ---- intake ----------------------------------------------------------------------------

    def _take(self, gen: Generation | None) -> None:
        if gen is None:
            self._closing = True
            return
        try:
            ids = self.tokenizer(gen.prompt).input_ids
        except Exception as exc:  # a prompt the tokenizer rejects fails alone
            gen.finish("error", EngineError(f"cannot tokenize the prompt: {first_line(exc)}"))
            return
        ids = list(ids)
        self.scheduler.submit(Request(len(ids), gen.params.max_new_tokens, Waiting(gen, ids)))

    def _drain(self, requests: queue.Queue[Generation | None]) -> None:
        while True:
            try:
                self._take(requests.get_nowait())
            except queue.Empty:
                return

    def _reap_cancelled(self) -> None:
        for req in self.scheduler.drop_waiting(lambda r: r.item.gen.cancelled.is_set()):
            req.item.gen.finish("cancelled")
        for seq in [s for s in self._prefilling if s.gen.cancelled.is_set()]:
            self._prefilling.remove(seq)
            self._retire_single(seq, "cancelled")
        gone = [i for i, s in enumerate(self._rows) if s.gen.cancelled.is_set()]
        if gone:
            self._leave({i: "cancelled" for i in gone})

    # ---- admission -------------------------------------------------------------------------

    def _reserved_bytes(self, extra_tokens: int = 0) -> int:
        return self.scheduler.reserved_bytes(extra_tokens)

    def _admit(self) -> None:
        for req in self.scheduler.admit():
            try:
                seq = self._start(req)
            except Exception as exc:
                log.exception("could not start a request")
                self.scheduler.release(req)
                req.item.gen.finish("error", EngineError(f"generation failed: {first_line(exc)}"))
                continue
            self._prefilling.append(seq)
            self.stats.admitted += 1
            self.stats.peak_active = max(self.stats.peak_active, self.active)

    def _start(self, req: Request) -> Sequence:
        import torch

        w: Waiting = req.item
        gen, ids, p = w.gen, w.ids, w.gen.params
        gen.stats.started_at = time.perf_counter()
        gen.stats.prompt_tokens = len(ids)
        reused = 0
        kv = new_cache()
        cached = self.prefixes.take(gen.cache_key) if gen.cache_key and self.kv_bytes else None
        if cached is not None:
            # Keep at least one prompt token to compute: its logits give the first reply token.
            reused = min(common_prefix(cached.ids, ids), len(ids) - 1)
            if reused > 0:
                kv = new_cache([(k[..., :reused, :], v[..., :reused, :]) for k, v in cached.kv])
                self.prefixes.hits += 1
            del cached
        else:
            self.prefixes.misses += 1
        if self.kv_bytes > 0:  # make room: running sequences come before idle channels' caches
            # (`req` already counts among the running: reserve for the running set alone)
            self.prefixes.shrink(max(self.kv_bytes - self._reserved_bytes(), 0))
        gen.stats.reused_tokens = reused
        self.stats.reused_tokens += reused
        generator = torch.Generator(device=self.device)
        if p.seed is not None:
            generator.manual_seed(p.seed)
        else:
            generator.seed()
        history = torch.empty(len(ids) + max(p.max_new_tokens, 0), dtype=torch.long)
        history[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return Sequence(
            gen=gen,
            req=req,
            ids=ids,
            prompt_len=len(ids),
            processors=make_processors(p),
            generator=generator,
            decoder=IncrementalDecoder(self.tokenizer),
            history=history.to(self.device),
            done=reused,
            kv=kv,
            # read per request (may change); the template's end-of-turn ids come with it
            eos=frozenset([*eos_ids(self.tokenizer, self.model), *gen.params.stop_ids]),
        )

    # ---- prefill ---------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        """Prefill waiting prompts, oldest first, up to `prefill_chunk` tokens in all.

        The budget bounds how long the running streams wait for this step; within it, several
        short prompts get in at once, so a burst of new messages joins the batch together.
        """
        budget = self.prefill_chunk
        while self._prefilling and (budget == self.prefill_chunk or budget >= 32):
            budget -= self._prefill_chunk(self._prefilling[0], budget)

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """One forward over the next `budget` prompt tokens of `seq`; returns tokens computed.

        On the prompt's last chunk it samples the first reply token and moves the sequence to
        the batch (or ends it).
        """
        import torch

        try:
            if seq.params.max_new_tokens <= 0:
                self._prefilling.popleft()
                self._retire_single(seq, "length")
                return 0
            start = seq.done
            chunk = seq.ids[start : start + budget]
            ids = torch.tensor([chunk], device=self.device)
            pos = torch.arange(start, start + len(chunk), device=self.device)[None, :]
            out = self.model(
                input_ids=ids,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{self.kw: seq.kv},
            )
            seq.done += len(chunk)
            self.stats.prefill_chunks += 1
            if seq.done < len(seq.ids):
                return len(chunk)
            self._prefilling.popleft()
            token = sample_rows([seq], self._last_logits(out))[0]
        except Exception as exc:
            log.exception("prefill failed")
            if self._prefilling and self._prefilling[0] is seq:
                self._prefilling.popleft()
            seq.kv = None
            self.scheduler.release(seq.req)
            seq.gen.finish("error", EngineError(f"generation failed: {first_line(exc)}"))
            return 1
        if (reason := self._accept(seq, token)) is not None:
            self._retire_single(seq, reason)
        else:
            self._join(seq)
            self.scheduler.decoding(seq.req)
        return len(chunk)

    # ---- decode ----------------------------------------------------------------------------

    def _decode_step(self) -> None:
        import torch

        rows = self._rows
        if not rows:
            return
        try:
            width = self._width
            lens = torch.tensor([s.done for s in rows], device=self.device)
            tokens = torch.tensor([[s.next_token] for s in rows], device=self.device)
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
            for s in rows:
                s.ids.append(s.next_token)
                s.done += 1
            self.stats.decode_steps += 1
            sampled = sample_rows(rows, self._last_logits(out))
        except Exception as exc:
            log.exception("decode step failed for %d sequences", len(rows))
            error = EngineError(f"generation failed: {first_line(exc)}")
            for s in rows:
                self.scheduler.release(s.req)
                s.gen.finish("error", error)
            self._rows, self._cache, self._width = [], None, 0
            return
        leaving = {}
        outbox = Outbox()
        for i, (s, token) in enumerate(zip(rows, sampled, strict=True)):
            if (reason := self._accept(s, token, outbox)) is not None:
                leaving[i] = reason
        outbox.flush()  # before any finish: a reply's last piece must precede its end
        if leaving:
            self._leave(leaving)

    def _last_logits(self, out: Any) -> Any:
        # float32 for sampling; on the input device, where histories and generators live (the
        # LM head may sit on another GPU under device_map="auto")
        return out.logits[:, -1, :].float().to(self.device)

    def _accept(self, seq: Sequence, token: int, outbox: Outbox | None = None) -> str | None:
        """Record a sampled token; returns why the sequence ends, or None to go on."""
        if token in seq.eos:
            return "eos"
        seq.history[seq.prompt_len + seq.new_tokens] = token
        seq.new_tokens += 1
        seq.gen.stats.new_tokens = seq.new_tokens
        piece = seq.decoder.push(token)
        if piece and not seq.gen.emit(piece, outbox):
            return "stop"
        if seq.new_tokens >= seq.params.max_new_tokens:
            return "length"
        seq.next_token = token
        return None

    # ---- the batch cache -------------------------------------------------------------------

    def _join(self, seq: Sequence) -> None:
        """Add a prefilled sequence to the batch, left-padding whichever side is shorter."""
        import torch
        import torch.nn.functional as F

        if self._cache is None or not self._rows:
            self._cache, self._width, self._rows = seq.kv, seq.done, [seq]
        else:
            width = max(self._width, seq.done)
            for bl, sl in zip(self._cache.layers, seq.kv.layers, strict=True):
                pb, ps = (0, 0, width - self._width, 0), (0, 0, width - seq.done, 0)
                bl.keys = torch.cat([F.pad(bl.keys, pb), F.pad(sl.keys, ps)], dim=0)
                bl.values = torch.cat([F.pad(bl.values, pb), F.pad(sl.values, ps)], dim=0)
            self._width = width
            self._rows.append(seq)
        seq.kv = None

    def _leave(self, leaving: dict[int, str]) -> None:
        """Remove finished rows: save their KV for their channel, then narrow the batch."""

        width = self._width
        for i in leaving:  # save every leaving row's KV while all still count as running
            s = self._rows[i]
            if self._cache_worthy(s):
                n = s.done
                kv = [
                    (
                        layer.keys[i : i + 1, :, width - n :, :].clone(),
                        layer.values[i : i + 1, :, width - n :, :].clone(),
                    )
                    for layer in self._cache.layers
                ]
                self._remember(s, kv)
        for i, reason in leaving.items():
            self._finish(self._rows[i], reason)
        keep = [i for i in range(len(self._rows)) if i not in leaving]
        if not keep:
            self._rows, self._cache, self._width = [], None, 0
            return
        self._rows = [self._rows[i] for i in keep]
        new_width = max(s.done for s in self._rows)
        for layer in self._cache.layers:  # a list index works whatever GPU the layer is on
            layer.keys = layer.keys[keep, :, width - new_width :, :]
            layer.values = layer.values[keep, :, width - new_width :, :]
        self._width = new_width

    def _retire_single(self, seq: Sequence, reason: str) -> None:
        """End a sequence that never joined the batch (its KV is its own cache)."""
        self.scheduler.release(seq.req)  # it left the running set already: do not count it
        if seq.kv is not None and self._cache_worthy(seq) and seq.done > 0:
            kv = [(layer.keys.contiguous(), layer.values.contiguous()) for layer in seq.kv.layers]
            self._remember(seq, kv)
        seq.kv = None
        self._finish(seq, reason)

    def _cache_worthy(self, seq: Sequence) -> bool:
        return bool(self.kv_bytes > 0 and seq.gen.cache_key and seq.done > 0)

    def _remember(self, seq: Sequence, kv: KV) -> None:
        item = CachedPrefix(seq.ids[: seq.done], kv, kv_nbytes(kv))
        running = self._reserved_bytes() if self.active else 0
        room = self.kv_bytes - running
        if item.nbytes > room:
            return  # would not fit even alone: do not evict everything for it
        assert seq.gen.cache_key is not None
        self.prefixes.put(seq.gen.cache_key, item)
        self.prefixes.shrink(room)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.release(seq.req)
        self.stats.finished += 1
        seq.gen.finish(reason)
