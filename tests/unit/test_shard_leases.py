"""controller/shards.py: replicas share the shard Leases, take a dead one's, and every write is
fenced by the Lease of its own shard (kube/fence.py), in the task that started the work and in
every task it started."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from poolkeeper.controller.shards import MEMBER_GC, ShardManager
from poolkeeper.kube import fence
from poolkeeper.kube.api import ApiError

PREFIX = "/apis/coordination.k8s.io/v1/namespaces/ns/leases"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Leases:
    """Leases in one namespace, with optimistic concurrency and label-selected lists."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.version = 0

    def _name(self, path: str) -> str:
        assert path.startswith(PREFIX + "/"), path
        return path[len(PREFIX) + 1:]

    def _store(self, body: dict[str, Any]) -> Any:
        self.version += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.items[stored["metadata"]["name"]] = stored
        return copy.deepcopy(stored)

    async def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        if path == PREFIX:
            key, _, value = (params or {}).get("labelSelector", "").partition("=")
            return {"items": [copy.deepcopy(i) for i in self.items.values()
                              if (i["metadata"].get("labels") or {}).get(key) == value]}
        found = self.items.get(self._name(path))
        if found is None:
            raise ApiError(404, "NotFound", path)
        return copy.deepcopy(found)

    async def get_or_none(self, path: str) -> Any:
        return copy.deepcopy(self.items.get(self._name(path)))

    async def create(self, path: str, body: Any) -> Any:
        if body["metadata"]["name"] in self.items:
            raise ApiError(409, "AlreadyExists", "exists")
        return self._store(body)

    async def replace(self, path: str, body: Any) -> Any:
        current = self.items.get(self._name(path))
        if current is None or body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        return self._store(body)

    async def delete(self, path: str) -> Any:
        return self.items.pop(self._name(path), None)

    def holders(self) -> dict[str, str]:
        return {n: i["spec"]["holderIdentity"] for n, i in self.items.items() if "-shard-" in n}


def manager(api: Leases, clock: Clock, identity: str, shards: int = 4) -> ShardManager:
    return ShardManager(api, namespace="ns", base="pk", shards=shards, identity=identity,  # type: ignore[arg-type]
                        clock=clock)


async def rounds(clock: Clock, managers: list[ShardManager], seconds: float) -> None:
    """Every manager runs a round every 2 s of the shared clock, for `seconds`."""
    end = clock.now + seconds
    while clock.now < end:
        for m in managers:
            await m.round()
            m._notice_lost()
        clock.now += 2.0


async def test_two_replicas_split_the_shards_and_a_survivor_takes_all_within_a_lease() -> None:
    api, clock = Leases(), Clock()
    a, b = manager(api, clock, "a"), manager(api, clock, "b")
    acquired: list[int] = []
    a.on_acquired = acquired.append
    await rounds(clock, [a], 4)
    assert a.held() == [0, 1, 2, 3] and sorted(acquired) == [0, 1, 2, 3]
    await rounds(clock, [a, b], 40)  # a keeps what it took for a lease, then hands over the surplus
    assert len(a.held()) == 2 and len(b.held()) == 2 and set(a.held()) | set(b.held()) == {0, 1, 2, 3}
    assert sorted(api.holders().values()) == ["a", "a", "b", "b"]
    assert not set(a.held()) & set(b.held())
    started = clock.now
    while len(b.held()) < 4:  # a dies: no more rounds
        await rounds(clock, [b], 2)
        assert not set(a.held()) & set(b.held()) or not any(a.is_held(s) for s in b.held())
    assert clock.now - started <= 15.0 + 2 * 2.0  # the lease duration, plus the rounds that see it
    clock.now += (MEMBER_GC + 1) * 15.0
    await rounds(clock, [b], 4)
    assert "pk-member-a" not in api.items  # a dead member's Lease is collected


async def test_a_paused_replica_stops_acting_before_its_shards_are_taken() -> None:
    api, clock = Leases(), Clock()
    a, b = manager(api, clock, "a"), manager(api, clock, "b")
    await rounds(clock, [a, b], 40)
    mine = a.held()
    assert mine
    for _ in range(30):  # a is paused; b keeps going; at no moment may both act for one shard
        await rounds(clock, [b], 1)
        assert not any(a.is_held(s) and b.is_held(s) for s in range(4))
    assert b.held() == [0, 1, 2, 3] and a.held() == []
    lost: list[int] = []
    a.on_lost = lost.append
    await rounds(clock, [a, b], 2)  # a wakes: it learns it lost them, and takes nothing back at once
    assert sorted(lost) == sorted(mine) and a.held() == []


async def test_a_clean_stop_releases_every_shard_for_a_peer_at_once() -> None:
    api, clock = Leases(), Clock()
    a, b = manager(api, clock, "a"), manager(api, clock, "b")
    await rounds(clock, [a, b], 40)
    await a.release_all()
    assert a.held() == [] and "pk-member-a" not in api.items
    await rounds(clock, [b], 2)  # the next round, not a lease duration later
    assert b.held() == [0, 1, 2, 3]


async def test_every_write_is_fenced_by_its_own_shard_and_tasks_inherit_the_fence() -> None:
    api, clock = Leases(), Clock()
    a, b = manager(api, clock, "a"), manager(api, clock, "b")
    await rounds(clock, [a, b], 40)
    mine, theirs = a.held()[0], b.held()[0]
    assert not a.may_write()  # work of no shard writes nothing
    with fence.fenced(lambda: a.is_held(theirs)):
        assert not a.may_write()
    seen: list[bool] = []

    async def later() -> None:  # e.g. a status flush started by a reconcile
        await asyncio.sleep(0)
        seen.append(a.may_write())

    with fence.fenced(lambda: a.is_held(mine)):
        assert a.may_write()
        task = asyncio.create_task(later())
    assert not a.may_write()  # the block ended; its task keeps the fence
    await task
    assert seen == [True]
    with fence.fenced(lambda: a.is_held(mine)):
        clock.now += 10.0  # a renewed nothing for its renew deadline (paused, or the API away)
        assert not a.may_write()
        task = asyncio.create_task(later())
    await task
    assert seen == [True, False]
    with fence.fenced(fence.always):
        assert a.may_write()
