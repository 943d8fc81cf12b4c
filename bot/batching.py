"""Continuous batching for the local engine, with a per-channel prompt cache.

Why a scheduler of our own rather than transformers' `init_continuous_batching` (evaluated on
5.24, see docs/serving.md): its per-request sampling drops repetition penalty (the bot's default
is 1.1), has no per-request seed (regenerate asks for a fresh one), knows no stop strings, and
does not report how much of a prompt came from the cache. This module keeps the engine's own
`make_processors` per request, so a reply samples the same way batched or alone.

How it works, all on the one worker thread that owns the model:
- Waiting requests are admitted first-in first-out while fewer than `max_batch` sequences run and
  their KV reservation fits the `kv_bytes` budget; the rest wait in the queue.
- A new sequence is prefilled alone (batch of one, no padding), in chunks of `prefill_chunk`
  tokens interleaved with decode steps, so a long new prompt does not freeze the other streams.
  Its channel's cached KV (`PrefixCache`) is cropped to the longest common token prefix first,
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
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bot.engine import (
    EngineError,
    Generation,
    GenerationParams,
    Outbox,
    _eos_ids,
    cache_kwarg,
    first_line,
    make_processors,
)

log = logging.getLogger(__name__)

KV = list[tuple[Any, Any]]  # per layer: (keys, values), each [1, kv_heads, tokens, head_dim]


# --------------------------------------------------------------------------------------------
# Per-channel prompt cache


@dataclass(slots=True)
class CachedPrefix:
    """The KV of the tokens a channel's last request ended with (prompt plus reply so far)."""

    ids: list[int]
    kv: KV
    nbytes: int


