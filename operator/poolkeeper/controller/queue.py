"""A work queue with the semantics of client-go's: a key is queued at most once, never
processed by two workers at once, and re-queued if it changed while being processed.

Failures back off here, as in client-go's rate-limiting queue: `add_rate_limited(key)` after a
failed attempt waits per key exponentially longer (base, 2*base, ... up to max_delay), and
never sooner than an overall token bucket allows, so a broken backend cannot make every pool
spin; `forget(key)` after a success starts the key's count over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class TokenBucket:
    """`rate` retries per second overall, `burst` at once: the delay one more must wait."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens, self._at = float(burst), clock()

    def reserve(self) -> float:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class WorkQueue(Generic[K]):
    def __init__(self, *, base_delay: float = 0.005, max_delay: float = 30.0, rate: float = 10.0,
                 burst: int = 100, clock: Callable[[], float] = time.monotonic) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._failures: dict[K, int] = {}
        self.base_delay, self.max_delay = base_delay, max_delay
        self.bucket = TokenBucket(rate, burst, clock)
        self.added = 0

    def add(self, key: K) -> None:
        self.added += 1
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Queue later; an earlier pending timer for the same key wins."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        existing = self._timers.get(key)
        due = loop.time() + delay
        if existing is not None and existing.when() <= due:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_at(due, self._fire, key)

    def when(self, key: K) -> float:
        """The delay the next `add_rate_limited(key)` would get (and counts it as a failure)."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        per_key = min(self.max_delay, self.base_delay * 2.0 ** min(failures, 62))
        return max(per_key, self.bucket.reserve())

    def add_rate_limited(self, key: K) -> float:
        """Queue after the key's backoff (another failure); returns the delay chosen."""
        delay = self.when(key)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts from the base delay again."""
        self._failures.pop(key, None)

    def num_requeues(self, key: K) -> int:
        return self._failures.get(key, 0)

    def scheduled(self, key: K) -> bool:
        """Whether the key is queued, being processed, or has a timer that will queue it."""
        return key in self._dirty or key in self._processing or key in self._timers

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> K:
        key = await self._queue.get()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.put_nowait(key)

    def __len__(self) -> int:
        return len(self._dirty)

    def waiting(self) -> int:
        """Keys a `get()` would return now, without waiting."""
        return self._queue.qsize()

    def shutdown(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
