"""EndpointSlices for a selector-less Service, written the way the built-in controller would.

Conditions follow the EndpointSlice conventions: an active member is ready+serving, a
draining one is serving+terminating (not ready), so consumers stop new traffic but let
existing connections finish.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from poolkeeper.backends import ActionResult
from poolkeeper.core.model import Action, ActualMember, AddMember, Admin, InstanceState, RemoveMember, SetAdmin
from poolkeeper.core.naming import member_name
from poolkeeper.core.slices import address_type, layout
from poolkeeper.kube.api import ApiError, KubeApi, resource_path

MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
MANAGER = "poolkeeper.dev"
SERVICE_LABEL = "kubernetes.io/service-name"
POOL_LABEL = "poolkeeper.dev/pool"
API = "discovery.k8s.io/v1"
REFRESH = 30.0  # seconds between re-lists of our own slices (drift repair)
SERVICE_TTL = 5.0  # seconds a Service check stays good


class ServiceProblem(Exception):
    """The Service is missing or has a selector; `reason` is the condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _conditions(admin: Admin) -> dict[str, bool]:
    if admin is Admin.READY:
        return {"ready": True, "serving": True, "terminating": False}
    if admin is Admin.DRAIN:
        return {"ready": False, "serving": True, "terminating": True}
    return {"ready": False, "serving": False, "terminating": False}


def _admin(conditions: Mapping[str, Any]) -> Admin:
    if conditions.get("ready"):
        return Admin.READY
    if conditions.get("serving"):
        return Admin.DRAIN
    return Admin.MAINT


