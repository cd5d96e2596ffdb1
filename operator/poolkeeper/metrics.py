"""Prometheus metrics and the liveness/readiness probe server, on one port."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Children:
    """`metric.labels(*values)`, remembered: prometheus_client validates the values and takes a lock on
    every call, which showed in the profile of a cold start (one transition counted per listed pod).
    Only for label values from a small fixed set (a child kept here must never be removed)."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.transitions = Counter("poolkeeper_transitions_total", "Instance phase transitions seen",
                                   ["kind", "to"], registry=r)
        self.reconciles = Counter("poolkeeper_reconciles_total", "Pool reconciles", ["result"], registry=r)
        self.backend_errors = Counter("poolkeeper_backend_errors_total", "Backend errors", ["reason"], registry=r)
        self.backend_actions = Counter("poolkeeper_backend_actions_total", "Backend actions applied",
                                       ["action", "ok"], registry=r)
        # the counters of the per-event path, by (kind, to), (result,) and (action, ok)
        self.transition, self.reconciled = Children(self.transitions), Children(self.reconciles)
        self.backend_action = Children(self.backend_actions)
        self.event_to_backend = Histogram("poolkeeper_event_to_backend_seconds",
                                          "From a watch event to the backend change it caused",
                                          buckets=LATENCY_BUCKETS, registry=r)
        # The termination race: the kubelet starts a pod's preStop hook on the same event.
        self.termination_to_drain = Histogram(
            "poolkeeper_termination_to_drain_seconds",
            "From the watch event of a member starting to terminate (or drain) to its drain applied in the backend",
            buckets=LATENCY_BUCKETS, registry=r)
        self.members = Gauge("poolkeeper_pool_active_members", "Active members per pool",
                             ["namespace", "pool"], registry=r)
        self.leader = Gauge("poolkeeper_leader", "1 while this replica acts (holds the Lease, or runs alone)",
                            registry=r)
        self.shards_held = Gauge("poolkeeper_shards_held", "Shard Leases this replica holds (--shards > 1)",
                                 registry=r)
        self.shards = Gauge("poolkeeper_shards", "Shards the pools are spread over (--shards)", registry=r)
        self.status_writes = Counter("poolkeeper_status_writes_total",
                                     "Status subresource writes sent (unchanged statuses are not sent)",
                                     ["resource"], registry=r)
        self.status_written = Children(self.status_writes)  # by resource: targetpools, loadbalancers, ...
        self.invocations = Counter("poolkeeper_handler_invocations_total", "Lifecycle handler deliveries",
                                   ["result"], registry=r)
        self.dead_lettered = Counter("poolkeeper_handler_dead_lettered_total",
                                     "Lifecycle handler events given up on (RetriesExhausted, BacklogFull)",
                                     ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def start_probe_server(metrics: Metrics, ready: Callable[[], str | None], address: str,
                             port: int) -> web.AppRunner:
    """/healthz: the loop answers; /readyz: 200 with what this replica does (None: not ready); /metrics."""
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        doing = ready()
        return web.Response(text=doing) if doing else web.Response(status=503, text="starting")

    async def render(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", render)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()
    return runner
