"""Informer: a relist is handed over as a diff (no mass DELETE), a re-created object is a DELETE
and an ADD, async handlers are awaited in order, and a server that is away or closes every watch
at once is retried with backoff, never in a busy loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from poolkeeper.kube.api import ApiError
from poolkeeper.kube.informer import Informer


def pod(name: str, uid: str, rv: str = "1") -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": uid, "resourceVersion": rv}}


class Content:
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    async def iter_any(self) -> AsyncIterator[bytes]:
        for line in self.lines:
            yield line


class Response:
    def __init__(self, lines: list[bytes]) -> None:
        self.content = Content(lines)


class FakeApi:
    """Lists what `objects` holds; each watch plays the next script (lines, or an exception)."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects
        self.scripts: list[list[bytes] | BaseException] = []
        self.lists = 0
        self.watches = 0
        self.list_error: BaseException | None = None

    async def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        self.lists += 1
        if self.list_error is not None:
            raise self.list_error
        return {"kind": "PodList", "metadata": {"resourceVersion": "100"}, "items": [dict(o) for o in self.objects]}

    @contextlib.asynccontextmanager
    async def stream(self, path: str, params: dict[str, str], limits: Any) -> AsyncIterator[Response]:
        self.watches += 1
        script = self.scripts.pop(0) if self.scripts else []
        if isinstance(script, BaseException):
            raise script
        yield Response(script)


