"""StatusWriter: failed writes (409, 5xx, timeouts, dropped connections) are retried with backoff,
the newest status wins, and writes that cannot succeed are not retried forever."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import pytest

from poolkeeper.kube.api import ApiError, NotLeading
from poolkeeper.kube.status import StatusWriter

PATH = "/apis/poolkeeper.dev/v1alpha1/namespaces/ns/targetpools/web/status"


class FakeApi:
    """Answers each patch with the next scripted outcome (an exception to raise, or None: written)."""

    def __init__(self, *outcomes: BaseException | None, hang: float = 0.0) -> None:
        self.outcomes = list(outcomes)
        self.attempts: list[dict[str, Any]] = []
        self.written: list[dict[str, Any]] = []
        self.hang = hang

    async def patch(self, path: str, body: Any, content_type: str = "") -> Any:
        assert path == PATH
        self.attempts.append(body["status"])
        if self.hang:
            await asyncio.sleep(self.hang)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        self.written.append(body["status"])
        return {}


def writer(api: FakeApi) -> StatusWriter:
    return StatusWriter(api, interval=0.0, first_retry=0.01)


@pytest.mark.parametrize("failure", [
    ApiError(409, "Conflict", "the object has been modified"),
    ApiError(500, "InternalError", "etcdserver: request timed out"),
    ApiError(503, "ServiceUnavailable", "the server is shutting down"),
    ApiError(429, "TooManyRequests", "slow down"),
    TimeoutError(),
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientConnectorError(aiohttp.client_reqrep.ConnectionKey(  # the API server is away
        "127.0.0.1", 6443, False, None, None, None, None), OSError(111, "Connection refused")),
])
async def test_a_failed_write_is_retried_until_it_lands(failure: BaseException) -> None:
    api = FakeApi(failure, failure, None)
    status = writer(api)
    status.submit(PATH, {"phase": "Ready"})
    await status.flush()
    assert api.written == [{"phase": "Ready"}]
    assert len(api.attempts) == 3 and status.retries == 2 and status.writes == 1


async def test_the_newest_status_wins_over_a_failed_older_one() -> None:
    api = FakeApi(ApiError(503, "ServiceUnavailable", "away"), hang=0.02)
    status = writer(api)
    status.submit(PATH, {"active": 1})
    await asyncio.sleep(0.01)  # the first write is in flight (and will fail)
    status.submit(PATH, {"active": 2})
    await status.flush()
    assert api.written == [{"active": 2}]  # the failed older status is never written after the newer


async def test_a_status_back_to_the_written_one_while_another_is_in_flight_is_still_written() -> None:
    api = FakeApi(hang=0.02)
    status = writer(api)
    status.submit(PATH, {"active": 1})
    await status.flush()
    status.submit(PATH, {"active": 2})
    await asyncio.sleep(0.01)  # {"active": 2} is being written
    status.submit(PATH, {"active": 1})  # ... and the object's status is back to what we wrote before
    await status.flush()
    assert api.written == [{"active": 1}, {"active": 2}, {"active": 1}]


@pytest.mark.parametrize("failure", [
    ApiError(404, "NotFound", "gone"),
    ApiError(422, "Invalid", "status.members: Invalid value"),
    NotLeading("PATCH", PATH),
])
async def test_a_write_that_cannot_succeed_is_not_retried(failure: BaseException) -> None:
    api = FakeApi(failure)
    status = writer(api)
    status.submit(PATH, {"phase": "Ready"})
    await status.flush()
    assert api.written == [] and len(api.attempts) == 1 and status.retries == 0


async def test_backoff_grows_and_flush_is_bounded_while_the_api_is_away() -> None:
    away = [ApiError(503, "ServiceUnavailable", "away") for _ in range(100)]
    api = FakeApi(*away)
    status = StatusWriter(api, interval=0.0, first_retry=0.05)
    status.submit(PATH, {"phase": "Ready"})
    await asyncio.sleep(0.5)
    # 0.05 .. 0.1, 0.1 .. 0.2, 0.2 .. 0.4: a handful of attempts, not a busy loop
    assert 2 <= len(api.attempts) <= 5, api.attempts
    await asyncio.wait_for(status.flush(within=0.1), 2)
    assert api.written == []


async def test_a_burst_of_writes_is_sent_a_bounded_number_at_a_time_and_each_once() -> None:
    """A cold start submits a status for every pool at once: at most `concurrency` go out together
    (the rest wait outside the request's timeout), and each is written exactly once."""
    in_flight, peak, written = 0, 0, []

    class Slow:
        async def patch(self, path: str, body: Any, content_type: str = "") -> Any:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            written.append(path)
            return {}

    status = StatusWriter(Slow(), interval=0.0, concurrency=4)
    paths = [f"/apis/x/namespaces/ns/targetpools/p{i}/status" for i in range(40)]
    for path in paths:
        status.submit(path, {"active": 1})
    await status.flush(5.0)
    assert peak == 4
    assert sorted(written) == sorted(paths)


async def test_a_busy_object_is_written_at_most_once_a_busy_interval_and_at_once_after_quiet() -> None:
    """One change after a quiet spell is written at once; changes that keep coming (a pool whose
    instances churn) are coalesced into one write per busy_interval; quiet again, back to interval."""
    times: list[float] = []
    loop = asyncio.get_running_loop()

    class Clock(FakeApi):
        async def patch(self, path: str, body: Any, content_type: str = "") -> Any:
            times.append(loop.time())
            return await super().patch(path, body, content_type)

    api = Clock()
    status = StatusWriter(api, interval=0.05, busy_interval=0.3)
    started = loop.time()
    for n in range(12):  # a change every 20 ms for 240 ms
        status.submit(PATH, {"active": n})
        await asyncio.sleep(0.02)
    await status.flush()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert times[0] - started < 0.02  # the first change: at once
    assert 0.04 <= gaps[0] < 0.2  # the second came within `interval`: waits for it, then the object is busy
    assert all(gap >= 0.29 for gap in gaps[1:]), gaps
    assert api.written[-1] == {"active": 11}  # the newest wins
    assert len(api.written) <= 3
    await asyncio.sleep(0.4)  # quiet for longer than a gap
    quiet = loop.time()
    status.submit(PATH, {"active": 99})
    await status.flush()
    assert times[-1] - quiet < 0.02  # written at once again
    status.submit(PATH, {"active": 100})
    await status.flush()
    assert 0.04 <= times[-1] - times[-2] < 0.2  # and the next one after `interval`, not `busy_interval`


async def test_a_status_the_object_already_has_is_not_written_until_this_writer_has_written_it() -> None:
    api = FakeApi()
    status = writer(api)
    listed = {"active": 3, "conditions": [{"type": "Ready", "status": "True"}]}
    status.submit(PATH, {"conditions": [{"status": "True", "type": "Ready"}], "active": 3}, listed)
    await status.flush()
    assert api.attempts == [], "a restart that finds the status it would write sends nothing"
    status.submit(PATH, {"active": 2}, listed)
    await status.flush()
    assert api.written == [{"active": 2}]
    status.submit(PATH, {"active": 3}, listed)  # the watch has not echoed the write yet: our record wins
    await status.flush()
    assert api.written == [{"active": 2}, {"active": 3}]


async def test_an_object_forgotten_is_compared_with_what_it_has_again() -> None:
    api = FakeApi()
    status = writer(api)
    status.submit(PATH, {"active": 1})
    await status.flush()
    status.forget(PATH)  # e.g. its shard was acquired again: another replica may have written since
    status.submit(PATH, {"active": 1}, {"active": 2})
    await status.flush()
    assert api.written == [{"active": 1}, {"active": 1}], "what the object has now differs: written"


async def test_a_status_given_as_a_function_is_built_only_when_compared_or_written() -> None:
    """A pool that churns submits once per event: only the status that is written gets built."""
    api = FakeApi(hang=0.02)
    status = StatusWriter(api, interval=0.05, first_retry=0.01)
    built: list[int] = []

    def build(active: int) -> Any:
        def body() -> dict[str, Any]:
            built.append(active)
            return {"active": active}
        return body

    status.submit(PATH, build(1))  # nothing pending: built at once, to compare with what was written
    assert built == [1]
    for active in (2, 3, 4):  # the first write waits out its gap: each replaces the one before, unbuilt
        status.submit(PATH, build(active))
    assert built == [1]
    await status.flush()
    assert api.written == [{"active": 4}] and built == [1, 4]

    status.submit(PATH, build(4), observed=None)  # the same as written: built, compared, not sent
    await status.flush()
    assert api.written == [{"active": 4}] and built == [1, 4, 4]
