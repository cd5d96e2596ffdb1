"""Pools of pods backed by real HTTP servers, and HAProxy helpers, shared by operator tests."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable
from typing import Any

from kubernetes import client

from poolkeeper.backends.haproxy_client import HAProxyClient
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.workload import Workload
from support.kube import get

Workloads = Callable[..., Workload]  # the `workloads` fixture: make(app, gates=()) -> Workload


def servers_state(haproxy: HAProxyProcess, backend: str) -> list[str]:
    """The lines of `show servers state BACKEND` (read by the test, every server of the backend)."""
    async def read() -> list[str]:
        c = HAProxyClient(haproxy.admin_endpoint)
        try:
            return await c.execute([f"show servers state {backend}"])
        finally:
            await c.close()
    return asyncio.run(read())[0].splitlines()


def rotation(haproxy: HAProxyProcess, backend: str) -> dict[str, tuple[str, ...]]:
    """server -> (address, admin state, weight) of poolkeeper's servers: what an operator would change."""
    out = {}
    for line in servers_state(haproxy, backend):
        parts = line.split()
        if len(parts) > 7 and parts[3].startswith("pk-"):
            out[parts[3]] = (parts[4], parts[6], parts[7])
    return out


def haproxy_servers(haproxy: HAProxyProcess, backend: str) -> dict[str, str]:
    """server name -> "addr:port" of the poolkeeper servers HAProxy has now (read by the test)."""
    out = {}
    for line in servers_state(haproxy, backend):
        parts = line.split()
        if len(parts) > 5 and parts[3].startswith("pk-"):
            out[parts[3]] = f"{parts[4]}:{parts[18]}" if len(parts) > 18 else parts[4]
    return out


def haproxy_stats(haproxy: HAProxyProcess, backend: str) -> dict[str, dict[str, str]]:
    """server name -> `show stat` row (scur, stot, status, ...) for poolkeeper's servers."""
    async def read() -> str:
        c = HAProxyClient(haproxy.admin_endpoint)
        try:
            return (await c.execute(["show stat -1 4 -1"]))[0]
        finally:
            await c.close()
    text = asyncio.run(read()).lstrip("# ")
    rows = list(csv.DictReader(io.StringIO(text)))
    return {r["svname"]: r for r in rows if r["pxname"] == backend and r["svname"].startswith("pk-")}


# Test backends are HTTP servers on loopback addresses, which a LoadBalancer must allow explicitly.
LOOPBACK_TARGETS = ["127.0.0.0/8"]


def load_balancer(custom: client.CustomObjectsApi, name: str, endpoint: str, backends: list[Any] | None = None,
                  **spec: Any) -> None:
    """A LoadBalancer letting pools drive `backends` (names, or {name, allowedNamespaces} items);
    the default lists "web", the backend of the test HAProxy (poolkeeper_dev.haproxy)."""
    listed = [b if isinstance(b, dict) else {"name": b} for b in (["web"] if backends is None else backends)]
    custom.create_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", body={
        "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": name},
        "spec": {"type": "HAProxy", **spec,
                 "haproxy": {"endpoint": endpoint, "backends": listed, **spec.get("haproxy", {})}}})


def ha_backend(lb: str, backend: str, **extra: Any) -> dict[str, Any]:
    return {"type": "HAProxy", "haproxy": {"loadBalancerRef": {"name": lb}, "backend": backend, **extra}}


def members(custom: client.CustomObjectsApi, namespace: str, pool: str) -> dict[str, dict[str, Any]]:
    status = get(custom, namespace, "targetpools", pool).get("status") or {}
    return {m["instance"]: m for m in status.get("members") or []}


