"""StatusWriter: failed writes (409, 5xx, timeouts, dropped connections) are retried with backoff,
the newest status wins, and writes that cannot succeed are not retried forever."""

from __future__ import annotations

import asyncio
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
