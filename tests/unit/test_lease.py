"""LeaderElector: never two acting leaders. The leader acts only until its renew deadline (its own
monotonic clock, so a paused process notices on waking); a standby acquires only after seeing the
Lease unchanged for the lease duration (its own clock too), which is later."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf
import pytest

from poolkeeper.kube.api import ApiError, KubeApi, NotLeading
from poolkeeper.kube.lease import LeaderElector


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LeaseApi:
    """An in-memory Lease store with the API server's optimistic concurrency (409 on a stale write)."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ApiError(503, "ServiceUnavailable", "the API server is away")

    async def get_or_none(self, path: str) -> Any:
        self._check()
        return copy.deepcopy(self.lease)

    async def get(self, path: str) -> Any:
        self._check()
        if self.lease is None:
            raise ApiError(404, "NotFound", "no lease")
        return copy.deepcopy(self.lease)

    def _store(self, body: dict[str, Any]) -> Any:
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    async def create(self, path: str, body: Any) -> Any:
        self._check()
        if self.lease is not None:
            raise ApiError(409, "AlreadyExists", "lease exists")
        return self._store(body)

    async def replace(self, path: str, body: Any) -> Any:
        self._check()
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        return self._store(body)

    @property
    def holder(self) -> str | None:
        return None if self.lease is None else self.lease["spec"]["holderIdentity"]


def elector(api: LeaseApi, clock: Clock, identity: str) -> LeaderElector:
    return LeaderElector(api, namespace="ns", name="poolkeeper", identity=identity,  # type: ignore[arg-type]
                         duration=15.0, renew_deadline=10.0, retry=2.0, clock=clock)


def test_the_renew_deadline_must_be_shorter_than_the_lease() -> None:
    with pytest.raises(ValueError):
        LeaderElector(LeaseApi(), namespace="ns", name="x", identity="a",  # type: ignore[arg-type]
                      duration=10.0, renew_deadline=10.0)


async def test_a_paused_leader_stops_acting_before_a_standby_can_acquire() -> None:
    api, clock = LeaseApi(), Clock()
    a, b = elector(api, clock, "a"), elector(api, clock, "b")
    assert await a.try_acquire() and a.is_leading()
    # `a` is paused (SIGSTOP): it renews nothing. `b` tries every 0.5 s of the shared clock.
    took_over_at = None
    for _ in range(80):
        if await b.try_acquire():
            took_over_at = clock.now
            break
        assert not (a.is_leading() and b.is_leading())
        clock.now += 0.5
    assert took_over_at is not None and api.holder == "b"
    assert took_over_at - 1000.0 > 15.0  # b waited for the whole lease, as it observed it
    assert b.is_leading() and not a.is_leading()  # a's deadline (10 s) had passed long before
    # `a` wakes up (SIGCONT): its first renewal finds another holder, and it never leads again.
    assert await a._renew() is False
    assert not a.is_leading()


async def test_a_standby_waits_a_whole_lease_after_every_renewal() -> None:
    api, clock = LeaseApi(), Clock()
    a, b = elector(api, clock, "a"), elector(api, clock, "b")
    assert await a.try_acquire()
    for _ in range(20):  # a renews every 2 s for 40 s; b never gets it, a always leads
        for _ in range(4):
            assert not await b.try_acquire()
            clock.now += 0.5
        assert await a._renew()
        assert a.is_leading() and not b.is_leading()
    assert api.holder == "a"


async def test_a_renewal_after_the_deadline_does_not_revive_the_leader() -> None:
    api, clock = LeaseApi(), Clock()
    a = elector(api, clock, "a")
    assert await a.try_acquire()
    clock.now += 11.0  # paused past the renew deadline; nobody else took the Lease yet
    assert await a._renew()  # the write still lands...
    assert not a.is_leading()  # ... but a process that lost its deadline does not act again


async def test_hold_gives_up_when_renewals_fail_for_the_renew_deadline() -> None:
    api = LeaseApi()
    a = LeaderElector(api, namespace="ns", name="poolkeeper", identity="a",  # type: ignore[arg-type]
                      duration=1.5, renew_deadline=0.6, retry=0.1)
    assert await a.try_acquire()
    api.down = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(a.hold(), 5)
    assert 0.5 <= loop.time() - started < 1.5  # gave up at the renew deadline, before the lease ends
    assert not a.is_leading()


async def test_hold_returns_when_another_holds_the_lease() -> None:
    api = LeaseApi()
    a = LeaderElector(api, namespace="ns", name="poolkeeper", identity="a",  # type: ignore[arg-type]
                      duration=3.0, renew_deadline=2.0, retry=0.05)
    assert await a.try_acquire()
    assert api.lease is not None
    api.lease["spec"]["holderIdentity"] = "somebody-else"
    await asyncio.wait_for(a.hold(), 2)
    assert not a.is_leading()


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_a_replica_that_no_longer_leads_sends_no_write(method: str) -> None:
    api = KubeApi(kopf.ConnectionInfo(server="https://127.0.0.1:9", insecure=True), may_write=lambda: False)
    try:
        with pytest.raises(NotLeading):  # refused before any connection is made
            await api.request(method, "/api/v1/namespaces/ns/pods/p/status", body={})
    finally:
        await api.close()
