"""List, then watch from the list's resourceVersion; list again when the watch expires.

The reflector of client-go, for the high-volume sources (Pods, Nodes, Instances): the first
list is complete before any pool is reconciled, so a restarted operator never mistakes "not
seen yet" for "gone". Objects reach the handler as they arrive; nothing but the handler's
own compact record is kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from poolkeeper.kube.api import ApiError, KubeApi

log = logging.getLogger(__name__)
Handler = Callable[[str, dict[str, Any]], None]  # (ADDED | MODIFIED | DELETED, object)
PAGE = 500
WATCH_SECONDS = 300


class Gone(Exception):
    """The resourceVersion we watch from is too old: list again."""


class Informer:
    def __init__(self, api: KubeApi, path: str, handle: Handler, *, label_selector: str | None = None) -> None:
        self.api, self.path, self.handle, self.label_selector = api, path, handle, label_selector
        self.resource_version = ""
        self.known: dict[str, str] = {}  # namespace/name -> uid, to notice deletions missed between lists
        self.synced = asyncio.Event()
        self.events = 0

    def _params(self, **extra: str) -> dict[str, str]:
        params = dict(extra)
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return params

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace') or ''}/{meta.get('name')}"

    async def sync(self) -> None:
        """List every object (in pages) and hand each over; objects that vanished are DELETED."""
        seen: dict[str, str] = {}
        token = ""
        while True:
            params = self._params(limit=str(PAGE), **({"continue": token} if token else {}))
            page = await self.api.get(self.path, params=params)
            kind = (page.get("kind") or "List").removesuffix("List")
            for obj in page.get("items") or []:
                obj.setdefault("kind", kind)
                key = self._key(obj)
                seen[key] = obj["metadata"].get("uid", "")
                self._deliver("MODIFIED" if key in self.known else "ADDED", obj)
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                self.resource_version = page["metadata"]["resourceVersion"]
                break
        for key in set(self.known) - set(seen):
            namespace, _, name = key.partition("/")
            self._deliver("DELETED", {"metadata": {"namespace": namespace or None, "name": name,
                                                   "uid": self.known[key]}})
        self.known = seen
        self.synced.set()

    def _deliver(self, kind: str, obj: dict[str, Any]) -> None:
        self.events += 1
        try:
            self.handle(kind, obj)
        except Exception:  # one bad object must not stop the stream
            log.exception("handling %s %s failed", kind, self._key(obj))

    async def run(self) -> None:
        """Watch forever: reconnect on errors, list again when the server says 410 Gone."""
        delay = 0.1
        while True:
            try:
                if not self.synced.is_set():
                    await self.sync()
                await self._watch()
                delay = 0.1
            except Gone:
                log.info("watch of %s expired; listing again", self.path)
                self.synced.clear()
            except (aiohttp.ClientError, ApiError, OSError, TimeoutError, ValueError) as exc:
                log.warning("watch of %s broke (%s); retrying in %.1fs", self.path, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                if isinstance(exc, ApiError) and exc.status == 410:
                    self.synced.clear()

    async def _watch(self) -> None:
        params = self._params(watch="1", resourceVersion=self.resource_version, allowWatchBookmarks="true",
                              timeoutSeconds=str(WATCH_SECONDS))
        url = self.api.server + self.path
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=WATCH_SECONDS + 30)
        async with self.api.watch_session.get(url, params=params, timeout=timeout) as resp:
            if resp.status >= 300:
                raise ApiError(resp.status, resp.reason or "", await resp.text())
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._on_line(line)

    def _on_line(self, line: bytes) -> None:
        event = json.loads(line)
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ApiError(int(obj.get("code") or 500), obj.get("reason", ""), obj.get("message", ""))
        self.resource_version = (obj.get("metadata") or {}).get("resourceVersion") or self.resource_version
        if kind == "BOOKMARK":
            return
        key = self._key(obj)
        if kind == "DELETED":
            self.known.pop(key, None)
        else:
            self.known[key] = obj["metadata"].get("uid", "")
        self._deliver(str(kind), obj)
