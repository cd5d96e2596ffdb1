"""A tenant (a namespace user writing Instances, Pods, TargetPools and LifecycleHandlers) against the
one address policy, through the real API server, the real operator and a real HAProxy."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from test_lifecycle import handler, handler_status, http, lines, python, recorder_module, write_handler
from test_operator_endpointslice import endpoints, slices

from poolkeeper.agent import report_heartbeat
from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.standin_kubelet import FakeKubelet
from support.kube import condition, create, events_for, get, pod_pool, selectorless_service, slice_backend, wait_for
from support.pools import ha_backend, haproxy_servers, load_balancer, members
from support.receiver import SECRET_BODY, Receiver

# What a tenant may write into Instance.spec.address to point the load balancer at itself or the cloud.
HOSTILE = {"loopback": "127.0.0.1", "unspecified": "0.0.0.0", "loopback-v6": "::1", "metadata": "169.254.169.254"}
ALLOW_ALL_OF_THEM = ["127.0.0.0/8", "0.0.0.0/32", "::1/128", "169.254.169.254/32", "192.0.2.0/24"]


@pytest.fixture()
def haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("vms",))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture()
def lb_name(custom: client.CustomObjectsApi) -> Iterator[str]:
    name = f"tenant-{uuid.uuid4().hex[:6]}"
    yield name
    custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", name=name)


def instance_pool(name: str, backend: dict[str, Any], group: str) -> dict[str, Any]:
    return {"kind": "TargetPool", "metadata": {"name": name}, "spec": {
        "source": {"kind": "Instance", "selector": {"matchLabels": {"group": group}}}, "port": 8080,
        "backend": backend, "deregistrationDelaySeconds": 1}}


def running_instance(custom: client.CustomObjectsApi, cluster: Cluster, namespace: str, name: str, address: str,
                     group: str) -> None:
    create(custom, namespace, "instances", {"kind": "Instance", "metadata": {"name": name, "labels": {"group": group}},
                                            "spec": {"address": address}})
    report_heartbeat(name, namespace=namespace, state="running", kubeconfig=str(cluster.kubeconfig))


def test_instances_pointing_at_the_load_balancer_itself_are_refused_until_the_lb_allows_them(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        cluster: Cluster, haproxy: HAProxyProcess, lb_name: str, handlers_dir: Path, tmp_path: Path) -> None:
    load_balancer(custom, lb_name, haproxy.admin_endpoint, ["vms"])  # no allowedTargetCIDRs: the default policy
    create(custom, namespace, "targetpools", instance_pool("vms", ha_backend(lb_name, "vms"), "vms"))
    seen = tmp_path / "events.jsonl"  # what a Python handler of the pool is told (e.g. warmup GETs the address)
    module = f"rec_{uuid.uuid4().hex[:6]}"
    write_handler(handlers_dir, module, recorder_module(seen))
    create(custom, namespace, "lifecyclehandlers", handler("rec", "vms", python(f"{module}.handle"), events=["up"]))
    wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "rec"), "Ready").get("status") == "True",
             20, "handler Ready")

    def told() -> set[str]:
        return {line["event"]["data"]["instance"]["address"] for line in lines(seen)}
    for name, address in HOSTILE.items():
        running_instance(custom, cluster, namespace, name, address, "vms")
    running_instance(custom, cluster, namespace, "fine", "192.0.2.50", "vms")

    refs = {f"Instance/{namespace}/{name}" for name in HOSTILE}
    rows = wait_for(lambda: (m := members(custom, namespace, "vms")) and refs <= set(m)
                    and m.get(f"Instance/{namespace}/fine", {}).get("state") == "Active" and m, 20, "members reported")
    for name, address in HOSTILE.items():
        row = rows[f"Instance/{namespace}/{name}"]
        assert row["state"] == "Held", row
        assert row["reason"].startswith(f"refused: address {address} is ") and "allowedTargetCIDRs" in row["reason"]
    assert "cloud metadata" in rows[f"Instance/{namespace}/metadata"]["reason"]
    assert "unspecified" in rows[f"Instance/{namespace}/unspecified"]["reason"]
    assert set(haproxy_servers(haproxy, "vms").values()) == {"192.0.2.50:8080"}  # no server for any of them
    refused = wait_for(lambda: {m.split(":")[0] for r, m in events_for(core, namespace, "vms") if r == "MemberRefused"}
                       >= refs or None, 10, "MemberRefused Events")
    assert refused
    wait_for(lambda: told() == {"192.0.2.50"}, 10, "the handler told of the fine instance")
    assert told() == {"192.0.2.50"}  # and of no refused one

    # The admin allows them explicitly: CIDRs inside each special range. Now they are added.
    custom.patch_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers",
                                       name=lb_name, body={"spec": {"allowedTargetCIDRs": ALLOW_ALL_OF_THEM}})
    wait_for(lambda: all(r["state"] == "Active" for r in members(custom, namespace, "vms").values())
             and len(members(custom, namespace, "vms")) == 5, 20, "all Active once allowed")
    addresses = {a.rsplit(":", 1)[0] for a in haproxy_servers(haproxy, "vms").values()}
    assert addresses == {"127.0.0.1", "0.0.0.0", "::1", "169.254.169.254", "192.0.2.50"}
    wait_for(lambda: told() == {*HOSTILE.values(), "192.0.2.50"}, 10, "the handler told of the allowed ones")


def test_http_handler_status_shows_the_code_never_the_body(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet) -> None:
    receiver = Receiver().start()
    try:
        selectorless_service(core, namespace, "web")
        create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web")))
        create(custom, namespace, "lifecyclehandlers", handler(
            "peek", "web", http(receiver.url(f"/secret-500/{namespace}")), events=["up"],
            retry={"maxAttempts": 2, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1}))
        kubelet.create_pod(namespace, "web-0", {"app": "web"})
        kubelet.set_ready(namespace, "web-0", "192.0.2.90")
        status = wait_for(lambda: (s := handler_status(custom, namespace, "peek")).get("deadLettered") == 1 and s,
                          30, "dead-lettered")
        assert status["lastInvocation"]["error"] == "HTTP 500"
        body = json.dumps(get(custom, namespace, "lifecyclehandlers", "peek"))
        assert SECRET_BODY not in body
        events = wait_for(lambda: (e := events_for(core, namespace, "peek")) and any(
            r == "DeadLettered" for r, _ in e) and e, 10, "DeadLettered Event")
        assert all(SECRET_BODY not in m for _, m in events)
        assert any("HTTP 500" in m for r, m in events if r == "DeadLettered")
    finally:
        receiver.stop()


def test_defaults_refuse_external_sources_loopback_pods_and_loopback_handlers(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        api_client: client.ApiClient, cluster: Cluster, kubelet: FakeKubelet, tmp_path: Path,
        handlers_dir: Path) -> None:
    # The session's operator allows external sources (for test_sources); this test runs one with the defaults.
    running_operator.kill()
    operator = OperatorProcess(cluster.kubeconfig, tmp_path / "defaults", handlers_dir=handlers_dir).start()
    try:
        group = f"vms-{uuid.uuid4().hex[:5]}"
        selectorless_service(core, namespace, "vms")
        create(custom, namespace, "targetpools", instance_pool("vms", slice_backend("vms"), group))
        running_instance(custom, cluster, namespace, "vm-1", "192.0.2.61", group)
        running_instance(custom, cluster, namespace, "vm-2", "10.96.0.1", group)  # say, the kubernetes Service
        selectorless_service(core, namespace, "nodes")
        create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "nodes"}, "spec": {
            "source": {"kind": "Node", "selector": {"matchLabels": {"role": group}}}, "port": 30080,
            "backend": slice_backend("nodes")}})
        for pool in ("vms", "nodes"):
            synced = wait_for(lambda p=pool: (c := condition(get(custom, namespace, "targetpools", p), "Synced"))
                              .get("status") == "False" and c, 20, f"{pool} not synced")
            assert synced["reason"] == "SourceNotAllowed"
            assert "--endpointslice-allow-external-sources" in synced["message"]
            wait_for(lambda p=pool: any(r == "SourceNotAllowed" for r, _ in events_for(core, namespace, p)), 10,
                     f"{pool} SourceNotAllowed Event")
        assert slices(api_client, namespace, "vms") == [] and slices(api_client, namespace, "nodes") == []
        assert not get(custom, namespace, "targetpools", "vms")["status"].get("members")

        # Pods are allowed, but not with an address the policy refuses.
        selectorless_service(core, namespace, "web")
        create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web")))
        for name, ip in (("ok", "198.51.100.7"), ("lo", "127.0.0.9"), ("meta", "169.254.169.254")):
            kubelet.create_pod(namespace, name, {"app": "web"})
            kubelet.set_ready(namespace, name, ip)
        wait_for(lambda: set(endpoints(api_client, namespace, "web")) == {"198.51.100.7"}, 20, "only the fine pod")
        rows = wait_for(lambda: (m := members(custom, namespace, "web")) and len(m) == 3 and m, 10, "3 rows")
        for name, what in (("lo", "loopback"), ("meta", "cloud metadata")):
            row = rows[f"Pod/{namespace}/{name}"]
            assert row["state"] == "Held" and what in row["reason"]
            assert "--endpointslice-allowed-cidrs" in row["reason"]
        wait_for(lambda: sum(r == "MemberRefused" for r, _ in events_for(core, namespace, "web")) >= 2, 10,
                 "MemberRefused Events")
        assert set(endpoints(api_client, namespace, "web")) == {"198.51.100.7"}

        # HTTP handlers, as shipped (no --http-allowed-cidrs): not the operator's loopback, not metadata.
        receiver = Receiver().start()
        try:
            create(custom, namespace, "lifecyclehandlers", handler(
                "meta", "web", http("http://169.254.169.254/latest/meta-data/"), events=["up"]))
            create(custom, namespace, "lifecyclehandlers", handler(
                "local", "web", http(f"http://localhost:{receiver.port}/secret-500/{namespace}"), events=["up"],
                retry={"maxAttempts": 2, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1}))
            ready = wait_for(lambda: (c := condition(get(custom, namespace, "lifecyclehandlers", "meta"), "Ready"))
                             .get("status") == "False" and c, 20, "meta handler refused")
            assert ready["reason"] == "URLNotAllowed" and "cloud metadata" in ready["message"]
            status = wait_for(lambda: (s := handler_status(custom, namespace, "local")).get("deadLettered") and s,
                              20, "local handler dead-lettered")
            error = status["lastInvocation"]["error"]
            assert "loopback" in error and "--http-allowed-cidrs" in error, error  # localhost: 127.0.0.1 or ::1
            assert status["lastInvocation"]["attempts"] == 1  # refused, not retried
            assert receiver.on(f"/secret-500/{namespace}") == []
        finally:
            receiver.stop()
    finally:
        operator.stop()