class EndpointSliceBackend:
    """One pool's slices for one Service in the pool's own namespace."""

    def __init__(self, api: KubeApi, *, namespace: str, service: str, pool: str, pool_uid: str, port: int,
                 cluster_id: str = "") -> None:
        self.api, self.namespace, self.service, self.pool = api, namespace, service, pool
        self.pool_uid, self.port, self.cluster_id = pool_uid, port, cluster_id
        self._slices: dict[str, dict[str, Any]] = {}
        self._port_name = ""
        self._listed_at = -1e9  # the slices we wrote are our cache; re-listed every REFRESH seconds
        self._service_checked_at = -1e9

    def _key(self, ep: Mapping[str, Any]) -> str:
        return member_name(self.namespace, self.pool, (ep.get("targetRef") or {}).get("uid", ""),
                           cluster_id=self.cluster_id)

    async def check_service(self) -> None:
        if time.monotonic() - self._service_checked_at < SERVICE_TTL:
            return
        svc = await self.api.get_or_none(resource_path("v1", "services", self.namespace, self.service))
        if svc is None:
            raise ServiceProblem("ServiceNotFound", f"Service {self.namespace}/{self.service} does not exist")
        spec = svc.get("spec") or {}
        if spec.get("selector"):
            raise ServiceProblem("ServiceHasSelector", f"Service {self.namespace}/{self.service} has a selector; "
                                 "its endpoints belong to the built-in controller. Remove spec.selector.")
        ports = spec.get("ports") or []
        match = next((p for p in ports if p.get("targetPort") in (self.port, str(self.port))), None)
        self._port_name = (match or (ports[0] if ports else {})).get("name") or ""
        self._service_checked_at = time.monotonic()

    async def _list(self) -> None:
        listing = await self.api.get(resource_path(API, "endpointslices", self.namespace), params={
            "labelSelector": f"{SERVICE_LABEL}={self.service},{MANAGED_BY}={MANAGER},{POOL_LABEL}={self.pool}"})
        self._slices = {s["metadata"]["name"]: s for s in listing.get("items") or []}
        self._listed_at = time.monotonic()

    def invalidate(self) -> None:
        """Forget the cache: the next read lists the slices and checks the Service again."""
        self._listed_at = self._service_checked_at = -1e9

    async def read_members(self) -> dict[str, ActualMember]:
        """The members in our slices: from what we last wrote, re-listed every REFRESH seconds.

        A list right after a write waits for the API server's watch cache to catch up (~100 ms
        here), and this backend is the only writer of its slices, so its own writes are the truth.
        """
        await self.check_service()
        if time.monotonic() - self._listed_at >= REFRESH:
            await self._list()
        members: dict[str, ActualMember] = {}
        for slc in self._slices.values():
            port = next((p.get("port") for p in slc.get("ports") or []), self.port)
            for ep in slc.get("endpoints") or []:
                name = self._key(ep)
                members[name] = ActualMember(name, (ep.get("addresses") or [""])[0], int(port or 0),
                                             _admin(ep.get("conditions") or {}), "", None)
        return members

    @staticmethod
    def _endpoint(address: str, admin: Admin, inst: InstanceState | None) -> dict[str, Any]:
        """An endpoint; the instance (from the AddMember) gives its targetRef and nodeName."""
        ep: dict[str, Any] = {"addresses": [address], "conditions": _conditions(admin)}
        if inst is not None and inst.kind != "EC2":  # an EC2 instance is no Kubernetes object to refer to
            ref: dict[str, Any] = {"kind": inst.kind, "name": inst.name, "uid": inst.uid}
            if inst.namespace:
                ref["namespace"] = inst.namespace
            if inst.kind == "Instance":
                ref["apiVersion"] = "poolkeeper.dev/v1alpha1"
            ep["targetRef"] = ref
            if inst.kind == "Node":
                ep["nodeName"] = inst.name
        return ep

    async def apply(self, actions: Sequence[Action]) -> list[ActionResult]:
        """Fold the actions into the wanted endpoint set, then write only the slices that change."""
        wanted: dict[str, dict[str, Any]] = {}
        for slc in self._slices.values():
            for ep in slc.get("endpoints") or []:
                wanted[self._key(ep)] = dict(ep)
        for action in actions:
            if isinstance(action, AddMember):
                wanted[action.name] = self._endpoint(action.address, Admin.MAINT, action.instance)
            elif isinstance(action, SetAdmin) and action.name in wanted:
                wanted[action.name] = dict(wanted[action.name], conditions=_conditions(action.admin))
            elif isinstance(action, RemoveMember):
                wanted.pop(action.name, None)
        try:
            await self._write(wanted)
        except ApiError as exc:
            self.invalidate()
            return [ActionResult(a, False, str(exc)) for a in actions]
        return [ActionResult(a, True, "") for a in actions]

    async def _write(self, wanted: Mapping[str, dict[str, Any]]) -> None:
        for family in ("IPv4", "IPv6"):
            current = {n: s.get("endpoints") or [] for n, s in self._slices.items() if s.get("addressType") == family}
            subset = {k: ep for k, ep in wanted.items() if address_type(ep["addresses"][0]) == family}
            plan = layout(current, subset, self._key)
            for name in plan.delete:
                await self.api.delete(resource_path(API, "endpointslices", self.namespace, name))
                self._slices.pop(name, None)
            for name in sorted(plan.changed):
                body = dict(self._slices[name], endpoints=plan.existing[name], ports=self._ports())
                written = await self.api.replace(resource_path(API, "endpointslices", self.namespace, name), body)
                self._slices[name] = written
            for endpoints in plan.new:
                written = await self.api.create(resource_path(API, "endpointslices", self.namespace),
                                                self._new_slice(family, endpoints))
                self._slices[written["metadata"]["name"]] = written

    def _ports(self) -> list[dict[str, Any]]:
        return [{"name": self._port_name, "port": self.port, "protocol": "TCP"}]

    def _new_slice(self, family: str, endpoints: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": API, "kind": "EndpointSlice", "addressType": family,
            "metadata": {
                "generateName": f"{self.service}-pk-", "namespace": self.namespace,
                "labels": {SERVICE_LABEL: self.service, MANAGED_BY: MANAGER, POOL_LABEL: self.pool},
                "ownerReferences": [{"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "TargetPool",
                                     "name": self.pool, "uid": self.pool_uid}],
            },
            "endpoints": endpoints, "ports": self._ports(),
        }

    async def delete_all(self) -> None:
        """Remove every slice of this pool (the pool is being deleted)."""
        await self._list()
        for name in list(self._slices):
            await self.api.delete(resource_path(API, "endpointslices", self.namespace, name))
