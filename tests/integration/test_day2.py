"""Day-2 changes under real traffic through a real HAProxy (retries 0, no redispatch).

Each test watches HAProxy itself while the change happens, and ends with 0 failed requests on
the client side and 0 econ/eresp/wretr/wredis on the backend.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.ports import free_port
from poolkeeper_dev.rollout import NO_ERRORS, backend_errors
from poolkeeper_dev.standin_kubelet import FakeKubelet
from poolkeeper_dev.traffic import HTTPBackend, LoadGenerator, start_backend
from support.kube import (
    GROUP,
    VERSION,
    condition,
    create,
    events_for,
    get,
    pod_pool,
    selectorless_service,
    slice_backend,
    wait_for,
)
from support.pools import LOOPBACK_TARGETS, Workloads, ha_backend, haproxy_stats, load_balancer, members
from support.receiver import Receiver

SLICE_LABELS = "endpointslice.kubernetes.io/managed-by=poolkeeper.dev,kubernetes.io/service-name="
CHECKS = {"healthCheck": {"intervalSeconds": 1, "rise": 3, "fall": 2}}  # fall 1 would read UP unchecked


@pytest.fixture()
def haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web", "api"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture()
def lb_name(custom: client.CustomObjectsApi, haproxy: HAProxyProcess) -> Iterator[str]:
    name = f"day2-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, name, haproxy.admin_endpoint, ["web", "api"], allowedTargetCIDRs=LOOPBACK_TARGETS)
    yield name
    with contextlib.suppress(client.ApiException):  # a test may have deleted it
        custom.delete_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers", name=name)


def patch_pool(custom: client.CustomObjectsApi, namespace: str, name: str, spec: dict[str, Any]) -> None:
    custom.patch_namespaced_custom_object(group=GROUP, version=VERSION, namespace=namespace, plural="targetpools",
                                          name=name, body={"spec": spec})


def in_rotation(row: dict[str, str]) -> bool:
    """Ready and passing its checks (or without any): HAProxy sends new requests to it."""
    return row["status"] in ("UP", "no check")


@pytest.fixture()
def switching_haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    """Frontend fe_web sends to backend web and, once web has no server in rotation, to its backup
    server: frontend fe_api, i.e. backend api. The user's frontend switch, done the moment the old
    backend stops taking new requests, so traffic can stay on fe_web through a whole move."""
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web", "api"))
    proc.declared["web"] = f"127.0.0.1:{proc.frontend_ports['api']} backup"
    proc.start()
    yield proc
    proc.stop()


def test_a_moved_pool_is_in_rotation_in_the_new_backend_before_the_old_one_drains(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, switching_haproxy: HAProxyProcess) -> None:
    haproxy = switching_haproxy
    lb = f"day2-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, lb, haproxy.admin_endpoint, ["web", "api"], allowedTargetCIDRs=LOOPBACK_TARGETS)
    try:
        fleet = workloads("web")
        for i in range(3):
            fleet.add(f"web-{i}")
        create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port, delay=30,
                                                           backend=ha_backend(lb, "web", **CHECKS)))
        wait_for(lambda: [m["state"] for m in members(custom, namespace, "web").values()] == ["Active"] * 3,
                 30, "3 active members in backend web")
        load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=200).start(duration=90)
        # requests in flight on the old servers when they drain, each held open for 8 s
        inflight = LoadGenerator(haproxy.frontend_url("web") + "/?delay=8", connections=3).start(count=3)
        wait_for(lambda: sum(int(r["scur"] or 0) for r in haproxy_stats(haproxy, "web").values()) >= 3,
                 10, "slow requests in flight")
        patch_pool(custom, namespace, "web", {"backend": ha_backend(lb, "api", **CHECKS)})
        early_drains: list[str] = []
        drained_busy: set[str] = set()

        def old_backend_emptied() -> bool:
            web, api = haproxy_stats(haproxy, "web"), haproxy_stats(haproxy, "api")
            api_ready = len(api) == 3 and all(in_rotation(r) for r in api.values())
            for name, row in web.items():
                if not in_rotation(row):
                    if not api_ready:
                        early_drains.append(f"{name} {row['status']} while api: {[r['status'] for r in api.values()]}")
                    if int(row["scur"] or 0):
                        drained_busy.add(name)
            return not web and api_ready

        wait_for(old_backend_emptied, 45, "backend web emptied once api is in rotation", interval=0.05)
        finished = inflight.wait(20)
        on_new = load.snapshot().ok
        wait_for(lambda: load.snapshot().ok >= on_new + 100, 20, "100 more requests, now served by backend api")
        report = load.stop()
        pool = wait_for(lambda: (p := get(custom, namespace, "targetpools", "web")) and
                        len(p["status"].get("placements") or []) == 1 and p, 10, "old placement forgotten")
    finally:
        custom.delete_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers", name=lb)
    assert not early_drains, early_drains
    assert drained_busy, "in-flight requests were on the old servers while they drained"
    assert finished.ok == 3 and finished.failed == 0, finished.failures
    assert report.failed == 0 and report.total > 200, report.failures
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
    assert backend_errors(haproxy.admin_endpoint, "api") == NO_ERRORS
    assert sum(int(r["stot"] or 0) for r in haproxy_stats(haproxy, "api").values()) >= 100
    assert pool["status"]["placements"] == [{"type": "HAProxy", "loadBalancer": lb, "backend": "api"}]
    assert "Moved" in [reason for reason, _ in events_for(core, namespace, "web")]


def test_a_port_change_replaces_members_beside_the_old_ones(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    fleet = workloads("web")
    new_port = fleet.port + 1 if fleet.port < 65000 else fleet.port - 1
    second: list[HTTPBackend] = []
    try:
        for i in range(3):
            ip = fleet.add(f"web-{i}")
            second.append(start_backend(ip, new_port))  # the new version of the app listens on another port
        create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port, delay=30,
                                                           backend=ha_backend(lb_name, "web", **CHECKS)))
        wait_for(lambda: [m["state"] for m in members(custom, namespace, "web").values()] == ["Active"] * 3,
                 30, "3 active members")
        load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=200).start(duration=90)
        wait_for(lambda: load.snapshot().ok >= 50, 10, "traffic before the change")
        patch_pool(custom, namespace, "web", {"port": new_port})
        fewest: list[int] = []

        def all_on_the_new_port() -> bool:
            rows = haproxy_stats(haproxy, "web")
            fewest.append(sum(1 for r in rows.values() if in_rotation(r)))
            states = [(r["status"], r.get("scur")) for r in rows.values()]
            return len(rows) == 3 and all(s == "UP" for s, _ in states) and \
                {m["port"] for m in members(custom, namespace, "web").values()} == {new_port}

        wait_for(all_on_the_new_port, 45, "every member replaced by one on the new port", interval=0.05)
        # initialState Up: the successors serve at once, so the change itself may take well under a second
        replaced = load.snapshot().ok
        wait_for(lambda: load.snapshot().ok >= replaced + 50, 10, "traffic through the new servers")
        report = load.stop()
    finally:
        for backend in second:
            backend.stop()
    assert min(fewest) >= 3, f"an instance was out of rotation during the change: {min(fewest)} in rotation"
    assert report.failed == 0 and report.total > 100, report.failures
    assert {body.split(":")[1] for body in report.served_by} == {str(fleet.port), str(new_port)}
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS


def test_an_endpointslice_pool_moved_to_another_service_writes_the_new_slices_first(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, api_client: client.ApiClient) -> None:
    discovery = client.DiscoveryV1Api(api_client)

    def ready_endpoints(service: str) -> set[str]:
        items = discovery.list_namespaced_endpoint_slice(namespace=namespace, label_selector=SLICE_LABELS + service)
        return {ep.addresses[0] for s in items.items for ep in s.endpoints or [] if ep.conditions.ready}

    for service in ("old", "new"):
        selectorless_service(core, namespace, service)
    for i in range(3):
        kubelet.create_pod(namespace, f"web-{i}", {"app": "web"})
        kubelet.set_ready(namespace, f"web-{i}", f"192.0.2.{i + 1}")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("old")))
    wait_for(lambda: len(ready_endpoints("old")) == 3, 20, "3 endpoints for Service old")
    patch_pool(custom, namespace, "web", {"backend": slice_backend("new")})
    gaps: list[str] = []

    def moved() -> bool:
        old, new = ready_endpoints("old"), ready_endpoints("new")
        if len(old) < 3 and len(new) < 3:
            gaps.append(f"old {sorted(old)}, new {sorted(new)}")
        return not old and len(new) == 3

    wait_for(moved, 20, "slices of Service old deleted after those of Service new", interval=0.05)
    assert not gaps, f"neither Service had every endpoint ready: {gaps}"
    status = wait_for(lambda: (s := get(custom, namespace, "targetpools", "web").get("status") or {}) and
                      s.get("placements") == [{"type": "EndpointSlice", "service": "new"}] and s,
                      10, "status.placements names only Service new")
    assert status["active"] == 3


FILTER_LABEL = "poolkeeper.dev/member"


@pytest.fixture()
def filtered_operator(operator: OperatorProcess, cluster: Cluster, handlers_dir: Path, tmp_path: Path,
                      namespace: str) -> Iterator[OperatorProcess]:
    """An operator that watches only pods labelled poolkeeper.dev/member=yes, in this namespace
    (the session's operator pauses meanwhile: one operator per pool)."""
    operator.stop()
    proc = OperatorProcess(cluster.kubeconfig, tmp_path / "filtered-logs", handlers_dir=handlers_dir,
                           extra_args=("--http-allowed-cidrs", "127.0.0.0/8", "--namespace", namespace,
                                       "--pod-label-selector", f"{FILTER_LABEL}=yes"))
    try:
        proc.start()
    except RuntimeError as exc:
        pytest.fail(f"the filtered operator could not start: {exc}", pytrace=False)
    yield proc
    proc.stop()


def test_a_pod_relabelled_out_of_the_operator_filter_drains_and_handlers_hear_why(
        filtered_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, core: client.CoreV1Api, haproxy: HAProxyProcess, lb_name: str,
        receiver: Receiver) -> None:
    servers: list[HTTPBackend] = []
    port = free_port()
    try:
        for i in range(2):
            ip = f"127.0.{60 + i}.1"
            servers.append(start_backend(ip, port))
            kubelet.create_pod(namespace, f"web-{i}", {"app": "web", FILTER_LABEL: "yes"}, port=port)
            kubelet.set_ready(namespace, f"web-{i}", ip)
        path = f"/filter-{namespace}"
        create(custom, namespace, "lifecyclehandlers", {
            "kind": "LifecycleHandler", "metadata": {"name": "rec"},
            "spec": {"poolRef": {"name": "web"}, "events": ["up", "down"],
                     "function": {"type": "HTTP", "http": {"url": receiver.url(path)}}}})
        create(custom, namespace, "targetpools", pod_pool("web", app="web", port=port, delay=30,
                                                           backend=ha_backend(lb_name, "web")))
        wait_for(lambda: [m["state"] for m in members(custom, namespace, "web").values()] == ["Active"] * 2,
                 30, "2 active members")
        wait_for(lambda: len(receiver.on(path)) == 2, 20, "both up events delivered")
        load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=200).start(duration=60)
        held = LoadGenerator(haproxy.frontend_url("web") + "/?delay=5", connections=4).start(count=4)
        wait_for(lambda: sum(int(r["scur"] or 0) for r in haproxy_stats(haproxy, "web").values()) >= 2,
                 10, "slow requests in flight on both servers")
        relabel = {"metadata": {"labels": {FILTER_LABEL: "no"}}}
        core.patch_namespaced_pod(name="web-1", namespace=namespace, body=relabel)
        busy_while_draining: list[str] = []

        def gone() -> bool:
            rows = {r["svname"]: r for r in haproxy_stats(haproxy, "web").values()}
            busy_while_draining.extend(n for n, r in rows.items() if not in_rotation(r) and int(r["scur"] or 0))
            return len(rows) == 1

        wait_for(gone, 30, "the relabelled pod's server drained and removed", interval=0.05)
        slow = held.wait(20)
        report = load.stop()
        down = wait_for(lambda: [r for r in receiver.on(path) if r.headers["ce-subject"].endswith("/web-1")
                                 and r.headers["ce-type"].endswith(".down")], 20, "the down event of web-1")
    finally:
        for server in servers:
            server.stop()
    assert busy_while_draining, "the server drained with its requests still in flight"
    assert slow.ok == 4 and slow.failed == 0, slow.failures
    assert report.failed == 0 and report.total > 50, report.failures
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
    assert down[0].data["reason"] == "pod no longer matches the operator's --pod-label-selector"
    assert down[0].data["from"] == "up"