def event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    async def __call__(self, kind: str, obj: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # an async handler: awaited before the next event
        self.seen.append((kind, obj["metadata"]["name"], obj["metadata"].get("uid", "")))


GONE_EVENT = [event("ERROR", {"kind": "Status", "code": 410, "reason": "Expired",
                               "message": "too old resource version"})]


@pytest.mark.parametrize("gone", [GONE_EVENT, ApiError(410, "Gone", "too old resource version")],
                         ids=["error-event", "http-410"])
async def test_a_relist_after_gone_is_a_diff_not_a_mass_delete(gone: list[bytes] | BaseException) -> None:
    api = FakeApi([pod("a", "1"), pod("b", "2"), pod("c", "3")])
    rec = Recorder()
    informer = Informer(api, "/api/v1/pods", rec)  # type: ignore[arg-type]
    await informer.sync()
    assert [k for k, _, _ in rec.seen] == ["ADDED"] * 3
    rec.seen.clear()
    # While the watch was away: b was deleted, c deleted and re-created under the same name, d added.
    api.objects = [pod("a", "1"), pod("c", "33"), pod("d", "4")]
    api.scripts = [gone]
    await run_for(informer, 0.3)  # the watch says 410 Gone at once: one relist, no backoff first
    assert sorted(rec.seen) == sorted([("MODIFIED", "a", "1"), ("DELETED", "c", "3"), ("ADDED", "c", "33"),
                                       ("ADDED", "d", "4"), ("DELETED", "b", "2")])
    assert rec.seen.index(("DELETED", "c", "3")) < rec.seen.index(("ADDED", "c", "33"))
    assert informer.lists == 2


async def test_watch_events_reach_an_async_handler_in_order() -> None:
    api = FakeApi([])
    rec = Recorder()
    informer = Informer(api, "/api/v1/pods", rec)  # type: ignore[arg-type]
    await informer.sync()
    api.scripts = [[event("ADDED", pod("a", "1", "101")), event("BOOKMARK", {"metadata": {"resourceVersion": "150"}}),
                    event("MODIFIED", pod("a", "1", "160")), event("DELETED", pod("a", "1", "170"))]]
    await informer._watch()
    assert rec.seen == [("ADDED", "a", "1"), ("MODIFIED", "a", "1"), ("DELETED", "a", "1")]
    assert informer.resource_version == "170" and informer.known == {}


async def test_events_split_across_chunks_or_sharing_one_are_each_handed_over_once() -> None:
    api = FakeApi([])
    rec = Recorder()
    informer = Informer(api, "/api/v1/pods", rec)  # type: ignore[arg-type]
    await informer.sync()
    stream = b"".join(event("ADDED", pod(f"p-{i}", str(i), str(200 + i))) for i in range(4))
    cut = [7, 40, len(stream) // 2 + 3, len(stream) - 1]  # mid-line, several lines in one chunk, a last byte
    api.scripts = [[stream[a:b] for a, b in zip([0, *cut], [*cut, len(stream)], strict=True)]]
    await informer._watch()
    assert rec.seen == [("ADDED", f"p-{i}", str(i)) for i in range(4)]
    assert informer.resource_version == "203"


async def run_for(informer: Informer, seconds: float) -> None:
    task = asyncio.create_task(informer.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_server_that_ends_every_watch_at_once_is_not_hammered() -> None:
    api = FakeApi([pod("a", "1")])
    informer = Informer(api, "/api/v1/pods", Recorder())  # type: ignore[arg-type]
    await informer.sync()
    await run_for(informer, 1.0)  # every watch: 200 and an empty stream
    # backoff 0.1-0.2, 0.2-0.4, 0.4-0.8 ...: a few attempts a second, not thousands
    assert 2 <= api.watches <= 8, api.watches
    assert informer.failures >= 2


async def test_an_api_server_that_is_away_is_retried_with_backoff_and_nothing_is_deleted() -> None:
    api = FakeApi([pod("a", "1"), pod("b", "2")])
    rec = Recorder()
    informer = Informer(api, "/api/v1/pods", rec)  # type: ignore[arg-type]
    await informer.sync()
    rec.seen.clear()
    refused = aiohttp.ClientConnectionError("Cannot connect to host 127.0.0.1:6443")
    api.scripts = [refused] * 100
    api.list_error = ApiError(503, "ServiceUnavailable", "etcd is away")
    informer.synced.clear()  # (as after a 410) the next attempt lists, and the list fails too
    await run_for(informer, 1.0)
    assert 2 <= api.lists - 1 <= 8, api.lists
    assert rec.seen == []  # no DELETE while the server is away
    assert informer.known.keys() == {"ns/a", "ns/b"}


async def test_pages_are_handed_over_in_order_and_the_next_is_asked_for_meanwhile() -> None:
    objects = [pod(f"p-{i}", f"u-{i}") for i in range(5)]
    asked: list[str] = []
    handed: list[tuple[str, str]] = []

    class PagedApi:
        async def get(self, path: str, params: dict[str, str] | None = None) -> Any:
            token = (params or {}).get("continue", "")
            asked.append(token or "first")
            start = int(token or 0)
            following = start + 2 if start + 2 < len(objects) else None
            return {"kind": "PodList", "items": [dict(o) for o in objects[start:start + 2]],
                    "metadata": {"resourceVersion": "100", **({"continue": str(following)} if following else {})}}

    async def handle(kind: str, obj: dict[str, Any]) -> None:
        handed.append((kind, obj["metadata"]["name"]))
        if obj["metadata"]["name"] == "p-0":
            await asyncio.sleep(0.01)  # while the first page is handed over, the second is fetched
            assert asked == ["first", "2"]

    informer = Informer(PagedApi(), "/api/v1/pods", handle)  # type: ignore[arg-type]
    await informer.sync()
    assert handed == [("ADDED", f"p-{i}") for i in range(5)]
    assert asked == ["first", "2", "4"]
    assert informer.resource_version == "100" and len(informer.known) == 5


async def test_a_list_handed_over_concurrently_overlaps_waits_keeps_each_objects_order_and_completes() -> None:
    """list_concurrency: slow handlers of different objects overlap (at most that many at once); a
    re-created object is still DELETED before it is ADDED; sync returns once every one was handled."""
    api = FakeApi([pod(f"p{i}", str(i)) for i in range(10)])
    in_flight, peak, seen = 0, 0, []

    async def slow(kind: str, obj: dict[str, Any]) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        seen.append((kind, obj["metadata"]["name"], obj["metadata"].get("uid", "")))

    informer = Informer(api, "/api/v1/pods", slow, list_concurrency=4)  # type: ignore[arg-type]
    started = asyncio.get_running_loop().time()
    await informer.sync()
    assert asyncio.get_running_loop().time() - started < 0.4  # 10 waits of 0.05 s, 4 at a time: 3 rounds
    assert peak == 4 and in_flight == 0
    assert sorted(seen) == sorted(("ADDED", f"p{i}", str(i)) for i in range(10))
    seen.clear()
    api.objects = [pod("p0", "new"), *(pod(f"p{i}", str(i)) for i in range(1, 9))]
    await informer.sync()
    assert seen.index(("DELETED", "p0", "0")) < seen.index(("ADDED", "p0", "new"))
    assert ("DELETED", "p9", "9") in seen and len(seen) == 11
