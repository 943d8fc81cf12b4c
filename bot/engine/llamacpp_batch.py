"""The llamacpp engine's batch loop: every active channel decoded in one `llama_decode` per step.

llama.cpp keeps one KV sequence per slot (`seq_id` = slot number). A request takes a free slot,
preferring the one its channel used last (or else the one whose cached tokens share the longest
prefix with the new prompt, or else the least recently used), removes only the slot's divergent
tail (`llama_memory_seq_rm`) and decodes just the rest of its prompt. When another slot holds
(or is about to hold) a longer prefix of the prompt, as every channel's prompt starts with the
same system prompt and persona card, the slot takes a copy of that slot's KV cache instead of
computing the shared part again (`llama_memory_seq_cp`, then the tail past the shared part
removed); a request whose donor is still prefilling waits for it, which it would in the
first-come order anyway. Each step builds one
`llama_batch`: a token for every decoding slot, then prompt tokens of the newest requests up to
the batch size, so a request that arrives mid-reply joins at the next step and prompts are
prefilled one after another (each gets its first token as soon as its own prompt is done, not
when all of them are). The slot's tokens stay after the reply: the channel's next message
reuses them.

Sampling is llama.cpp's own sampler chain per slot (repetition penalty, top-k, top-p,
temperature, seeded draw; greedy at temperature 0), so a reply's tokens do not depend on what
else is in the batch.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from bot.engine.base import EngineError, GenerationParams, Outbox
from bot.engine.request import EngineRequest, RequestState

log = logging.getLogger(__name__)

#: Tokens the repetition penalty looks back over (llama.cpp's default `repeat_last_n`).
PENALTY_WINDOW = 64

#: A prefix shared with another slot is copied rather than recomputed from this many tokens on.
#: The copy moves the donor's whole KV stream (llama.cpp copies across streams only whole), a
#: memcpy of a few MB per thousand tokens of context on a small model: cheaper than computing
#: 16 tokens of prompt on any model.
MIN_SHARED = 16


@dataclass(eq=False)
class Slot:
    """One KV sequence: the tokens it holds and the request using it (if any)."""

    seq: int
    tokens: list[int] = field(default_factory=list)  # what the KV cache holds, in order
    key: str | None = None  # the channel that used it last
    gen: EngineRequest | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not decoded yet
    next_token: int | None = None  # sampled, to be decoded at the next step
    sampler: Any = None
    decoder: Any = None
    used: int = 0  # when it was last taken (a counter), for least-recently-used choice
    donor: Donor | None = None  # a slot whose cached prefix this one copies before prefilling


@dataclass(frozen=True, eq=False)
class Donor:
    """Another slot whose KV cache holds (or will hold) a longer prefix of this slot's prompt."""

    slot: Slot
    gen: EngineRequest | None  # the donor's request when it was chosen (None: a finished slot)
    shared: int  # prompt tokens in common


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class SlotBatcher:
    """Owns the llama.cpp context on the worker thread and runs the step loop."""

    def __init__(self, llama: Any, ctx: Any, vocab: Any, *, slots: int, n_ctx_seq: int,
                 n_batch: int, tokenize: Any) -> None:  # fmt: skip
        self.llama = llama  # the `llama_cpp` bindings module
        self.ctx = ctx
        self.vocab = vocab
        self.memory = llama.llama_get_memory(ctx)
        self.slots = [Slot(i) for i in range(slots)]
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = n_batch
        self.tokenize = tokenize
        self.n_vocab = llama.llama_vocab_n_tokens(vocab)
        self.batch = llama.llama_batch_init(n_batch, 0, 1)
        self.waiting: deque[EngineRequest] = deque()
        self._clock = itertools.count(1)
        self._order: dict[int, int] = {}  # slot seq -> admission number, to prefill in order
        self._piece = ctypes.create_string_buffer(256)
        self.peak_active = 0

    def close(self) -> None:
        for slot in self.slots:
            self._free_sampler(slot)
        if self.batch is not None:
            self.llama.llama_batch_free(self.batch)
            self.batch = None

    # ---- the loop ----------------------------------------------------------------------------

    def serve(self, requests: queue.Queue[EngineRequest | None]) -> None:
        """Run until `None` arrives on `requests`; then end what runs as cancelled."""
        try:
            while True:
                if not self._take(requests):
                    return
                try:
                    self._admit()
                    if any(s.gen is not None for s in self.slots):
                        self._step()
                except Exception as exc:  # a bug must not leave replies waiting forever
                    log.exception("the llama.cpp worker failed a step")
                    for slot in self.slots:
                        if slot.gen is not None:
                            self._forget(slot)
                            self._end(slot, "error", EngineError(f"llama.cpp failed: {exc}"))
        finally:
            for slot in self.slots:
                if slot.gen is not None:
                    self._end(slot, "cancelled")
            while self.waiting:
                self.waiting.popleft().finish("cancelled")

    def _take(self, requests: queue.Queue[EngineRequest | None]) -> bool:
        """Move new requests to `waiting`; block only when there is nothing to do."""
        idle = not self.waiting and all(s.gen is None for s in self.slots)
        try:
            item = requests.get(block=idle)
            while True:
                if item is None:
                    return False
                self.waiting.append(item)
                item = requests.get_nowait()
        except queue.Empty:
            return True

    def _admit(self) -> None:
        for gen in [g for g in self.waiting if g.cancelled.is_set()]:
            self.waiting.remove(gen)
            gen.finish("cancelled")
        while self.waiting:
            free = [s for s in self.slots if s.gen is None]
            if not free:
                return
            gen = self.waiting.popleft()
            try:
                self._start(gen, free)
            except EngineError as exc:
                gen.finish("error", exc)
            except Exception as exc:
                log.exception("could not start a llama.cpp request")
                gen.finish("error", EngineError(f"llama.cpp could not start the reply: {exc}"))

    def _start(self, gen: EngineRequest, free: list[Slot]) -> None:
        tokens = self.tokenize(gen.prompt)
        if len(tokens) + 1 > self.n_ctx_seq:
            raise EngineError(
                f"the prompt is {len(tokens)} tokens, more than the {self.n_ctx_seq}-token "
                "context of a llama.cpp slot (CONTEXT_TOKENS)"
            )
        slot = next((s for s in free if gen.cache_key and s.key == gen.cache_key), None)
        if slot is None:
            best = max(free, key=lambda s: (common_prefix(s.tokens, tokens), -s.used))
            slot = best if common_prefix(best.tokens, tokens) else min(free, key=lambda s: s.used)
        keep = min(common_prefix(slot.tokens, tokens), len(tokens) - 1)  # >= 1 token to decode
        if not self.llama.llama_memory_seq_rm(self.memory, slot.seq, keep, -1):
            keep = 0
            self.llama.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
        slot.tokens = slot.tokens[:keep]
        slot.pending = tokens[keep:]
        slot.donor = self._donor(slot, tokens, keep)
        slot.key, slot.gen, slot.next_token = gen.cache_key, gen, None
        slot.used = next(self._clock)
        self._order[slot.seq] = slot.used
        slot.sampler = self._sampler(gen.params, tokens[-PENALTY_WINDOW:])
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        gen.state = RequestState.PREFILL
        gen.stats.started_at = gen.stats.started_at or _now()
        gen.stats.prompt_tokens = len(tokens)
        gen.stats.reused_tokens = keep
        self.peak_active = max(self.peak_active, sum(s.gen is not None for s in self.slots))

    def _donor(self, slot: Slot, tokens: list[int], keep: int) -> Donor | None:
        """The other slot sharing the longest prefix with `tokens`, counting what a slot that is
        still prefilling will hold; None when none shares MIN_SHARED tokens more than `keep`."""
        best: Donor | None = None
        for other in self.slots:
            if other is slot:
                continue
            held = other.tokens + other.pending if other.gen is not None else other.tokens
            shared = min(common_prefix(held, tokens), len(tokens) - 1)
            if shared - keep >= MIN_SHARED and (best is None or shared > best.shared):
                best = Donor(other, other.gen, shared)
        return best

    def _copy_prefix(self, slot: Slot) -> None:
        """Take the donor's prefix once it is in its cache; `slot.donor` stays set while the slot
        must wait (nothing of its prompt is fed meanwhile, so `tokens + pending` is the prompt).

        Called before a step adds its tokens, so `donor.slot.tokens` is what its cache holds."""
        donor = slot.donor
        assert donor is not None
        prompt = slot.tokens + slot.pending
        have = min(common_prefix(donor.slot.tokens, prompt), donor.shared)
        still_coming = donor.gen is not None and donor.slot.gen is donor.gen
        if have < donor.shared and still_coming:
            return  # the donor computes it in this or a coming step: wait for it
        slot.donor = None
        if have - len(slot.tokens) < MIN_SHARED:
            return  # the donor went before its prefix was in: compute it here
        # across KV streams llama.cpp copies only a whole stream; the tail past the shared
        # prefix is removed again before the next decode applies the copy
        self.llama.llama_memory_seq_cp(self.memory, donor.slot.seq, slot.seq, -1, -1)
        self.llama.llama_memory_seq_rm(self.memory, slot.seq, have, -1)
        slot.tokens, slot.pending = prompt[:have], prompt[have:]
        assert slot.gen is not None
        slot.gen.stats.reused_tokens = have

    def _sampler(self, p: GenerationParams, history: list[int]) -> Any:
        ll = self.llama
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if p.repetition_penalty != 1.0:
            ll.llama_sampler_chain_add(
                chain,
                ll.llama_sampler_init_penalties(
                    self.n_vocab, PENALTY_WINDOW, p.repetition_penalty, 0.0, 0.0
                ),
            )
        if p.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(p.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(p.temperature))
            seed = p.seed if p.seed is not None else 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        for token in history:  # the penalty sees the prompt's last tokens, as transformers does
            ll.llama_sampler_accept(chain, token)
        return chain

    def _free_sampler(self, slot: Slot) -> None:
        if slot.sampler is not None:
            self.llama.llama_sampler_free(slot.sampler)
            slot.sampler = None

    # ---- one step ----------------------------------------------------------------------------

    def _step(self) -> None:
        for slot in self.slots:
            if slot.gen is not None and slot.gen.cancelled.is_set():
                self._end(slot, "cancelled")
        active = [s for s in self.slots if s.gen is not None]
        if not active:
            return
        for slot in active:  # before this step adds tokens: a copy takes only decoded cells
            if slot.donor is not None:
                self._copy_prefix(slot)
        b = self.batch
        b.n_tokens = 0
        rows: list[tuple[Slot, int]] = []
        for slot in active:
            if slot.next_token is not None:
                rows.append((slot, self._add(slot.next_token, len(slot.tokens), slot.seq, True)))
                slot.tokens.append(slot.next_token)
                slot.next_token = None
        for slot in sorted(active, key=lambda s: self._order[s.seq]):  # first come, first fed
            room = self.n_batch - b.n_tokens
            if not slot.pending or room <= 0:
                continue
            if slot.donor is not None:
                continue  # still waiting for its donor's prefix
            take, slot.pending = slot.pending[:room], slot.pending[room:]
            for i, token in enumerate(take):
                last = not slot.pending and i == len(take) - 1
                row = self._add(token, len(slot.tokens), slot.seq, last)
                slot.tokens.append(token)
                if last:
                    rows.append((slot, row))
        rc = self.llama.llama_decode(self.ctx, b)
        if rc != 0:
            log.error("llama_decode failed (%d) with %d tokens in the batch", rc, b.n_tokens)
            for slot in active:
                self._forget(slot)
                self._end(slot, "error", EngineError(f"llama.cpp could not decode (code {rc})"))
            return
        outbox = Outbox()
        for slot, row in rows:
            self._sample(slot, row, outbox)
        outbox.flush()

    def _add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        b = self.batch
        i = b.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def _sample(self, slot: Slot, row: int, outbox: Outbox) -> None:
        gen = slot.gen
        assert gen is not None
        token = self.llama.llama_sampler_sample(slot.sampler, self.ctx, row)
        if self.llama.llama_vocab_is_eog(self.vocab, token) or token in gen.params.stop_ids:
            self._end(slot, "eos", outbox=outbox)
            return
        gen.stats.new_tokens += 1
        text = slot.decoder.decode(self._bytes(token))
        if text and not gen.emit(text, outbox):
            self._end(slot, "stop", outbox=outbox)
            return
        if gen.stats.new_tokens >= gen.params.max_new_tokens or len(slot.tokens) + 1 >= (
            self.n_ctx_seq
        ):
            self._end(slot, "length", outbox=outbox)
            return
        slot.next_token = token
        gen.state = RequestState.DECODING

    def _bytes(self, token: int) -> bytes:
        n = self.llama.llama_token_to_piece(self.vocab, token, self._piece, 256, 0, False)
        return self._piece.raw[: max(n, 0)]

    def _end(
        self,
        slot: Slot,
        reason: str,
        error: BaseException | None = None,
        *,
        outbox: Outbox | None = None,
    ) -> None:
        """End the slot's request; text still in `outbox` is delivered before the end."""
        if outbox is not None:
            outbox.flush()
        gen, slot.gen = slot.gen, None
        slot.next_token = None
        slot.pending = []
        slot.donor = None
        self._free_sampler(slot)
        if gen is not None:
            final = reason not in ("error", "cancelled") and slot.decoder is not None
            if final and (rest := slot.decoder.decode(b"", final=True)):
                gen.emit(rest)
            gen.finish(reason, error)

    def _forget(self, slot: Slot) -> None:
        """The slot's cache is in doubt (a failed decode): start it empty next time."""
        self.llama.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
        slot.tokens = []
        slot.key = None


def _now() -> float:
    return time.perf_counter()
