"""Kubernetes Events for `kubectl describe`: posted in the background, repeats counted, not flooded."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from poolkeeper.kube.api import ApiError, KubeApi, resource_path

log = logging.getLogger(__name__)
REPEAT_WINDOW = 600.0
BURST = 30.0  # Events per object before rate limiting starts
REFILL = 2.0  # Events per second per object after that


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Posts core/v1 Events; an identical event within 10 minutes bumps `count` instead."""

    def __init__(self, api: KubeApi, component: str = "poolkeeper") -> None:
        self.api = api
        self.component = component
        self._recent: dict[tuple[str, str, str], tuple[str, str, int, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(8)
        self._buckets: dict[str, tuple[float, float]] = {}  # object uid -> (tokens, last refill)
        self._suppressed: dict[str, int] = {}

    def post(self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        """Fire and forget: a reconcile never waits on an Event. Each object gets a burst of
        BURST Events, then REFILL per second; what is held back is counted in the next one."""
        uid = str((obj.get("metadata") or {}).get("uid"))
        now = time.monotonic()
        tokens, last = self._buckets.get(uid, (BURST, now))
        tokens = min(BURST, tokens + (now - last) * REFILL)
        if tokens < 1:
            self._buckets[uid] = (tokens, now)
            self._suppressed[uid] = self._suppressed.get(uid, 0) + 1
            return
        self._buckets[uid] = (tokens - 1, now)
        held_back = self._suppressed.pop(uid, 0)
        if held_back:
            message = f"{message} ({held_back} similar Events held back by rate limiting)"
        if len(self._buckets) > 10000:
            self._buckets.clear()
        task = asyncio.ensure_future(self._post(obj, reason, message, "Warning" if warning else "Normal"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _post(self, obj: Mapping[str, Any], reason: str, message: str, kind: str) -> None:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        key = (str(meta.get("uid")), reason, message)
        now = now_rfc3339()
        async with self._sem:
            try:
                recent = self._recent.get(key)
                if recent and time.monotonic() - recent[3] < REPEAT_WINDOW:
                    name, ns, count, _ = recent
                    await self.api.patch(resource_path("v1", "events", ns, name),
                                         {"count": count + 1, "lastTimestamp": now})
                    self._recent[key] = (name, ns, count + 1, time.monotonic())
                    return
                name = f"{meta.get('name', 'object')}.{uuid.uuid4().hex[:12]}"
                body = {
                    "apiVersion": "v1", "kind": "Event",
                    "metadata": {"name": name, "namespace": namespace},
                    "involvedObject": {
                        "apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                        "name": meta.get("name"), "namespace": meta.get("namespace"),
                        "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion"),
                    },
                    "reason": reason, "message": message[:1024], "type": kind,
                    "source": {"component": self.component}, "reportingComponent": self.component,
                    "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                }
                await self.api.create(resource_path("v1", "events", namespace), body)
                self._recent[key] = (name, namespace, 1, time.monotonic())
                if len(self._recent) > 5000:
                    self._recent.clear()
            except (TimeoutError, ApiError, OSError) as exc:
                log.warning("could not post event %s on %s: %s", reason, meta.get("name"), exc)
