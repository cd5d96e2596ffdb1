"""Leader election with a coordination.k8s.io Lease, so replicas can stand by safely.

The timing is client-go's, and so is the safety argument. The leader renews every `retry`
seconds and acts only until `renew_deadline` after the start of its last successful renewal,
measured on its own monotonic clock (`is_leading`): a process that was paused (SIGSTOP, a
stalled VM, a long GC) sees on waking that its deadline passed and writes nothing more. A
standby takes over only once it has seen the Lease record unchanged for `duration` seconds,
also on its own monotonic clock, so no wall-clock skew between replicas matters. Because
`renew_deadline < duration`, the old leader has stopped acting before the new one can acquire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp

from poolkeeper.kube.api import ApiError, KubeApi, resource_path

log = logging.getLogger(__name__)
API = "coordination.k8s.io/v1"
Clock = Callable[[], float]
UNREAD: Any = object()  # try_acquire(lease=UNREAD): read the Lease first


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api: KubeApi, *, namespace: str, name: str, identity: str,
                 duration: float = 15.0, renew_deadline: float = 10.0, retry: float = 2.0,
                 clock: Clock = time.monotonic, labels: Mapping[str, str] | None = None) -> None:
        if not retry < renew_deadline < duration:
            raise ValueError("leader election needs retry < renew deadline < lease duration")
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.duration, self.renew_deadline, self.retry = duration, renew_deadline, retry
        self.clock, self.labels = clock, dict(labels or {})
        self._deadline: float | None = None  # monotonic moment our right to act ends
        self._observed: tuple[str, float] | None = None  # (record we saw, monotonic moment it changed)

    @property
    def path(self) -> str:
        return resource_path(API, "leases", self.namespace, self.name)

    def is_leading(self) -> bool:
        """True while this process may act: it renewed less than `renew_deadline` ago (monotonic)."""
        return self._deadline is not None and self.clock() < self._deadline

    def _body(self, current: dict[str, Any] | None) -> dict[str, Any]:
        now = _stamp(datetime.now(UTC))
        spec = dict((current or {}).get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            transitions = int(spec.get("leaseTransitions") or 0)
            spec.update(acquireTime=now, leaseTransitions=transitions + (1 if current else 0))
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=int(self.duration), renewTime=now)
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if self.labels:
            meta["labels"] = {**(((current or {}).get("metadata") or {}).get("labels") or {}), **self.labels}
        if current:
            meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        return {"apiVersion": API, "kind": "Lease", "metadata": meta, "spec": spec}

    def _expired(self, lease: dict[str, Any] | None) -> bool:
        """Whether a Lease (None: none yet) has gone unchanged for its duration, as *we* observed it:
        the clock starts when we first see a record, never from the timestamps written in it."""
        spec = (lease or {}).get("spec") or {}
        version = ((lease or {}).get("metadata") or {}).get("resourceVersion")
        record = f"{spec.get('holderIdentity')}|{spec.get('renewTime')}|{version}"
        now = self.clock()
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, now)
            return False
        seconds = float(spec.get("leaseDurationSeconds") or self.duration)
        return now - self._observed[1] > seconds

    def expired(self, lease: dict[str, Any] | None) -> bool:
        """Observe the Lease as read elsewhere (a list of every shard's Lease): True once it went
        unchanged for a lease duration on our clock, whoever holds it (or nobody)."""
        return self._expired(lease)

    def resign(self) -> None:
        """Stop acting at once (the Lease is somebody else's now, or about to be released)."""
        self._deadline = None

    async def try_acquire(self, lease: Any = UNREAD) -> bool:
        """One attempt: take the Lease if it is free, expired, or already ours; renew it if ours.

        `lease` is the Lease as just read (None: it does not exist), to save a GET."""
        started = self.clock()
        try:
            if lease is UNREAD:
                lease = await self.api.get_or_none(self.path)
            if lease is None:
                await self.api.create(resource_path(API, "leases", self.namespace), self._body(None))
            else:
                holder = (lease.get("spec") or {}).get("holderIdentity")
                if holder and holder != self.identity and not self._expired(lease):
                    return False
                await self.api.replace(self.path, self._body(lease))
        except ApiError as exc:
            if exc.status not in (409, 422):  # somebody else won the race: try again later
                log.warning("leader election on %s/%s: %s", self.namespace, self.name, exc)
            return False
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("leader election on %s/%s: %s", self.namespace, self.name, exc)
            return False
        # The deadline counts from before the request: the write may have landed any time after.
        self._deadline = max(self._deadline or 0.0, started + self.renew_deadline)
        return True

    async def acquire(self) -> None:
        """Wait until this process leads."""
        announced = False
        while not await self.try_acquire():
            if not announced:
                log.info("standing by: Lease %s/%s is held by another operator", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.retry)
        log.info("leading: holding Lease %s/%s as %s", self.namespace, self.name, self.identity)

    async def hold(self) -> None:
        """Renew every `retry` seconds while leading; return once the renew deadline has passed
        (renewals failed for too long, another holder, or this process was paused)."""
        while self.is_leading():
            await asyncio.sleep(self.retry)
            if not self.is_leading():
                break
            try:
                renewed = await asyncio.wait_for(self._renew(), timeout=max(0.1, self._remaining()))
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("could not renew Lease %s/%s: %s", self.namespace, self.name, exc)
                continue
            if not renewed:
                break
        self._deadline = None
        log.error("lost the Lease %s/%s: stopping so only one operator acts", self.namespace, self.name)

    async def release(self) -> None:
        """Give the Lease up (client-go's ReleaseOnCancel): stop acting first, then write it with
        no holder, so another replica may take it at once instead of after a lease duration."""
        self.resign()
        try:
            lease = await self.api.get_or_none(self.path)
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            body = self._body(lease)
            body["spec"].update(holderIdentity="", leaseDurationSeconds=1)
            await self.api.replace(self.path, body)
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("releasing Lease %s/%s: %s (it expires by itself)", self.namespace, self.name, exc)

    def _remaining(self) -> float:
        return (self._deadline or 0.0) - self.clock()

    async def _renew(self) -> bool:
        """One renewal; False when somebody else holds the Lease now."""
        started = self.clock()
        lease = await self.api.get(self.path)
        if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return False
        await self.api.replace(self.path, self._body(lease))
        if self.is_leading():  # never extend a deadline that already passed while we waited
            self._deadline = started + self.renew_deadline
        return True
