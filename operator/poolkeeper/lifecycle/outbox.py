"""The outbox: what each LifecycleHandler was told, and what it still has to be told.

Kept in one ConfigMap per handler, `poolkeeper-outbox-<handler uid>`, in the operator's own
namespace (`--outbox-namespace`): tenants can write ConfigMaps in their namespaces, and an
outbox steers deliveries and holds members out of rotation, so it must not live there. It is
written before the load-balancer action it describes, checked record by record when loaded
(outbox_records.py), and deleted with its handler (ownerReferences cannot cross namespaces).
Writes are coalesced: callers that arrive while a write is in flight share the next one, so
the outbox never caps throughput; and each record's JSON is kept from one write to the next
(outbox_records.OutboxEncoder), so a write on the event loop costs what changed, not the
backlog. It also never outgrows a ConfigMap: before a write whose JSON would pass BYTE_BUDGET,
`shed` (the handler runtime) dead-letters the oldest non-blocking records, so a slow receiver
costs its own events, never the pool's ability to write.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from poolkeeper.core.model import InstanceState, Phase
from poolkeeper.core.transitions import Announced
from poolkeeper.kube.api import ApiError, KubeApi, resource_path
from poolkeeper.lifecycle.outbox_records import AnnouncedEntry, OutboxEncoder, PendingRecord, Scope, parse_outbox

log = logging.getLogger(__name__)
DATA_KEY = "outbox.json"
FLUSH_DELAY = 0.1
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT = "lifecycle-outbox"
HANDLER_UID_LABEL = "poolkeeper.dev/handler-uid"
HANDLER_NAMESPACE_LABEL = "poolkeeper.dev/handler-namespace"
HANDLER_NAME_LABEL = "poolkeeper.dev/handler-name"
HANDLER_ANNOTATION = "poolkeeper.dev/handler"
# What the JSON may take of a ConfigMap's 1 MiB (the rest: metadata, and room for one more record).
BYTE_BUDGET = 900 * 1024
# Called with how many bytes must go; returns True when it freed something (False: nothing can go).
Shed = Callable[[int], bool]


def outbox_name(handler_uid: str) -> str:
    return f"poolkeeper-outbox-{handler_uid}"


def _label_value(value: str) -> str:
    """Label values are at most 63 characters and end alphanumeric; the annotation has the full name."""
    return re.sub(r"[^A-Za-z0-9]+$", "", value[:63])


def instance_from_record(record: Mapping[str, Any], reason: str) -> InstanceState:
    return InstanceState(record["kind"], record.get("namespace") or "", record["name"], record["uid"],
                         record.get("address"), record.get("labels") or {}, Phase.DOWN, reason)


class Outbox:
    def __init__(self, api: KubeApi, namespace: str, handler_namespace: str, handler: str,
                 handler_uid: str) -> None:
        self.api, self.namespace, self.handler, self.handler_uid = api, namespace, handler, handler_uid
        self.handler_namespace = handler_namespace
        self.deleted = False
        self.announced: dict[str, dict[str, AnnouncedEntry]] = {}  # pool uid -> instance uid -> entry
        self.pending: dict[str, PendingRecord] = {}  # event id -> delivery still owed
        self.shed: Shed | None = None
        self.encoder = OutboxEncoder()
        self._version = 0
        self._saved = 0
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self.writes = 0

    @property
    def path(self) -> str:
        return resource_path("v1", "configmaps", self.namespace, outbox_name(self.handler_uid))

    async def load(self, scope: Scope) -> list[str]:
        """Read the outbox, keeping only records valid for `scope`; returns why the others were dropped.

        API errors propagate (the caller retries later); bad content never does.
        """
        body = await self.api.get_or_none(self.path)
        if not isinstance(body, dict):
            return []
        data = body.get("data")
        text = data.get(DATA_KEY) if isinstance(data, dict) else None
        parsed = parse_outbox(text if isinstance(text, str) else None, scope)
        self.announced, self.pending = parsed.announced, parsed.pending
        if parsed.dropped:
            self.touch()  # write back without what was dropped
        return parsed.dropped

    async def delete(self) -> None:
        """Forget the outbox for good: its handler is gone. No later flush recreates it."""
        self.deleted = True
        if self._flusher is not None:
            self._flusher.cancel()
        async with self._lock:
            await self.api.delete(self.path)

    def announced_for(self, pool_uid: str) -> dict[str, Announced]:
        return {uid: e.announced for uid, e in self.announced.get(pool_uid, {}).items()}

    def render(self) -> str:
        """The JSON kept in the ConfigMap, shed (see BYTE_BUDGET) until it fits."""
        while True:
            text = self.encoder.render(self.announced, self.pending)
            if len(text) <= BYTE_BUDGET or self.shed is None or not self.shed(len(text) - BYTE_BUDGET):
                return text

    def record_bytes(self, record: PendingRecord) -> int:
        """What one pending record takes of the outbox's JSON (with its comma)."""
        return len(self.encoder.pending_text(record)) + 1

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
        retry = FLUSH_DELAY
        try:
            await self.persist()
        except (TimeoutError, ApiError, OSError) as exc:
            log.warning("outbox %s not written, retrying: %s", self.path, exc)
            retry = 1.0
        self._flusher = None
        if self.dirty and not self.deleted:  # changed while this write was in flight (or it failed)
            self.flush_soon(retry)

    async def persist(self) -> None:
        """Make every change made before this call durable (one write may cover many callers)."""
        target = self._version
        async with self._lock:
            if self._saved >= target or self.deleted:
                return
            text = self.render()
            version = self._version  # after render: what it shed is in this write
            body = {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": outbox_name(self.handler_uid), "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/managed-by": "poolkeeper", COMPONENT_LABEL: COMPONENT,
                                        HANDLER_UID_LABEL: self.handler_uid,
                                        HANDLER_NAMESPACE_LABEL: self.handler_namespace,
                                        HANDLER_NAME_LABEL: _label_value(self.handler)},
                             "annotations": {HANDLER_ANNOTATION: f"{self.handler_namespace}/{self.handler}"}},
                "data": {DATA_KEY: text},
            }
            try:
                await self.api.replace(self.path, body)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                await self.api.create(resource_path("v1", "configmaps", self.namespace), body)
            self._saved = version
            self.writes += 1
