"""WorkQueue: client-go semantics (one entry per key, never two workers on one key) and its
rate limiter (per-key exponential backoff, forget, an overall token bucket)."""

from __future__ import annotations

import asyncio

from poolkeeper.controller.queue import TokenBucket, WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failures_back_off_exponentially_per_key_up_to_the_cap() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.005, max_delay=30.0, burst=1000)
    delays = [queue.when("a") for _ in range(15)]
    assert delays[:4] == [0.005, 0.01, 0.02, 0.04]
    assert delays[-1] == 30.0 and max(delays) == 30.0
    assert queue.when("b") == 0.005, "another key has its own count"
    assert queue.num_requeues("a") == 15


def test_forget_starts_the_count_over() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.005)
    for _ in range(5):
        queue.when("a")
    queue.forget("a")
    assert queue.num_requeues("a") == 0 and queue.when("a") == 0.005


def test_the_token_bucket_spaces_retries_of_many_keys() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10.0, burst=3, clock=clock)
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert abs(bucket.reserve() - 0.1) < 1e-9 and abs(bucket.reserve() - 0.2) < 1e-9
    clock.now += 10
    assert bucket.reserve() == 0.0, "refilled (up to the burst)"


def test_rate_limited_adds_come_back_after_their_delay() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue(base_delay=0.02, max_delay=1.0)
        assert queue.add_rate_limited("a") == 0.02
        assert len(queue) == 0
        assert await asyncio.wait_for(queue.get(), 1.0) == "a"
        queue.done("a")
        queue.forget("a")
        queue.shutdown()

    asyncio.run(scenario())


def test_a_key_is_queued_once_and_requeued_if_it_changed_while_processed() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        queue.add("a")
        assert len(queue) == 1
        key = await queue.get()
        queue.add("a")  # changed while a worker has it: not handed to a second worker now
        assert queue._queue.empty()
        queue.done(key)
        assert await asyncio.wait_for(queue.get(), 1.0) == "a"

    asyncio.run(scenario())


def test_scheduled_says_whether_a_key_will_be_processed_without_a_resync() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        assert not queue.scheduled("a")
        queue.add_after("a", 30.0)  # a pool's own next look (Outcome.after)
        assert queue.scheduled("a")
        queue.add("b")
        assert queue.scheduled("b")
        key = await queue.get()
        assert queue.scheduled(key)  # being processed
        queue.done(key)
        assert not queue.scheduled("b")
        queue.shutdown()

    asyncio.run(scenario())
