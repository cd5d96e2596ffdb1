"""Tenants against the backends of a shared HAProxy: only listed backends, only allowed namespaces,
one pool per backend across LoadBalancer objects, and revocation takes the servers out.

The tenant has ordinary rights in its namespace (it creates TargetPools); LoadBalancers belong to
the admin. Everything runs against the real API server, operator and HAProxy.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from poolkeeper.core.naming import pool_prefix
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.standin_kubelet import FakeKubelet
from poolkeeper_dev.workload import Workload
from support.kube import condition, create, delete, events_for, get, namespace_name, pod_pool, wait_for
from support.pools import LOOPBACK_TARGETS, Workloads, ha_backend, haproxy_servers, load_balancer, servers_state

pytestmark = pytest.mark.cluster
LBS = {"group": "poolkeeper.dev", "version": "v1alpha1", "plural": "loadbalancers"}
WEB_TEAM = {"from": "Selector", "selector": {"matchLabels": {"team": "web"}}}


@pytest.fixture()
def haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    """Backend "web" for pools; "shop" serves another application from the config file."""
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web", "shop"), declared={"shop": "127.0.0.1:9 disabled"})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture()
def lbs(custom: client.CustomObjectsApi) -> Iterator[list[str]]:
    """Names of LoadBalancers the test creates (deleted afterwards)."""
    made: list[str] = []
    yield made
    for name in made:
        with contextlib.suppress(ApiException):
            custom.delete_cluster_custom_object(**LBS, name=name)


@pytest.fixture()
def tenant(core: client.CoreV1Api, kubelet: FakeKubelet, request: pytest.FixtureRequest
           ) -> Iterator[tuple[str, Workload]]:
    """A second namespace (label team=tenant) with pods of its own, playing the adversary."""
    name = namespace_name("tenant", request.node.name)
    core.create_namespace(body={"metadata": {"name": name, "labels": {"poolkeeper.dev/test": "true",
                                                                      "team": "tenant"}}})
    pods = Workload(kubelet, name, "grab")
    pods.add("grab-0")
    yield name, pods
    pods.stop_all()
    with contextlib.suppress(ApiException):
        core.delete_namespace(name=name)


def make_lb(custom: client.CustomObjectsApi, lbs: list[str], endpoint: str, backends: list[Any],
            **spec: Any) -> str:
    name = f"claims-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, name, endpoint, backends, allowedTargetCIDRs=LOOPBACK_TARGETS, **spec)
    lbs.append(name)
    return name


def synced(custom: client.CustomObjectsApi, namespace: str, pool: str, reason: str,
           timeout: float = 20) -> dict[str, Any]:
    return wait_for(lambda: (c := condition(get(custom, namespace, "targetpools", pool), "Synced")) and
                    c.get("reason") == reason and c, timeout, f"{namespace}/{pool} Synced reason {reason}")


def all_servers(haproxy: HAProxyProcess, backend: str) -> set[str]:
    """Every server of a backend, poolkeeper's or not."""
    return {line.split()[3] for line in servers_state(haproxy, backend)
            if len(line.split()) > 5 and not line.startswith("#")}


def own(haproxy: HAProxyProcess, backend: str, namespace: str, pool: str) -> dict[str, str]:
    prefix = pool_prefix(namespace, pool)
    return {n: a for n, a in haproxy_servers(haproxy, backend).items() if n.startswith(prefix)}


def label_namespace(core: client.CoreV1Api, namespace: str, team: str) -> None:
    core.patch_namespace(name=namespace, body={"metadata": {"labels": {"team": team}}})


