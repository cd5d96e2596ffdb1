"""List, then watch from the list's resourceVersion; list again when the watch expires.

The reflector of client-go, and the one watch stack of the operator: every kind (Pods, Nodes,
Instances, TargetPools, LoadBalancers, LifecycleHandlers, Namespaces) comes through it. The
first list is complete before any pool is reconciled, so a restarted operator never mistakes
"not seen yet" for "gone"; a later list (after 410 Gone, "too old resourceVersion") is handed
over as a diff: MODIFIED/ADDED for what is there, DELETED only for what is really missing.
Errors, and an API server that is away, are retried with capped, jittered backoff (a watch
that ends at once counts as an error, so a flapping server never causes a busy loop). Objects
reach the handler as they arrive; nothing but the handler's own compact record is kept.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import aiohttp

from poolkeeper.core.compact import shared_name
from poolkeeper.core.retry import backoff_delay
from poolkeeper.kube.api import ApiError, KubeApi
from poolkeeper.kube.decoding import Schema, decode

log = logging.getLogger(__name__)
Handler = Callable[[str, dict[str, Any]], Awaitable[None] | None]  # (ADDED | MODIFIED | DELETED, object)
PAGE = 2000  # objects per list page: 500 took 18.6 s to every pool Ready at 100,000 pods, 2,000 14.6 s (same memory)
WATCH_SECONDS = 300
FIRST_DELAY, MAX_DELAY = 0.2, 5.0  # an API server back is noticed within 5 s
SHORT_WATCH = 1.0  # a watch that ends sooner than this, with nothing in it, counts as a failure


class Gone(Exception):
    """The resourceVersion we watch from is too old: list again."""


class Identities:
    """namespace -> name -> uid of what a list or watch showed: the names are the objects' own
    strings, so 100,000 pods cost a map slot each, not a `namespace/name` string each."""

    def __init__(self) -> None:
        self._by_namespace: dict[str, dict[str, str]] = {}

    def put(self, namespace: str, name: str, uid: str) -> None:
        self._by_namespace.setdefault(shared_name(namespace), {})[name] = uid

    def uid(self, namespace: str, name: str) -> str | None:
        return self._by_namespace.get(namespace, {}).get(name)

    def drop(self, namespace: str, name: str) -> None:
        names = self._by_namespace.get(namespace)
        if names is not None:
            names.pop(name, None)
            if not names:
                del self._by_namespace[namespace]

    def missing_from(self, other: Identities) -> Iterator[tuple[str, str, str]]:
        """(namespace, name, uid) of what this holds and `other` does not."""
        for namespace, names in self._by_namespace.items():
            theirs = other._by_namespace.get(namespace, {})
            for name, uid in names.items():
                if name not in theirs:
                    yield namespace, name, uid

    def keys(self) -> set[str]:
        """`namespace/name` of every object (for tests and logs)."""
        return {f"{namespace}/{name}" for namespace, names in self._by_namespace.items() for name in names}

    def __len__(self) -> int:
        return sum(len(names) for names in self._by_namespace.values())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Identities):
            return self._by_namespace == other._by_namespace
        if isinstance(other, dict):  # as a flat {namespace/name: uid} map (tests)
            return {f"{ns}/{n}": u for ns, names in self._by_namespace.items() for n, u in names.items()} == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class Informer:
    def __init__(self, api: KubeApi, path: str, handle: Handler, *, label_selector: str | None = None,
                 list_concurrency: int = 1, schema: Schema | None = None) -> None:
        self.api, self.path, self.handle, self.label_selector = api, path, handle, label_selector
        # the fields the handler reads (kube.decoding), or None: objects are decoded whole
        self.schema = schema
        # objects of one list whose (async) handling may overlap: for handlers that wait on I/O
        # per object (a LoadBalancer's probe, a LifecycleHandler's outbox); each object's own
        # events stay in order, and the list is complete only when every one was handled
        self.list_concurrency = max(1, list_concurrency)
        self.resource_version = ""
        self.known = Identities()  # namespace -> name -> uid, to notice deletions missed between lists
        self.synced = asyncio.Event()
        self.events = 0
        self.lists = 0  # completed lists: 1 + the relists
        self.failures = 0  # consecutive failed list/watch attempts (0 while healthy)

    def _params(self, **extra: str) -> dict[str, str]:
        params = dict(extra)
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return params

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace') or ''}/{meta.get('name')}"

    @staticmethod
    def _names(obj: Mapping[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return meta.get("namespace") or "", meta.get("name") or ""

    async def sync(self) -> None:
        """List every object (in pages) and hand each over; objects that vanished are DELETED.

        The next page is asked for before this one is handed over, so the API server prepares it
        while we decode and convert (two processes on two cores instead of taking turns).
        """
        seen = Identities()
        running: set[asyncio.Future[None]] = set()
        page = await self._page("")
        while True:
            token = (page.get("metadata") or {}).get("continue") or ""
            following = asyncio.ensure_future(self._page(token)) if token else None
            try:
                kind = (page.get("kind") or "List").removesuffix("List")
                for obj in page.get("items") or []:
                    obj.setdefault("kind", kind)
                    namespace, name = self._names(obj)
                    uid = obj["metadata"].get("uid", "")
                    seen.put(namespace, name, uid)
                    known = self.known.uid(namespace, name)
                    events = []
                    if known is not None and known != uid:  # re-created while we did not watch
                        events.append(("DELETED", self._tombstone(namespace, name, known)))
                        known = None
                    events.append(("MODIFIED" if known is not None else "ADDED", obj))
                    await self._hand_over(events, running)
                if following is None:
                    await asyncio.gather(*running)
            except BaseException:
                for task in [*running, *([following] if following is not None else [])]:
                    task.cancel()
                await asyncio.gather(*running, *([following] if following is not None else []),
                                     return_exceptions=True)
                raise
            if following is None:
                self.resource_version = page["metadata"]["resourceVersion"]
                break
            page = await following
        for namespace, name, uid in list(self.known.missing_from(seen)):
            await self._deliver("DELETED", self._tombstone(namespace, name, uid))
        self.known = seen
        self.lists += 1
        self.synced.set()

    async def _hand_over(self, events: list[tuple[str, dict[str, Any]]], running: set[asyncio.Future[None]]) -> None:
        """One listed object's events, in order: at once, or beside up to list_concurrency others."""
        if self.list_concurrency == 1:
            for kind, obj in events:
                await self._deliver(kind, obj)
            return
        while len(running) >= self.list_concurrency:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            running.difference_update(done)
            for task in done:
                task.result()

        async def deliver() -> None:
            for kind, obj in events:
                await self._deliver(kind, obj)
        running.add(asyncio.ensure_future(deliver()))

    async def _page(self, token: str) -> Any:
        params = self._params(limit=str(PAGE), **({"continue": token} if token else {}))
        return await self.api.get(self.path, params=params,
                                  **({"decode": self.schema.page} if self.schema is not None else {}))

    @staticmethod
    def _tombstone(namespace: str, name: str, uid: str) -> dict[str, Any]:
        """What a DELETED missed between lists carries: the identity we knew."""
        return {"metadata": {"namespace": namespace or None, "name": name, "uid": uid}}

    async def _deliver(self, kind: str, obj: dict[str, Any]) -> None:
        self.events += 1
        (obj.get("metadata") or {}).pop("managedFields", None)  # never read; the largest part of a kept body
        try:
            result = self.handle(kind, obj)
            if result is not None and inspect.isawaitable(result):  # most handlers are plain functions
                await result
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad object must not stop the stream
            log.exception("handling %s %s failed", kind, self._key(obj))

    async def run(self) -> None:
        """Watch forever: reconnect with backoff on errors, list again when the server says 410 Gone."""
        while True:
            started, events, listing = time.monotonic(), self.events, not self.synced.is_set()
            try:
                if listing:
                    await self.sync()
                    started, events = time.monotonic(), self.events
                await self._watch()
            except Gone:
                log.info("watch of %s expired (410 Gone); listing again", self.path)
                self.synced.clear()
                if listing and time.monotonic() - started < SHORT_WATCH:
                    await self._failed("expired at once after a list")  # else the list is the retry
                continue
            except (aiohttp.ClientError, ApiError, OSError, TimeoutError, ValueError) as exc:
                if isinstance(exc, ApiError) and exc.status == 410:  # a list's continue token expired
                    self.synced.clear()
                await self._failed(f"broke ({exc})")
                continue
            if self.events == events and time.monotonic() - started < SHORT_WATCH:
                await self._failed("ended at once")
            else:
                self.failures = 0

    async def _failed(self, what: str) -> None:
        self.failures += 1
        delay = backoff_delay(self.failures, FIRST_DELAY, MAX_DELAY)
        log.warning("watch of %s %s; retrying in %.1fs", self.path, what, delay)
        await asyncio.sleep(delay)

    async def _watch(self) -> None:
        params = self._params(watch="1", resourceVersion=self.resource_version, allowWatchBookmarks="true",
                              timeoutSeconds=str(WATCH_SECONDS))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=WATCH_SECONDS + 30)
        try:
            async with self.api.stream(self.path, params, timeout) as resp:
                buffer = b""
                async for chunk in resp.content.iter_any():
                    if b"\n" not in chunk:
                        buffer += chunk
                        continue
                    *lines, buffer = (buffer + chunk).split(b"\n")  # once per chunk, not once per line
                    for line in lines:
                        if line.strip():
                            await self._on_line(line)
        except ApiError as exc:
            if exc.status == 410:  # refused up front rather than as an ERROR event: the same
                raise Gone() from exc
            raise

    async def _on_line(self, line: bytes) -> None:
        event = self.schema.event(line) if self.schema is not None else decode(line)
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ApiError(int(obj.get("code") or 500), obj.get("reason", ""), obj.get("message", ""))
        self.resource_version = (obj.get("metadata") or {}).get("resourceVersion") or self.resource_version
        if kind == "BOOKMARK":
            return
        namespace, name = self._names(obj)
        if kind == "DELETED":
            self.known.drop(namespace, name)
        else:
            self.known.put(namespace, name, obj["metadata"].get("uid", ""))
        await self._deliver(str(kind), obj)
