"""Coalesced status writes: the latest status per object wins, unchanged ones are not written."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from poolkeeper.kube.api import MERGE, ApiError, KubeApi

log = logging.getLogger(__name__)


class StatusWriter:
    """At most one write per object every `interval` seconds, always the newest content."""

    def __init__(self, api: KubeApi, interval: float = 0.25) -> None:
        self.api = api
        self.interval = interval
        self._pending: dict[str, dict[str, Any]] = {}
        self._written: dict[str, str] = {}
        self._last_write: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.writes = 0

    def submit(self, path: str, status: dict[str, Any]) -> None:
        """Queue `status` (a merge patch of .status) for the object at `path` (its /status URL)."""
        if self._written.get(path) == json.dumps(status, sort_keys=True):
            self._pending.pop(path, None)
            return
        self._pending[path] = status
        if path not in self._tasks:
            self._tasks[path] = asyncio.ensure_future(self._flush_later(path))

    def forget(self, path: str) -> None:
        """The object is gone: drop what we remember about it."""
        self._pending.pop(path, None)
        self._written.pop(path, None)
        self._last_write.pop(path, None)

    async def _flush_later(self, path: str) -> None:
        try:
            while path in self._pending:
                wait = self._last_write.get(path, 0.0) + self.interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                status = self._pending.pop(path, None)
                if status is None:
                    break
                text = json.dumps(status, sort_keys=True)
                if self._written.get(path) == text:
                    continue
                self._last_write[path] = time.monotonic()
                try:
                    await self.api.patch(path, {"status": status}, MERGE)
                    self._written[path] = text
                    self.writes += 1
                except ApiError as exc:
                    if exc.status != 404:
                        log.warning("status write to %s failed: %s", path, exc)
                except (TimeoutError, OSError) as exc:
                    log.warning("status write to %s failed: %s", path, exc)
        finally:
            self._tasks.pop(path, None)

    async def flush(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
