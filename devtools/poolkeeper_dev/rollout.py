"""Real rollouts on a devcluster node, counted honestly: the shared parts of the rollout test and demo.

A Deployment of real HTTP pods (the testweb image) behind a TargetPool with a readiness gate and
health checks, traffic through an HAProxy with `retries 0` and no redispatch, and HAProxy's own
error counters read all along: a server's counters vanish with the server, so they are sampled
while the rollout runs and the backend's totals (which outlive its servers) are read at the end.
"""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from poolkeeper.backends.haproxy_client import HAProxyClient
from poolkeeper_dev.image import TESTWEB_IMAGE

ERROR_COUNTERS = ("econ", "eresp", "wretr", "wredis")
GATE_PREFIX = "poolkeeper.dev/"

__all__ = [
    "ERROR_COUNTERS",
    "NO_ERRORS",
    "TESTWEB_IMAGE",
    "ErrorWatch",
    "backend_errors",
    "in_rotation",
    "show_stat",
    "wait_rollout",
    "web_deployment",
    "web_pool",
]


def web_deployment(name: str, *, pool: str, replicas: int = 3, port: int = 8080, pre_stop_sleep: int | None = 5,
                   image: str = TESTWEB_IMAGE, grace_seconds: int = 30) -> dict[str, Any]:
    """A Deployment as we recommend it: readiness gate of its pool, maxUnavailable 0, and a
    `preStop: sleep` so the container keeps serving while the load balancer drains it."""
    container: dict[str, Any] = {
        "name": "web", "image": image, "imagePullPolicy": "Never",
        "ports": [{"name": "http", "containerPort": port}],
        "env": [{"name": "PORT", "value": str(port)},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 1,
                           "failureThreshold": 1},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "allowPrivilegeEscalation": False},
    }
    if pre_stop_sleep:
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": pre_stop_sleep}}}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"readinessGates": [{"conditionType": f"{GATE_PREFIX}{pool}"}],
                         "terminationGracePeriodSeconds": grace_seconds, "containers": [container]},
            },
        },
    }


def web_pool(name: str, *, app: str, lb: str, backend: str, port: int = 8080, delay: int = 5) -> dict[str, Any]:
    """The TargetPool for `web_deployment`: its pods, health-checked in an HAProxy backend."""
    return {
        "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "TargetPool", "metadata": {"name": name},
        "spec": {"source": {"kind": "Pod", "selector": {"matchLabels": {"app": app}}}, "port": port,
                 "backend": {"type": "HAProxy", "haproxy": {
                     "loadBalancerRef": {"name": lb}, "backend": backend,
                     "healthCheck": {"intervalSeconds": 1, "rise": 2, "fall": 2}}},
                 "deregistrationDelaySeconds": delay},
    }


def show_stat(endpoint: str) -> list[dict[str, str]]:
    """HAProxy's `show stat` as rows (one HAProxy call on its own loop)."""
    async def read() -> str:
        client = HAProxyClient(endpoint)
        try:
            return (await client.execute(["show stat"]))[0]
        finally:
            await client.close()
    return list(csv.DictReader(io.StringIO(asyncio.run(read()).lstrip("# "))))


NO_ERRORS = dict.fromkeys(ERROR_COUNTERS, 0)


def backend_errors(endpoint: str, backend: str) -> dict[str, int]:
    """The BACKEND row's econ/eresp/wretr/wredis: they outlive the servers that came and went."""
    for row in show_stat(endpoint):
        if row["pxname"] == backend and row["svname"] == "BACKEND":
            return {name: int(row.get(name) or 0) for name in ERROR_COUNTERS}
    raise KeyError(f"HAProxy has no backend {backend}")


@dataclass
class ErrorWatch:
    """Samples a backend's per-server error counters until stopped; keeps the highest seen per server,
    and when (time.monotonic() before the read) a sample found no poolkeeper server in rotation."""

    endpoint: str
    backend: str
    interval: float = 0.05
    servers: dict[str, dict[str, int]] = field(default_factory=dict)
    backend_totals: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    empty_at: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ErrorWatch:
        self._thread = threading.Thread(target=self._run, name="haproxy-errors", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> ErrorWatch:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        taken = time.monotonic()
        try:
            rows = show_stat(self.endpoint)
        except (OSError, RuntimeError):
            return
        self.samples += 1
        ours = [r for r in rows if r["pxname"] == self.backend and r["svname"].startswith(("pk-", "pk."))]
        if not any(in_rotation(r["status"]) for r in ours):
            self.empty_at.append(taken)
        for row in rows:
            if row["pxname"] != self.backend:
                continue
            counts = {name: int(row.get(name) or 0) for name in ERROR_COUNTERS}
            if row["svname"] == "BACKEND":
                self.backend_totals = counts
                continue
            seen = self.servers.setdefault(row["svname"], dict.fromkeys(ERROR_COUNTERS, 0))
            for name, value in counts.items():
                seen[name] = max(seen[name], value)

    def errors(self) -> dict[str, int]:
        """Totals over every server seen, and the backend's own counters, whichever is higher."""
        summed = {name: sum(s[name] for s in self.servers.values()) for name in ERROR_COUNTERS}
        return {name: max(summed[name], self.backend_totals.get(name, 0)) for name in ERROR_COUNTERS}


def in_rotation(status: str) -> bool:
    """A `show stat` status HAProxy sends new requests to (`UP 1/3` is on its way down, still in)."""
    return status in ("UP", "no check") or status.startswith("UP ")


def server_status(endpoint: str, backend: str, address: str) -> str:
    """HAProxy's status (UP, DRAIN, MAINT, DOWN...) of poolkeeper's server for `address`, or GONE."""
    for row in show_stat(endpoint):
        if row["pxname"] == backend and row["svname"].startswith("pk-") and row.get("addr", "").startswith(
                f"{address}:"):
            return row["status"]
    return "GONE"


def time_to_drain(endpoint: str, backend: str, address: str, delete: Any, timeout: float = 10.0) -> tuple[float, str]:
    """Call `delete()` (the pod's deletion) and time it until HAProxy no longer has the server UP."""
    started = time.monotonic()
    delete()
    while time.monotonic() - started < timeout:
        status = server_status(endpoint, backend, address)
        if status != "UP":
            return time.monotonic() - started, status
        time.sleep(0.002)
    raise TimeoutError(f"{address} still UP in HAProxy {timeout:.0f} s after its pod was deleted")


def wait_rollout(kubectl: Any, namespace: str, deployment: str, timeout: float = 180) -> float:
    """`kubectl rollout status` until done; returns how long it took."""
    started = time.monotonic()
    kubectl("rollout", "status", f"deployment/{deployment}", "-n", namespace, f"--timeout={int(timeout)}s")
    return time.monotonic() - started