def kv_nbytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Least-recently-used map from cache key (a channel) to that channel's last KV.

    An entry is taken out while its channel generates, so one tensor is never shared by two
    running sequences, and put back (replaced) when the reply ends.
    """

    def __init__(self) -> None:
        self._items: OrderedDict[str, CachedPrefix] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def take(self, key: str) -> CachedPrefix | None:
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item.nbytes
        return item

    def put(self, key: str, item: CachedPrefix) -> None:
        if (old := self._items.pop(key, None)) is not None:
            self.nbytes -= old.nbytes
        self._items[key] = item
        self.nbytes += item.nbytes

    def shrink(self, limit: int) -> None:
        """Drop the least recently used entries until at most `limit` bytes remain."""
        while self._items and self.nbytes > limit:
            _, item = self._items.popitem(last=False)
            self.nbytes -= item.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


# --------------------------------------------------------------------------------------------
# Streaming text out of token ids


class IncrementalDecoder:
    """Turns generated ids into text pieces without re-decoding the whole reply every token.

    Decodes a short window (the previous piece's tokens plus the new ones) and emits what it adds;
    waits while the tail is an incomplete multi-byte character. The window keeps SentencePiece's
    leading-space handling consistent, since both decodes start on the same token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------
# A KV cache layer that grows in steps


def _growing_layer_class() -> type:
    """`DynamicLayer` that appends into spare room instead of concatenating every token.

    transformers' DynamicLayer copies the whole cache on each decode step (`torch.cat`); for a
    batch of long sequences that copy costs more than the forward pass on a CPU. This layer keeps
    spare columns (a quarter of its length, 32 to 256) and copies only when they run out. Whoever
    assigns `keys`/`values` from outside (join, leave, crop) hands it a new tensor, which it
    adopts as its buffer (and never writes into: the next append moves to a new one).
    """
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._kbuf: Any = None
            self._vbuf: Any = None
            self._kview: Any = None
            self._vview: Any = None
            self._n = 0

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.keys is not self._kview or self.values is not self._vview:
                self._adopt()  # assigned from outside since our last update
            n, t = self._n, key_states.shape[-2]
            if self._kbuf is None or n + t > self._kbuf.shape[-2]:
                self._grow(key_states, value_states, n + t + max(32, min(256, (n + t) // 4)))
            self._kbuf[..., n : n + t, :] = key_states
            self._vbuf[..., n : n + t, :] = value_states
            self._n = n + t
            self.keys = self._kview = self._kbuf[..., : self._n, :]
            self.values = self._vview = self._vbuf[..., : self._n, :]
            return self.keys, self.values

        def _adopt(self) -> None:
            if self.keys is None or self.keys.numel() == 0:
                self._kbuf = self._vbuf = None
                self._n = 0
            else:
                self._kbuf, self._vbuf, self._n = self.keys, self.values, self.keys.shape[-2]

        def _grow(self, k: Any, v: Any, capacity: int) -> None:
            kb = k.new_empty((*k.shape[:-2], capacity, k.shape[-1]))
            vb = v.new_empty((*v.shape[:-2], capacity, v.shape[-1]))
            if self._kbuf is not None and self._n:
                kb[..., : self._n, :] = self._kbuf[..., : self._n, :]
                vb[..., : self._n, :] = self._vbuf[..., : self._n, :]
            self._kbuf, self._vbuf = kb, vb

    return GrowingLayer


_GROWING: type | None = None


def new_cache(kv: KV | None = None) -> Any:
    """An empty DynamicCache of growing layers, or one holding copies of `kv`."""
    global _GROWING
    from transformers import DynamicCache

    if _GROWING is None:
        _GROWING = _growing_layer_class()
    cache = DynamicCache()
    cache.layer_class_to_replicate = _GROWING
    for i, (k, v) in enumerate(kv or []):
        cache.update(k, v, i)
    return cache


# --------------------------------------------------------------------------------------------
# The scheduler


@dataclass(eq=False)
class Sequence:
    """One admitted request: its tokens, its own cache while prefilling, its sampling state."""

    gen: Generation
    ids: list[int]  # tokens whose KV is computed (`done` of them) or still to prefill
    prompt_len: int
    reserve_tokens: int
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
class _Waiting:
    gen: Generation
    ids: list[int]


@dataclass
class Batcher:
    """Runs every request the engine receives through one continuously batched decode loop."""

    model: Any
    tokenizer: Any
    max_batch: int = 8
    kv_bytes: int = 0  # KV budget for running sequences plus cached prefixes; 0 = no cap, no cache
    prefill_chunk: int = 512
    stats: BatcherStats = field(default_factory=BatcherStats)

    def __post_init__(self) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        probe = DynamicCache(config=self.model.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            raise EngineError(
                "the local engine batches full-attention (Llama-family) models only; this model has "
                "sliding-window or other cache layers: serve it with ENGINE=openai (vLLM)"
            )
        self.max_batch = max(1, self.max_batch)
        self.prefill_chunk = max(16, self.prefill_chunk)
        self.device = self.model.get_input_embeddings().weight.device
        self.kw = cache_kwarg(self.model)
        self.bytes_per_token = kv_bytes_per_token(self.model)
        self.prefixes = PrefixCache()
        self._waiting: deque[_Waiting] = deque()
        self._prefilling: deque[Sequence] = deque()
        self._rows: list[Sequence] = []  # the decode batch, in cache row order
        self._cache: Any = None  # batch DynamicCache, left-padded to `_width` columns
        self._width = 0
        self._closing = False

    # ---- public ----------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._rows) + len(self._prefilling)

    def serve(self, requests: queue.Queue[Generation | None]) -> None:
        """The worker loop: returns after `None` arrives and every admitted request has ended."""
        import torch

        with torch.inference_mode():
            while True:
                if not self._waiting and not self.active:
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
        self._waiting.append(_Waiting(gen, list(ids)))

    def _drain(self, requests: queue.Queue[Generation | None]) -> None:
        while True:
            try:
                self._take(requests.get_nowait())
            except queue.Empty:
                return

    def _reap_cancelled(self) -> None:
        for w in [w for w in self._waiting if w.gen.cancelled.is_set()]:
            self._waiting.remove(w)
            w.gen.finish("cancelled")
        for seq in [s for s in self._prefilling if s.gen.cancelled.is_set()]:
            self._prefilling.remove(seq)
            self._retire_single(seq, "cancelled")
        gone = [i for i, s in enumerate(self._rows) if s.gen.cancelled.is_set()]
        if gone:
            self._leave({i: "cancelled" for i in gone})

    # ---- admission -------------------------------------------------------------------------

    def _reserved_bytes(self, extra_tokens: int = 0) -> int:
        """Worst-case KV of the running batch plus one more: rows are padded to the longest."""
        seqs = [*self._rows, *self._prefilling]
        longest = max([s.reserve_tokens for s in seqs] + [extra_tokens])
        return (len(seqs) + (1 if extra_tokens else 0)) * longest * self.bytes_per_token

    def _admit(self) -> None:
        while self._waiting and self.active < self.max_batch:
            w = self._waiting[0]
            p = w.gen.params
            reserve = len(w.ids) + max(p.max_new_tokens, 0)
            if self.kv_bytes > 0:
                need = self._reserved_bytes(reserve)
                if need > self.kv_bytes and self.active:
                    break  # wait for running sequences to free memory (first come, first served)
            self._waiting.popleft()
            try:
                seq = self._start(w, reserve)
            except Exception as exc:
                log.exception("could not start a request")
                w.gen.finish("error", EngineError(f"generation failed: {first_line(exc)}"))
                continue
            self._prefilling.append(seq)
            self.stats.admitted += 1
            self.stats.peak_active = max(self.stats.peak_active, self.active)

    def _start(self, w: _Waiting, reserve: int) -> Sequence:
        import torch

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
            self.prefixes.shrink(max(self.kv_bytes - self._reserved_bytes(reserve), 0))
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
            ids=ids,
            prompt_len=len(ids),
            reserve_tokens=reserve,
            processors=make_processors(p),
            generator=generator,
            decoder=IncrementalDecoder(self.tokenizer),
            history=history.to(self.device),
            done=reused,
            kv=kv,
            eos=frozenset(_eos_ids(self.tokenizer, self.model)),  # read per request: may change
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
            seq.gen.finish("error", EngineError(f"generation failed: {first_line(exc)}"))
            return 1
        if (reason := self._accept(seq, token)) is not None:
            self._retire_single(seq, reason)
        else:
            self._join(seq)
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
        for i, reason in leaving.items():
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
            self._finish(s, reason)
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
        self.stats.finished += 1
        seq.gen.finish(reason)


# --------------------------------------------------------------------------------------------
# Sampling many rows at once


def sample_rows(rows: list[Sequence], logits: Any) -> list[int]:
    """The next token of every row, each with its own processors and random generator.

    Rows that share sampling settings are processed as one block (the processors are row-wise,
    so the result equals processing each row alone); repetition penalty reads each row's own
    history, padded with that row's first id (a repeat changes nothing). One device-to-host copy
    at the end, not one per row.
    """
    import torch

    groups: dict[tuple[float, int, float, float], list[int]] = {}
    for i, s in enumerate(rows):
        groups.setdefault(s.sample_key(), []).append(i)
    picks: list[Any] = [None] * len(rows)
    for idx in groups.values():
        first = rows[idx[0]]
        scores = logits[idx] if len(idx) < len(rows) else logits
        if len(first.processors):
            scores = first.processors(_histories([rows[i] for i in idx]), scores)
        if first.params.temperature <= 0:
            chosen = scores.argmax(dim=-1)
            for j, i in enumerate(idx):
                picks[i] = chosen[j]
        else:
            probs = torch.softmax(scores, dim=-1)
            for j, i in enumerate(idx):
                picks[i] = torch.multinomial(probs[j : j + 1], 1, generator=rows[i].generator)[0, 0]
    return [int(t) for t in torch.stack(picks).tolist()]


def _histories(rows: Iterable[Sequence]) -> Any:
    import torch

    views = [s.history[: s.prompt_len + s.new_tokens] for s in rows]
    longest = max(v.shape[0] for v in views)
    return torch.stack(
        [
            v if v.shape[0] == longest else torch.cat([v, v[:1].expand(longest - v.shape[0])])
            for v in views
        ]
    )


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys plus values one token occupies across all layers."""
    import torch

    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = model.dtype if model.dtype.is_floating_point else torch.float16
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize
