"""Leader election with a coordination.k8s.io Lease, so replicas can stand by safely.

Only the holder runs informers and reconciles. It renews every `renew` seconds; a standby
takes over once the Lease has not been renewed for `duration` seconds. A leader that cannot
renew in time stops itself rather than risk two operators driving one load balancer.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from poolkeeper.kube.api import ApiError, KubeApi, resource_path

log = logging.getLogger(__name__)
API = "coordination.k8s.io/v1"


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class LeaderElector:
    def __init__(self, api: KubeApi, *, namespace: str, name: str, identity: str,
                 duration: float = 15.0, renew: float = 5.0) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.duration, self.renew = duration, renew
        self.leading = False

    @property
    def path(self) -> str:
        return resource_path(API, "leases", self.namespace, self.name)

    def _body(self, current: dict[str, Any] | None, acquiring: bool) -> dict[str, Any]:
        now = _stamp(_now())
        spec = dict((current or {}).get("spec") or {})
        transitions = int(spec.get("leaseTransitions") or 0)
        if acquiring and spec.get("holderIdentity") != self.identity:
            spec.update(acquireTime=now, leaseTransitions=transitions + (1 if current else 0))
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=int(self.duration), renewTime=now)
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if current:
            meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        return {"apiVersion": API, "kind": "Lease", "metadata": meta, "spec": spec}

    def _expired(self, lease: dict[str, Any]) -> bool:
        spec = lease.get("spec") or {}
        renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
        seconds = float(spec.get("leaseDurationSeconds") or self.duration)
        return renewed is None or renewed + timedelta(seconds=seconds) < _now()

    async def try_acquire(self) -> bool:
        """One attempt: take the Lease if it is free, expired, or already ours."""
        try:
            lease = await self.api.get_or_none(self.path)
            if lease is None:
                await self.api.create(resource_path(API, "leases", self.namespace), self._body(None, True))
                return True
            holder = (lease.get("spec") or {}).get("holderIdentity")
            if holder == self.identity or not holder or self._expired(lease):
                await self.api.replace(self.path, self._body(lease, True))
                return True
        except ApiError as exc:
            if exc.status not in (409, 422):  # somebody else won the race: try again later
                log.warning("leader election on %s/%s: %s", self.namespace, self.name, exc)
        return False

    async def acquire(self) -> None:
        """Wait until this process leads."""
        announced = False
        while not await self.try_acquire():
            if not announced:
                log.info("standing by: Lease %s/%s is held by another operator", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.renew / 2)
        self.leading = True
        log.info("leading: holding Lease %s/%s as %s", self.namespace, self.name, self.identity)

    async def hold(self) -> None:
        """Renew until renewing fails for longer than the lease lasts; then return (leadership lost)."""
        last_renewed = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(self.renew)
            try:
                lease = await self.api.get(self.path)
                if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                    break
                await self.api.replace(self.path, self._body(lease, False))
                last_renewed = asyncio.get_running_loop().time()
            except (ApiError, OSError, TimeoutError) as exc:
                log.warning("could not renew Lease %s/%s: %s", self.namespace, self.name, exc)
                if asyncio.get_running_loop().time() - last_renewed > self.duration - self.renew:
                    break
        self.leading = False
        log.error("lost the Lease %s/%s: stopping so only one operator acts", self.namespace, self.name)
