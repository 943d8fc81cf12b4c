"""The local engine's KV memory: a cache layer that grows in steps, and a per-channel prefix cache.

- `new_cache` makes a transformers `DynamicCache` whose layers append into spare room instead of
  concatenating every token (the copy otherwise costs more than a small model's forward pass).
- `PrefixCache` keeps, per channel, the KV of the tokens its last request ended with, so the next
  message in that channel only computes what is new.
  `PrefixCache.resume` seeds a request's own cache from it; `PrefixCache.keep` stores what a
  finished request leaves.
- `kv_bytes_per_token` is what the scheduler's KV budget is counted in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from bot.engine.request import EngineRequest

KV = list[tuple[Any, Any]]  # per layer: (keys, values), each [1, kv_heads, tokens, head_dim]


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

    def resume(self, request: EngineRequest, *, enabled: bool) -> None:
        """Give `request` its own cache, holding the KV its channel's last request left for the
        prompt prefix the two share; sets `request.kv`, `request.done` and the reused count.

        At least one prompt token is left to compute: its logits give the first reply token.
        With `enabled` false (no KV budget) every request starts cold.
        """
        reused = 0
        kv = new_cache()
        cached = self.take(request.cache_key) if enabled and request.cache_key else None
        if cached is not None:
            reused = min(common_prefix(cached.ids, request.ids), len(request.ids) - 1)
            if reused > 0:
                kv = new_cache([(k[..., :reused, :], v[..., :reused, :]) for k, v in cached.kv])
                self.hits += 1
        else:
            self.misses += 1
        request.kv, request.done = kv, reused
        request.stats.reused_tokens = reused

    def keep(self, request: EngineRequest, kv: KV, room: int) -> None:
        """Store `kv` (of `request.ids[:request.done]`) for the request's channel, then evict the
        least recently used entries down to `room` bytes. An entry that would not fit even
        alone is not stored: it must not evict everything for nothing."""
        item = CachedPrefix(request.ids[: request.done], kv, kv_nbytes(kv))
        if item.nbytes > room or not request.cache_key:
            return
        self.put(request.cache_key, item)
        self.shrink(room)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


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


def kv_bytes_per_token(config: Any, dtype: Any) -> int:
    """Bytes of keys plus values one token occupies across all layers, for a model of this
    config whose weights are `dtype` (a quantized model keeps its KV in float16)."""
    import torch

    cfg = config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = dtype if dtype.is_floating_point else torch.float16
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize


def cache_kwarg(model: Any) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; accept both generations."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
