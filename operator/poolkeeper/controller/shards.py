"""Shards across replicas (--shards S > 1): one Lease per shard, a member Lease per replica.

Every replica watches everything and queues every pool, but reconciles, writes and delivers
only for the shards whose Lease it holds; which shard a pool is in is core/shards.py. Each
shard Lease has the client-go timing and monotonic fence of kube/lease.py (`is_held(shard)`
is `LeaderElector.is_leading`), so a replica that was paused or cut off stops acting for a
shard before anyone else can take it.

How many replicas are live: each replica renews a member Lease of its own
(`<base>-member-<identity>`, labelled) every `retry` seconds, and counts the member Leases it
saw change within the last lease duration (its own monotonic clock, as for shard Leases); one
list call per round reads them all, and one more every shard Lease. A member Lease unchanged
for MEMBER_GC lease durations (a replica that died without stopping) is deleted.

One round every `retry` seconds (core.shards.plan_round): renew held shards, release the
surplus above ceil(S / live) (held at least a lease duration), take free shards up to the
share, take expired ones always. A new replica therefore gets shards within about one round
after its peers see its member Lease; a dead replica's shards are taken once their Leases went
unrenewed for the lease duration.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from poolkeeper.core.shards import LeaseView, lease_name, plan_round, preference, share
from poolkeeper.kube import fence
from poolkeeper.kube.api import ApiError, KubeApi, resource_path
from poolkeeper.kube.lease import API, LeaderElector

log = logging.getLogger(__name__)
SHARD_LABEL = "poolkeeper.dev/shard-of"  # on shard Leases: the base name
MEMBER_LABEL = "poolkeeper.dev/member-of"  # on member Leases: the base name
MEMBER_GC = 4  # lease durations a member Lease may go unrenewed before a peer deletes it
Listener = Callable[[int], None]


def member_name(base: str, identity: str) -> str:
    """A DNS-subdomain-safe Lease name for one replica."""
    return f"{base}-member-" + re.sub(r"[^a-z0-9.-]+", "-", identity.lower()).strip("-.")[:200]


class ShardManager:
    def __init__(self, api: KubeApi, *, namespace: str, base: str, shards: int, identity: str,
                 duration: float = 15.0, renew_deadline: float = 10.0, retry: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if shards < 2:
            raise ValueError("sharding needs at least 2 shards (1 is the single Lease of --leader-elect)")
        self.api, self.namespace, self.base, self.shards, self.identity = api, namespace, base, shards, identity
        self.duration, self.retry, self.clock = duration, retry, clock
        def elector(name: str, label: str) -> LeaderElector:
            return LeaderElector(api, namespace=namespace, name=name, identity=identity, duration=duration,
                                 renew_deadline=renew_deadline, retry=retry, clock=clock, labels={label: base})
        self.electors = [elector(lease_name(base, i, shards), SHARD_LABEL) for i in range(shards)]
        self.member = elector(member_name(base, identity), MEMBER_LABEL)
        self.order = preference(identity, shards)
        self.acquired_at: dict[int, float] = {}
        self.peers: dict[str, tuple[str, float]] = {}  # member Lease name -> (record, monotonic moment it changed)
        self.live = 1
        self.on_acquired: Listener = lambda shard: None
        self.on_lost: Listener = lambda shard: None
        self.on_change: Callable[[], None] = lambda: None

    # ----- what the fence asks
    def is_held(self, shard: int) -> bool:
        return self.electors[shard].is_leading()

    def held(self) -> list[int]:
        return [i for i, e in enumerate(self.electors) if e.is_leading()]

    def may_write(self) -> bool:
        """KubeApi.may_write and the HAProxy/AWS clients' may_act: the fence in the context, and
        outside any (work of no shard, which should not exist) nothing."""
        check = fence.current()
        return check is not None and check()

    # ----- the loop
    async def run(self) -> None:
        """A round every `retry` seconds until cancelled; then every held shard is released."""
        try:
            while True:
                started = self.clock()
                try:
                    await self.round()
                except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("shard leases: %s", exc)
                self._notice_lost()
                await asyncio.sleep(max(0.0, self.retry - (self.clock() - started)))
        finally:
            await self.release_all()

    def _notice_lost(self) -> None:
        """Shards whose renew deadline passed (renewals failed, or this process was paused)."""
        for shard in list(self.acquired_at):
            if not self.is_held(shard):
                self._lost(shard, "its renew deadline passed")

    def _lost(self, shard: int, why: str) -> None:
        self.electors[shard].resign()
        if self.acquired_at.pop(shard, None) is not None:
            log.warning("lost shard %d (Lease %s): %s", shard, self.electors[shard].name, why)
            self.on_lost(shard)
            self.on_change()

    async def _list(self, label: str) -> dict[str, dict[str, Any]]:
        listing = await self.api.get(resource_path(API, "leases", self.namespace),
                                     params={"labelSelector": f"{label}={self.base}"})
        return {item["metadata"]["name"]: item for item in listing.get("items") or []}

    async def count_live(self) -> int:
        """This replica plus every member Lease seen changing within the last lease duration."""
        await self.member.try_acquire()
        now, live = self.clock(), 1
        members = await self._list(MEMBER_LABEL)
        for name, lease in members.items():
            if name == self.member.name:
                continue
            record = f"{(lease.get('spec') or {}).get('renewTime')}|{lease['metadata'].get('resourceVersion')}"
            seen = self.peers.get(name)
            if seen is None or seen[0] != record:
                self.peers[name] = seen = (record, now)
            if now - seen[1] <= self.duration:
                live += 1
            elif now - seen[1] > MEMBER_GC * self.duration:
                log.info("deleting member Lease %s: unrenewed for %.0fs", name, now - seen[1])
                await self.api.delete(resource_path(API, "leases", self.namespace, name))
        self.peers = {name: seen for name, seen in self.peers.items() if name in members}
        return live

    async def round(self) -> None:
        self.live = await self.count_live()
        target = share(self.shards, self.live)
        leases = await self._list(SHARD_LABEL)
        now = self.clock()
        views, current = [], {}
        for shard, elector in enumerate(self.electors):
            lease = current[shard] = leases.get(elector.name)
            holder = ((lease or {}).get("spec") or {}).get("holderIdentity") or ""
            if shard in self.acquired_at and holder != self.identity:
                self._lost(shard, f"the Lease is held by {holder or 'nobody'} now")
            views.append(LeaseView(shard, mine=holder == self.identity, free=not holder,
                                   expired=elector.expired(lease), held_for=now - self.acquired_at.get(shard, now)))
        plan = plan_round(views, target=target, grace=self.duration, order=self.order)
        for shard in plan.release:
            log.info("releasing shard %d: %d live replica(s), a share of %d", shard, self.live, target)
            self._lost(shard, "released to a peer")
            await self.electors[shard].release()
        for shard in (*plan.renew, *plan.acquire):
            if await self.electors[shard].try_acquire(current[shard]) and shard not in self.acquired_at:
                self.acquired_at[shard] = self.clock()
                log.info("holding shard %d (Lease %s/%s)", shard, self.namespace, self.electors[shard].name)
                self.on_acquired(shard)
                self.on_change()

    async def release_all(self) -> None:
        """A clean stop: stop acting, then hand every shard over at once and leave the members."""
        for shard in list(self.acquired_at):
            self._lost(shard, "stopping")
        await asyncio.gather(*(e.release() for e in self.electors))
        try:
            await self.api.delete(self.member.path)
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("member Lease %s not deleted: %s", self.member.name, exc)