def pool_exists(custom: client.CustomObjectsApi, namespace: str, name: str) -> bool:
    try:
        get(custom, namespace, "targetpools", name)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def own_servers(haproxy: HAProxyProcess, backend: str, prefix: str) -> dict[str, dict[str, str]]:
    return {n: r for n, r in haproxy_stats(haproxy, backend).items() if n.startswith(prefix)}


def test_a_deleted_pool_keeps_its_finalizer_until_its_own_servers_drained_even_without_its_load_balancer(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    fleet = workloads("web")
    for i in range(2):
        fleet.add(f"web-{i}")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port, delay=30,
                                                       backend=ha_backend(lb_name, "web")))
    wait_for(lambda: [m["state"] for m in members(custom, namespace, "web").values()] == ["Active"] * 2,
             30, "2 active members")
    inflight = LoadGenerator(haproxy.frontend_url("web") + "/?delay=3", connections=2).start(count=2)
    wait_for(lambda: sum(int(r["scur"] or 0) for r in haproxy_stats(haproxy, "web").values()) >= 2,
             10, "slow requests in flight")
    custom.delete_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers", name=lb_name)
    custom.delete_namespaced_custom_object(group=GROUP, version=VERSION, namespace=namespace,
                                           plural="targetpools", name="web")
    held: list[bool] = []

    def finalized() -> bool:
        rows, exists = haproxy_stats(haproxy, "web"), pool_exists(custom, namespace, "web")
        held.append(not exists and bool(rows))  # gone while a server of its own is still there
        return not exists

    wait_for(finalized, 30, "the pool finalized", interval=0.05)
    assert not any(held), "the finalizer went while the pool's servers were still in HAProxy"
    assert haproxy_stats(haproxy, "web") == {}
    finished = inflight.wait(10)
    assert finished.ok == 2 and finished.failed == 0, finished.failures
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS


