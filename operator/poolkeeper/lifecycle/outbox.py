"""The outbox: what each LifecycleHandler was told, and what it still has to be told.

Kept in one ConfigMap per handler (`poolkeeper-outbox-<handler>`), written before the
load-balancer action it describes. Writes are coalesced: callers that arrive while a write
is in flight share the next one, so the outbox never caps throughput.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from poolkeeper.core.model import InstanceState, Phase
from poolkeeper.core.transitions import Announced
from poolkeeper.kube.api import ApiError, KubeApi, resource_path

log = logging.getLogger(__name__)
DATA_KEY = "outbox.json"
FLUSH_DELAY = 0.1


def outbox_name(handler: str) -> str:
    return f"poolkeeper-outbox-{handler}"[:253]


def instance_record(inst: InstanceState) -> dict[str, Any]:
    return {"kind": inst.kind, "namespace": inst.namespace, "name": inst.name, "uid": inst.uid,
            "address": inst.address, "labels": dict(inst.labels)}


def instance_from_record(record: dict[str, Any], reason: str) -> InstanceState:
    return InstanceState(record["kind"], record.get("namespace") or "", record["name"], record["uid"],
                         record.get("address"), record.get("labels") or {}, Phase.DOWN, reason)


class Outbox:
    def __init__(self, api: KubeApi, namespace: str, handler: str, handler_uid: str) -> None:
        self.api, self.namespace, self.handler, self.handler_uid = api, namespace, handler, handler_uid
        # pool uid -> instance uid -> {"state", "seq", "instance": record, "member": name}
        self.announced: dict[str, dict[str, dict[str, Any]]] = {}
        self.pending: dict[str, dict[str, Any]] = {}  # event id -> delivery record
        self._version = 0
        self._saved = 0
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self.writes = 0

    @property
    def path(self) -> str:
        return resource_path("v1", "configmaps", self.namespace, outbox_name(self.handler))

    async def load(self) -> None:
        body = await self.api.get_or_none(self.path)
        if body is None:
            return
        try:
            data = json.loads((body.get("data") or {}).get(DATA_KEY) or "{}")
        except ValueError:
            log.warning("outbox %s is not valid JSON; starting empty", self.path)
            return
        self.announced = data.get("announced") or {}
        self.pending = {p["event"]["id"]: p for p in data.get("pending") or []}

    def announced_for(self, pool_uid: str) -> dict[str, Announced]:
        return {uid: Announced(e["state"], int(e["seq"])) for uid, e in self.announced.get(pool_uid, {}).items()}

    def touch(self) -> None:
        self._version += 1

    @property
    def dirty(self) -> bool:
        return self._saved < self._version

    def flush_soon(self, delay: float = FLUSH_DELAY) -> None:
        """Write within `delay` seconds, batching every change made meanwhile.

        For changes nothing waits on (a delivery settled, a registered event recorded): losing
        them in a crash only means a re-delivery with the same id, which at-least-once allows.
        """
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_after(delay))

    async def _flush_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.persist()
        except (TimeoutError, ApiError, OSError) as exc:
            log.warning("outbox %s not written, retrying: %s", self.path, exc)
            self._flusher = None
            self.flush_soon(1.0)

    async def persist(self) -> None:
        """Make every change made before this call durable (one write may cover many callers)."""
        target = self._version
        async with self._lock:
            if self._saved >= target:
                return
            version = self._version
            body = {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": outbox_name(self.handler), "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/managed-by": "poolkeeper"},
                             "ownerReferences": [{"apiVersion": "poolkeeper.dev/v1alpha1",
                                                  "kind": "LifecycleHandler", "name": self.handler,
                                                  "uid": self.handler_uid}]},
                "data": {DATA_KEY: json.dumps({"announced": self.announced,
                                               "pending": list(self.pending.values())}, separators=(",", ":"))},
            }
            try:
                await self.api.replace(self.path, body)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                await self.api.create(resource_path("v1", "configmaps", self.namespace), body)
            self._saved = version
            self.writes += 1