def test_unlisted_backend_is_not_allowed_and_untouched(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        haproxy: HAProxyProcess, lbs: list[str], tenant: tuple[str, Workload]) -> None:
    tenant_ns, pods = tenant
    lb = make_lb(custom, lbs, haproxy.admin_endpoint, ["web"])  # "shop" is not poolkeeper's to drive
    before = all_servers(haproxy, "shop")
    assert before == {"static"}
    create(custom, tenant_ns, "targetpools", pod_pool("grab", app="grab", port=pods.port,
                                                       backend=ha_backend(lb, "shop"), delay=1))
    cond = synced(custom, tenant_ns, "grab", "NotAllowed")
    assert cond["status"] == "False" and "backend shop" in cond["message"] and f"LoadBalancer {lb}" in cond["message"]
    wait_for(lambda: any(r == "NotAllowed" and "shop" in m for r, m in events_for(core, tenant_ns, "grab")),
             10, "NotAllowed Event")
    assert all_servers(haproxy, "shop") == before  # nothing added, the config's server untouched

    # A LoadBalancer listing no backends at all (as before this field existed) lets no pool drive any.
    legacy = f"claims-{uuid.uuid4().hex[:6]}"
    custom.create_cluster_custom_object(**LBS, body={
        "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": legacy},
        "spec": {"haproxy": {"endpoint": haproxy.admin_endpoint}, "allowedTargetCIDRs": LOOPBACK_TARGETS}})
    lbs.append(legacy)
    accepted = wait_for(lambda: condition(custom.get_cluster_custom_object(**LBS, name=legacy), "Accepted"),
                        10, "Accepted condition")
    assert accepted["status"] == "False" and accepted["reason"] == "NoBackendsListed"
    create(custom, tenant_ns, "targetpools", pod_pool("legacy", app="grab", port=pods.port,
                                                       backend=ha_backend(legacy, "web"), delay=1))
    cond = synced(custom, tenant_ns, "legacy", "NotAllowed")
    assert "lists no backends" in cond["message"]
    assert haproxy_servers(haproxy, "web") == {}
    assert condition(custom.get_cluster_custom_object(**LBS, name=lb), "Accepted")["reason"] == "BackendsListed"


def test_a_refused_pool_created_first_does_not_block_the_allowed_one(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, haproxy: HAProxyProcess, lbs: list[str], tenant: tuple[str, Workload]) -> None:
    tenant_ns, pods = tenant
    label_namespace(core, namespace, "web")
    lb = make_lb(custom, lbs, haproxy.admin_endpoint, [{"name": "web", "allowedNamespaces": WEB_TEAM}])
    create(custom, tenant_ns, "targetpools", pod_pool("grab", app="grab", port=pods.port,
                                                       backend=ha_backend(lb, "web"), delay=1))
    synced(custom, tenant_ns, "grab", "NotAllowed")
    fleet = workloads("web")
    fleet.add("web-0")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb, "web"), delay=1))
    synced(custom, namespace, "web", "Synced")
    wait_for(lambda: len(own(haproxy, "web", namespace, "web")) == 1, 20, "the allowed pool's server")
    assert set(haproxy_servers(haproxy, "web")) == set(own(haproxy, "web", namespace, "web"))
    assert condition(get(custom, tenant_ns, "targetpools", "grab"), "Synced")["reason"] == "NotAllowed"


def test_two_load_balancers_on_one_endpoint_cannot_share_a_backend(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lbs: list[str], tenant: tuple[str, Workload]) -> None:
    tenant_ns, pods = tenant
    lb_a = make_lb(custom, lbs, haproxy.admin_endpoint, ["web"])
    other_spelling = haproxy.admin_endpoint.replace("unix://", "unix:///./", 1).replace("////", "///")
    assert other_spelling != haproxy.admin_endpoint
    lb_b = make_lb(custom, lbs, other_spelling, ["web"])
    fleet = workloads("web")
    fleet.add("web-0")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb_a, "web"), delay=1))
    wait_for(lambda: len(own(haproxy, "web", namespace, "web")) == 1, 20, "the first pool's server")
    create(custom, tenant_ns, "targetpools", pod_pool("grab", app="grab", port=pods.port,
                                                       backend=ha_backend(lb_b, "web"), delay=1))
    cond = synced(custom, tenant_ns, "grab", "Conflict")
    assert f"TargetPool {namespace}/web" in cond["message"] and lb_b in cond["message"]
    assert set(haproxy_servers(haproxy, "web")) == set(own(haproxy, "web", namespace, "web"))

    # The losing pool deleted: it goes at once, and the winner's servers stay.
    winners = own(haproxy, "web", namespace, "web")
    delete(custom, tenant_ns, "targetpools", "grab")
    wait_for(lambda: not custom.list_namespaced_custom_object(
        group="poolkeeper.dev", version="v1alpha1", namespace=tenant_ns, plural="targetpools")["items"],
        20, "the losing pool gone")
    assert haproxy_servers(haproxy, "web") == winners
    assert condition(get(custom, namespace, "targetpools", "web"), "Synced")["status"] == "True"