def test_deleting_the_older_of_two_claimants_removes_only_its_servers_and_the_newer_takes_over(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    fleet = workloads("web")
    for i in range(2):
        fleet.add(f"web-{i}")
    create(custom, namespace, "targetpools", pod_pool("a-older", app="web", port=fleet.port, delay=30,
                                                       backend=ha_backend(lb_name, "web")))
    wait_for(lambda: len(haproxy_stats(haproxy, "web")) == 2, 30, "the older pool's 2 servers")
    older = set(haproxy_stats(haproxy, "web"))
    create(custom, namespace, "targetpools", pod_pool("b-newer", app="web", port=fleet.port, delay=30,
                                                       backend=ha_backend(lb_name, "web")))
    wait_for(lambda: condition(get(custom, namespace, "targetpools", "b-newer"), "Synced").get("reason") == "Conflict",
             20, "the newer pool in Conflict")
    inflight = LoadGenerator(haproxy.frontend_url("web") + "/?delay=3", connections=2).start(count=2)
    wait_for(lambda: sum(int(r["scur"] or 0) for r in haproxy_stats(haproxy, "web").values()) >= 2,
             10, "slow requests in flight on the older pool's servers")
    custom.delete_namespaced_custom_object(group=GROUP, version=VERSION, namespace=namespace,
                                           plural="targetpools", name="a-older")
    early: list[str] = []

    def handed_over() -> bool:
        rows, exists = haproxy_stats(haproxy, "web"), pool_exists(custom, namespace, "a-older")
        if not exists and set(rows) & older:
            early.append(f"older finalized with {sorted(set(rows) & older)} still there")
        newer = [r for n, r in rows.items() if n not in older]
        return not exists and not set(rows) & older and len(newer) == 2 and all(in_rotation(r) for r in newer)

    wait_for(handed_over, 30, "the older pool's servers gone, the newer pool's in rotation", interval=0.05)

    assert not early, early
    finished = inflight.wait(10)
    assert finished.ok == 2 and finished.failed == 0, finished.failures
    after = LoadGenerator(haproxy.frontend_url("web"), connections=2).start(count=100).wait(20)
    assert after.ok == 100, after.failures
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
