"""Admission rules of the local engine's scheduler, without a model: order, batch cap, KV budget.

The requests are real `EngineRequest`s (made inside the event loop, as `Engine.generate` makes
them); only their prompt token ids are invented.
"""

from __future__ import annotations

import pytest

from bot.engine import EngineRequest, GenerationParams, RequestState
from bot.engine.scheduler import Scheduler

PER_TOKEN = 1000  # bytes of KV per token in these tests


def req(prompt: int, new: int = 0, name: str = "") -> EngineRequest:
    request = EngineRequest(name, GenerationParams(max_new_tokens=new))
    return request.tokenized([0] * prompt)


def names(requests) -> list[str]:
    return [r.prompt for r in requests]


async def test_first_in_first_out_up_to_max_batch():
    s = Scheduler(max_batch=2, bytes_per_token=PER_TOKEN)
    for n in "abc":
        s.submit(req(10, 5, n))
    assert names(s.admit()) == ["a", "b"]
    assert [r.state for r in s.running] == [RequestState.PREFILL] * 2
    assert names(s.queued) == ["c"] and s.queued[0].state is RequestState.QUEUED
    assert list(s.admit()) == []  # the batch is full
    s.release(s.running[0])
    assert names(s.admit()) == ["c"]


async def test_reservation_is_prompt_plus_reply_padded_to_the_longest():
    s = Scheduler(max_batch=8, bytes_per_token=PER_TOKEN)
    s.submit(req(100, 50))
    s.submit(req(10, 10))
    list(s.admit())
    assert s.running[0].reserve_tokens == 150
    assert s.reserved_bytes() == 2 * 150 * PER_TOKEN
    assert s.reserved_bytes(300) == 3 * 300 * PER_TOKEN
    assert req(5, -3).reserve_tokens == 5  # a negative reply length reserves nothing


async def test_kv_budget_holds_back_the_head_and_keeps_order():
    # room for two 100-token requests (2 x 100 x 1000 bytes), not three
    s = Scheduler(max_batch=8, kv_bytes=250 * PER_TOKEN, bytes_per_token=PER_TOKEN)
    for n in "abc":
        s.submit(req(80, 20, n))
    s.submit(req(1, 1, "tiny"))
    assert names(s.admit()) == ["a", "b"]
    # "c" does not fit; "tiny" would, but it does not overtake the head of the queue
    assert names(s.queued) == ["c", "tiny"]
    a = s.running[0]
    s.decoding(a)
    assert a.state is RequestState.DECODING
    s.release(a)
    assert a.state is RequestState.FINISHED
    assert names(s.admit()) == ["c"]  # b + c = 2 x 100 tokens fit again
    assert names(s.queued) == ["tiny"]


async def test_a_request_larger_than_the_budget_runs_alone_rather_than_never():
    s = Scheduler(max_batch=8, kv_bytes=10 * PER_TOKEN, bytes_per_token=PER_TOKEN)
    s.submit(req(500, 100, "huge"))
    s.submit(req(1, 1, "next"))
    assert names(s.admit()) == ["huge"]
    assert list(s.admit()) == []  # nothing joins it
    s.release(s.running[0])
    assert names(s.admit()) == ["next"]


async def test_no_budget_means_only_the_batch_cap_limits():
    s = Scheduler(max_batch=3, kv_bytes=0, bytes_per_token=PER_TOKEN)
    for n in "abcd":
        s.submit(req(10_000, 10_000, n))
    assert names(s.admit()) == ["a", "b", "c"]


async def test_release_and_drop_cancelled():
    s = Scheduler(max_batch=1, bytes_per_token=PER_TOKEN)
    for n in "abc":
        s.submit(req(1, 1, n))
    (a,) = s.admit()
    s.queued[0].cancel()  # "b": its caller gave up while it waited
    gone = s.drop_cancelled()
    assert names(gone) == ["b"] and gone[0].state is RequestState.CANCELLED
    assert names(s.queued) == ["c"]
    s.release(a)
    s.release(a)  # twice is harmless
    assert s.running == [] and a.state is RequestState.FINISHED
    assert names(s.admit()) == ["c"]


@pytest.mark.parametrize("cap", [0, -1])
async def test_a_batch_cap_below_one_still_admits_one(cap: int):
    s = Scheduler(max_batch=cap, bytes_per_token=PER_TOKEN)
    s.submit(req(1, 1, "a"))
    s.submit(req(1, 1, "b"))
    assert names(s.admit()) == ["a"]


async def test_release_after_finish_still_frees_the_slot():
    s = Scheduler(max_batch=1, bytes_per_token=PER_TOKEN)
    s.submit(req(1, 1, "a"))
    s.submit(req(1, 1, "b"))
    (a,) = s.admit()
    a.finish("cancelled")  # ended by its engine first, released after
    s.release(a)
    assert a.state is RequestState.CANCELLED  # release keeps the reason it ended for
    assert names(s.admit()) == ["b"] and s.running[0].state is RequestState.PREFILL
