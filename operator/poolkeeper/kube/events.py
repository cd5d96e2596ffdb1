"""Kubernetes Events for `kubectl describe`: posted in the background, repeats counted, not flooded.

Like client-go's EventCorrelator: an Event repeated within REPEAT_WINDOW bumps the `count` of the
one already posted instead of posting another, and once one object has had SIMILAR_LIMIT
different messages for one reason, further ones are combined into a single Event
("(combined from similar events): <latest message>"). Unlike client-go, repeats are not written
one PATCH each: the first occurrence is posted at once (what a person looking right now wants to
see), the increments that follow are written together at most every FLUSH_SECONDS per Event, and
within a per-object budget (BURST, then REFILL per second) shared by all of the object's Events.
A busy pool thus costs about one Event write every five seconds, however many members change,
and no occurrence is dropped: a count only arrives later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from poolkeeper.kube.api import ApiError, KubeApi, resource_path

log = logging.getLogger(__name__)
REPEAT_WINDOW = 600.0  # repeats within this counted into one Event, and similar messages combined
SIMILAR_LIMIT = 10  # different messages of one reason on one object before they are combined (client-go's)
FLUSH_SECONDS = 5.0  # the count of one Event is written at most this often
BURST, REFILL = 5.0, 0.2  # count updates per object: at once, then per second (one per 5 s)
COMBINED = "(combined from similar events): "
MESSAGE_LIMIT = 1024
_KEEP = 5000  # series remembered before the expired ones are dropped


_stamp: tuple[int, str] = (-1, "")  # the last second formatted: every reconcile asks, strftime is slow


def now_rfc3339() -> str:
    global _stamp
    second = int(time.time())
    if _stamp[0] != second:
        _stamp = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return _stamp[1]


SeriesKey = tuple[str, str, str, str | None]  # (object uid, type, reason, message; None: the combined one)


@dataclass
class _Series:
    """One Event in the API: what is written of it, and the occurrences not written yet."""

    obj: Mapping[str, Any]
    reason: str
    kind: str  # Normal or Warning
    message: str  # the message to write next
    seen: float  # monotonic time of the last occurrence
    name: str = ""  # "" until posted
    namespace: str = ""
    count: int = 0  # written
    unwritten: int = 0
    written_message: str = ""
    written_at: float = float("-inf")
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class EventRecorder:
    """Posts core/v1 Events; the same Event within 10 minutes is counted, not posted again."""

    def __init__(self, api: KubeApi, component: str = "poolkeeper", *, flush_seconds: float = FLUSH_SECONDS,
                 burst: float = BURST, refill: float = REFILL, clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.component = component
        self.flush_seconds, self.burst, self.refill, self.clock = flush_seconds, burst, refill, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # object uid -> (tokens, when counted)
        self._series: dict[SeriesKey, _Series] = {}
        self._messages: dict[tuple[str, str, str], dict[str, float]] = {}  # (uid, type, reason) -> message -> seen
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(8)
        self._hurry = asyncio.Event()  # set by flush(): write what is pending now
        self.writes = 0  # API requests sent (POST and PATCH), for tests and benchmarks

    def post(self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        """Fire and forget: a reconcile never waits on an Event."""
        kind = "Warning" if warning else "Normal"
        uid = str((obj.get("metadata") or {}).get("uid"))
        message = message[:MESSAGE_LIMIT]
        now = self.clock()
        key = self._series_key(uid, kind, reason, message, now)
        series = self._series.get(key)
        if series is None or now - series.seen >= REPEAT_WINDOW:
            if len(self._series) >= _KEEP:
                self._forget_expired(now)
            series = self._series[key] = _Series(obj, reason, kind, message, now)
        series.seen, series.unwritten = now, series.unwritten + 1
        series.message = message if key[3] is not None else (COMBINED + message)[:MESSAGE_LIMIT]
        if series.task is None:
            series.task = asyncio.ensure_future(self._write(key, series))
            self._tasks.add(series.task)
            series.task.add_done_callback(self._tasks.discard)

    def _series_key(self, uid: str, kind: str, reason: str, message: str, now: float) -> SeriesKey:
        """The Event this occurrence counts in: its own, or its reason's combined one."""
        messages = self._messages.setdefault((uid, kind, reason), {})
        if message not in messages or now - messages[message] >= REPEAT_WINDOW:
            for old in [m for m, seen in messages.items() if now - seen >= REPEAT_WINDOW]:
                del messages[old]
            if len(messages) >= SIMILAR_LIMIT:
                return (uid, kind, reason, None)
        messages[message] = now
        return (uid, kind, reason, message)

    def _forget_expired(self, now: float) -> None:
        for key in [k for k, s in self._series.items() if now - s.seen >= REPEAT_WINDOW and s.task is None]:
            del self._series[key]
        for group in [g for g, messages in self._messages.items()
                      if all(now - seen >= REPEAT_WINDOW for seen in messages.values())]:
            del self._messages[group]
        if len(self._series) >= _KEEP:  # still too many recent ones: start over rather than grow
            self._series = {k: s for k, s in self._series.items() if s.task is not None}
            self._messages.clear()

    async def flush(self) -> None:
        """Write what is pending now (at shutdown) and wait for it."""
        self._hurry.set()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._hurry.clear()

    def _budget(self, uid: str) -> float:
        """Seconds until the object may have one more count update written; reserves it."""
        now = self.clock()
        if len(self._buckets) > 10 * _KEEP:
            self._buckets.clear()
        tokens, last = self._buckets.get(uid, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.refill) - 1
        self._buckets[uid] = (tokens, now)
        return 0.0 if tokens >= 0 else -tokens / self.refill

    async def _pause(self, seconds: float) -> None:
        if seconds > 0 and not self._hurry.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), seconds)

    async def _write(self, key: SeriesKey, series: _Series) -> None:
        """Post the Event, or add the occurrences counted since its last write; until none are left."""
        try:
            while series.unwritten:
                await self._pause(series.written_at + self.flush_seconds - self.clock())
                if series.name:  # a new Event is posted at once; count updates wait for the object's budget
                    await self._pause(self._budget(key[0]))
                count, series.unwritten = series.unwritten, 0
                message = series.message
                async with self._sem:
                    try:
                        await (self._create(series, count, message) if not series.name
                               else self._add(series, count, message))
                    except (TimeoutError, ApiError, OSError) as exc:
                        log.warning("could not post event %s on %s: %s", series.reason,
                                    (series.obj.get("metadata") or {}).get("name"), exc)
                        if self._series.get(key) is series:
                            del self._series[key]  # the next occurrence starts a new Event
                        return
                series.written_at = self.clock()
        finally:
            series.task = None

    async def _create(self, series: _Series, count: int, message: str) -> None:
        meta = series.obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        name = f"{meta.get('name', 'object')}.{uuid.uuid4().hex[:12]}"
        now = now_rfc3339()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {
                "apiVersion": series.obj.get("apiVersion"), "kind": series.obj.get("kind"),
                "name": meta.get("name"), "namespace": meta.get("namespace"),
                "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": series.reason, "message": message, "type": series.kind,
            "source": {"component": self.component}, "reportingComponent": self.component,
            "firstTimestamp": now, "lastTimestamp": now, "count": count,
        }
        self.writes += 1
        await self.api.create(resource_path("v1", "events", namespace), body)
        series.name, series.namespace, series.count, series.written_message = name, namespace, count, message

    async def _add(self, series: _Series, count: int, message: str) -> None:
        patch: dict[str, Any] = {"count": series.count + count, "lastTimestamp": now_rfc3339()}
        if message != series.written_message:
            patch["message"] = message  # the combined Event shows the latest of its messages
        self.writes += 1
        await self.api.patch(resource_path("v1", "events", series.namespace, series.name), patch)
        series.count += count
        series.written_message = message