@pytest.mark.parametrize("revoke", ["selector", "backend-removed", "lb-deleted"])
def test_revoking_a_namespace_drains_and_removes_its_servers(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, haproxy: HAProxyProcess, lbs: list[str], revoke: str) -> None:
    label_namespace(core, namespace, "web")
    lb = make_lb(custom, lbs, haproxy.admin_endpoint, [{"name": "web", "allowedNamespaces": WEB_TEAM}])
    fleet = workloads("web")
    fleet.add("web-0")
    fleet.add("web-1")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb, "web"), delay=2))
    wait_for(lambda: len(own(haproxy, "web", namespace, "web")) == 2, 20, "two servers")
    if revoke == "selector":
        label_namespace(core, namespace, "someone-else")
        reason, why = "NotAllowed", f"namespace {namespace}"
    elif revoke == "backend-removed":
        custom.patch_cluster_custom_object(**LBS, name=lb, body={"spec": {"haproxy": {
            "endpoint": haproxy.admin_endpoint, "backends": [{"name": "shop"}]}}})
        reason, why = "NotAllowed", "does not list backend web"
    else:
        custom.delete_cluster_custom_object(**LBS, name=lb)
        reason, why = "LoadBalancerNotFound", f"LoadBalancer {lb} does not exist"
    cond = synced(custom, namespace, "web", reason)
    assert why in cond["message"]
    wait_for(lambda: own(haproxy, "web", namespace, "web") == {}, 15, "its servers drained and removed")
    assert all_servers(haproxy, "web") == set()
    assert all_servers(haproxy, "shop") == {"static"}
    wait_for(lambda: any(r == "Deregistered" for r, _ in events_for(core, namespace, "web")), 10, "Deregistered")


@pytest.mark.parametrize("revoke", ["backend-removed", "lb-deleted"])
def test_deleting_a_blocked_pool_removes_its_own_servers_first(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, haproxy: HAProxyProcess, lbs: list[str], revoke: str) -> None:
    """The finalizer of a pool that may no longer drive its backend still takes its servers out."""
    lb = make_lb(custom, lbs, haproxy.admin_endpoint, ["web"])
    fleet = workloads("web")
    fleet.add("web-0")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb, "web"), delay=3))
    wait_for(lambda: len(own(haproxy, "web", namespace, "web")) == 1, 20, "one server")
    if revoke == "lb-deleted":
        custom.delete_cluster_custom_object(**LBS, name=lb)
    else:
        custom.patch_cluster_custom_object(**LBS, name=lb, body={"spec": {"haproxy": {
            "endpoint": haproxy.admin_endpoint, "backends": [{"name": "shop"}]}}})
    delete(custom, namespace, "targetpools", "web")

    def gone() -> bool:
        try:
            get(custom, namespace, "targetpools", "web")
        except ApiException as exc:
            return exc.status == 404
        return False
    wait_for(gone, 20, "the pool finalized")
    assert own(haproxy, "web", namespace, "web") == {}
    assert all_servers(haproxy, "shop") == {"static"}
