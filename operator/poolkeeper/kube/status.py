"""Coalesced status writes: the latest status per object wins, unchanged ones are not written,
and a write that fails for a passing reason (409, 429, 5xx, timeouts, a dropped connection:
the API server restarting) is retried with backoff instead of being lost."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import aiohttp

from poolkeeper.core.retry import backoff_delay
from poolkeeper.kube.api import MERGE, ApiError, NotLeading
from poolkeeper.kube.decoding import canonical

log = logging.getLogger(__name__)
# A status, or what builds it: a writer still waiting out an object's gap (it changed again while
# busy) keeps only the newest, so a body built at submit would be built for nothing, once per
# event, on a pool that churns (about a tenth of a reconcile's CPU at 10 members).
StatusBody = dict[str, Any] | Callable[[], dict[str, Any]]
RETRIED = frozenset({409, 429, 500, 502, 503, 504})
FIRST_RETRY = 0.5
MAX_RETRY = 30.0
WRITES_IN_FLIGHT = 16  # below the API client's 32 connections: reads and other writes keep a share


class Patcher(Protocol):
    async def patch(self, path: str, body: Any, content_type: str = ...) -> Any: ...


class StatusWriter:
    """At most one write per object every `interval` seconds, always the newest content; once an
    object changes again before that gap is over, at most one every `busy_interval` until it
    has been quiet for a gap.

    A pool whose instances churn at 10/s would otherwise cost the API server, and the operator
    (the PATCH, its answer, and the watch event it echoes), four writes a second for a status
    nobody reads that fast; one change after a quiet spell is still written within `interval`.
    """

    def __init__(self, api: Patcher, interval: float = 0.25, first_retry: float = FIRST_RETRY,
                 concurrency: int = WRITES_IN_FLIGHT, busy_interval: float | None = None,
                 on_write: Callable[[str], None] | None = None) -> None:
        self.api = api
        self.on_write = on_write  # told the path of every write that landed (a metric)
        # Writes in flight at once. A cold start submits one per pool at the same moment: unbounded,
        # they queue for the client's connections inside the request timeout, and the later ones
        # time out (and are sent again) while the API server works through the first.
        self._slots = asyncio.Semaphore(concurrency)
        self.interval = interval
        self.busy_interval = 4 * interval if busy_interval is None else max(busy_interval, interval)
        self.first_retry = first_retry
        self._pending: dict[str, StatusBody] = {}
        self._written: dict[str, bytes] = {}  # the canonical JSON last written, per object
        self._last_write: dict[str, float] = {}
        self._spacing: dict[str, float] = {}  # the gap the next write of an object keeps
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.writes = 0
        self.retries = 0

    def submit(self, path: str, status: StatusBody, observed: Mapping[str, Any] | None = None) -> None:
        """Queue `status` (a merge patch of .status) for the object at `path` (its /status URL).

        `status` may be a function that builds it: called only when it is compared or written,
        not when a newer status replaces it first.

        `observed` is the status the object has as last listed or watched. Until this writer has
        written the object it stands for what was written: a restarted operator that finds every
        status as it would write it sends nothing (about 3.5 ms of the API server's CPU per
        write, so seconds at a thousand pools). After that the writer's own record wins (the
        watch's echo of a write comes later than the write). Who takes an object over from
        another writer (a shard acquired) forgets it first, so nothing an old record says hides
        what the other wrote.
        """
        if observed is not None and path not in self._written and path not in self._tasks:
            self._written[path] = canonical(observed)
        if path not in self._tasks:
            status = _built(status)
            if self._written.get(path) == canonical(status):
                return  # (with a write in flight, this may be newer than it: the writer compares before writing)
        self._pending[path] = status
        if path not in self._tasks:
            self._tasks[path] = asyncio.ensure_future(self._flush_later(path))

    def forget(self, path: str) -> None:
        """The object is gone: drop what we remember about it."""
        self._pending.pop(path, None)
        self._written.pop(path, None)
        self._last_write.pop(path, None)
        self._spacing.pop(path, None)

    async def _flush_later(self, path: str) -> None:
        failures = 0
        try:
            while path in self._pending:
                wait = self._last_write.get(path, 0.0) + self._spacing.get(path, self.interval) - time.monotonic()
                busy = wait > 0  # changed again before the gap after its last write was over
                if busy:
                    await asyncio.sleep(wait)
                async with self._slots:
                    pending = self._pending.pop(path, None)  # the newest, also if one came while waiting
                    if pending is None:
                        break
                    status = _built(pending)
                    text = canonical(status)
                    if self._written.get(path) == text:
                        continue
                    self._last_write[path] = time.monotonic()
                    self._spacing[path] = self.busy_interval if busy else self.interval
                    problem = await self._write(path, status)
                if problem is None:
                    self._written[path] = text
                    self.writes += 1
                    if self.on_write is not None:
                        self.on_write(path)
                    failures = 0
                    continue
                if not problem:
                    continue  # not worth retrying (gone, invalid, or no longer ours to write)
                failures += 1
                self.retries += 1
                self._pending.setdefault(path, status)  # a newer status submitted meanwhile wins
                delay = backoff_delay(failures, self.first_retry, MAX_RETRY)
                log.warning("status write to %s failed (%s); retrying in %.1fs", path, problem, delay)
                await asyncio.sleep(delay)
        finally:
            self._tasks.pop(path, None)

    async def _write(self, path: str, status: dict[str, Any]) -> str | None:
        """None when written; a reason to retry; or "" when retrying cannot help."""
        try:
            await self.api.patch(path, {"status": status}, MERGE)
        except NotLeading:
            self._pending.pop(path, None)  # the replica that leads now writes the status
            return ""
        except ApiError as exc:
            if exc.status in RETRIED:
                return str(exc)
            if exc.status != 404:
                log.warning("status write to %s failed: %s", path, exc)
            return ""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None

    async def flush(self, within: float = 10.0) -> None:
        """Wait for pending writes, at most `within` seconds (a shutdown must not hang on a dead API)."""
        deadline = time.monotonic() + within
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for task in list(self._tasks.values()):
                    task.cancel()
                await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
                break
            await asyncio.wait(list(self._tasks.values()), timeout=remaining)


def _built(status: StatusBody) -> dict[str, Any]:
    return status() if callable(status) else status
