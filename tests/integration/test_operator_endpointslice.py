"""The operator against the real API server: EndpointSlice pools, readiness gates, status, kubectl."""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

from poolkeeper_dev import Cluster
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.standin_kubelet import FakeKubelet
from support.kube import (
    condition,
    create,
    delete,
    events_for,
    get,
    pod_pool,
    selectorless_service,
    slice_backend,
    wait_for,
)

SLICE_LABELS = "endpointslice.kubernetes.io/managed-by=poolkeeper.dev,kubernetes.io/service-name="


def slices(api_client: client.ApiClient, namespace: str, service: str) -> list[Any]:
    discovery = client.DiscoveryV1Api(api_client)
    return list(discovery.list_namespaced_endpoint_slice(namespace=namespace,
                                                         label_selector=SLICE_LABELS + service).items)


def endpoints(api_client: client.ApiClient, namespace: str, service: str) -> dict[str, Any]:
    """address -> conditions, across all of the pool's slices."""
    out = {}
    for slc in slices(api_client, namespace, service):
        for ep in slc.endpoints or []:
            out[ep.addresses[0]] = ep.conditions
    return out


def test_slices_follow_pods_with_conditions_and_limit(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, api_client: client.ApiClient) -> None:
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web"), delay=60))
    for i in range(120):
        kubelet.create_pod(namespace, f"web-{i}", {"app": "web"})
        kubelet.set_ready(namespace, f"web-{i}", f"192.0.2.{i + 1}")
    eps = wait_for(lambda: (e := endpoints(api_client, namespace, "web")) and len(e) == 120 and e,
                   30, "120 endpoints")
    assert all(c.ready and c.serving and not c.terminating for c in eps.values())
    sizes = sorted(len(s.endpoints) for s in slices(api_client, namespace, "web"))
    assert sizes == [20, 100], sizes
    one = slices(api_client, namespace, "web")[0]
    assert one.ports[0].name == "http" and one.ports[0].port == 8080
    assert one.metadata.labels["poolkeeper.dev/pool"] == "web"

    pool = wait_for(lambda: (p := get(custom, namespace, "targetpools", "web")) and
                    (p.get("status") or {}).get("active") == 120 and p, 20, "status counts")
    assert pool["status"]["desired"] == 120 and condition(pool, "Ready")["status"] == "True"
    assert condition(pool, "Synced")["status"] == "True"

    # graceful deletion: serving + terminating, not ready, until the pod is gone
    kubelet.delete_pod(namespace, "web-0")
    term = wait_for(lambda: (c := endpoints(api_client, namespace, "web").get("192.0.2.1")) and c.terminating and c,
                    20, "terminating endpoint")
    assert term.serving and not term.ready
    pool = wait_for(lambda: (p := get(custom, namespace, "targetpools", "web"))["status"]["draining"] == 1 and p,
                    20, "draining count")
    assert any(m["state"] == "Draining" for m in pool["status"]["members"])
    kubelet.finish_termination(namespace, "web-0")
    wait_for(lambda: "192.0.2.1" not in endpoints(api_client, namespace, "web"), 20, "endpoint removed")

    # a pod that stops being ready leaves at once (it serves nothing any more)
    kubelet.set_ready(namespace, "web-1", "192.0.2.2", ready=False)
    wait_for(lambda: "192.0.2.2" not in endpoints(api_client, namespace, "web"), 20, "not-ready endpoint removed")

    # scaling down below 100 removes the emptied slice
    for i in range(2, 100):
        kubelet.finish_termination(namespace, f"web-{i}")
    wait_for(lambda: len(slices(api_client, namespace, "web")) == 1, 30, "stale slice removed")

    # deleting the pool removes its slices (finalizer), then the pool itself
    delete(custom, namespace, "targetpools", "web")
    wait_for(lambda: not slices(api_client, namespace, "web"), 20, "slices deleted with the pool")
    wait_for(lambda: not [p for p in custom.list_namespaced_custom_object(
        group="poolkeeper.dev", version="v1alpha1", namespace=namespace, plural="targetpools")["items"]],
        20, "pool gone")


def test_readiness_gate_follows_registration(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, api_client: client.ApiClient) -> None:
    selectorless_service(core, namespace, "api")
    gate = "poolkeeper.dev/api"

    def gate_condition(pod: str) -> Any:
        obj = core.read_namespaced_pod(name=pod, namespace=namespace)
        return next((c for c in obj.status.conditions or [] if c.type == gate), None)

    kubelet.create_pod(namespace, "api-0", {"app": "api"}, gates=[gate])
    kubelet.set_ready(namespace, "api-0", "192.0.2.50", ready=False)
    create(custom, namespace, "targetpools", pod_pool("api", app="api", backend=slice_backend("api")))
    # not ready yet: gate False with a reason
    cond = wait_for(lambda: gate_condition("api-0"), 20, "gate condition written")
    assert cond.status == "False" and cond.reason == "NotRegistered"
    # containers ready: the pod registers (ContainersReady stands in for Ready), then the gate turns True
    kubelet.set_ready(namespace, "api-0", "192.0.2.50")
    cond = wait_for(lambda: (c := gate_condition("api-0")) and c.status == "True" and c, 20, "gate True")
    assert cond.reason == "Registered"
    assert kubelet.sync_ready(namespace, "api-0")  # the pod can now turn Ready
    # terminating: gate False, reason Draining
    kubelet.delete_pod(namespace, "api-0")
    cond = wait_for(lambda: (c := gate_condition("api-0")) and c.status == "False" and c, 20, "gate False")
    assert cond.reason == "Draining"
    # deleting the pool releases the gate
    delete(custom, namespace, "targetpools", "api")
    cond = wait_for(lambda: (c := gate_condition("api-0")) and c.reason == "PoolDeleted" and c, 20, "gate released")
    assert cond.status == "True"


def test_conflicts_selectors_and_service_problems(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, api_client: client.ApiClient, cluster: Cluster) -> None:
    selectorless_service(core, namespace, "shared")
    kubelet.create_pod(namespace, "a-0", {"app": "a"})
    kubelet.set_ready(namespace, "a-0", "192.0.2.60")
    create(custom, namespace, "targetpools", pod_pool("first", app="a", backend=slice_backend("shared")))
    wait_for(lambda: condition(get(custom, namespace, "targetpools", "first"), "Ready").get("status") == "True",
             20, "first pool ready")
    time.sleep(1.1)  # creationTimestamp has one-second resolution; ties are broken by uid
    create(custom, namespace, "targetpools", pod_pool("second", app="a", backend=slice_backend("shared")))
    synced = wait_for(lambda: (c := condition(get(custom, namespace, "targetpools", "second"), "Synced")) and
                      c.get("reason") == "Conflict" and c, 20, "Conflict on the younger pool")
    assert "first" in synced["message"] and synced["status"] == "False"
    assert condition(get(custom, namespace, "targetpools", "first"), "Ready")["status"] == "True"

    create(custom, namespace, "targetpools", pod_pool("nobody", app="nothing-matches",
                                                      backend=slice_backend("empty")))
    selectorless_service(core, namespace, "empty")
    ready = wait_for(lambda: (c := condition(get(custom, namespace, "targetpools", "nobody"), "Ready")) and
                     c.get("reason") == "NoMembers" and c, 20, "NoMembers")
    assert ready["status"] == "False"

    core.create_namespaced_service(namespace=namespace, body={
        "metadata": {"name": "managed"}, "spec": {"selector": {"app": "a"}, "ports": [{"port": 80}]}})
    create(custom, namespace, "targetpools", pod_pool("wrong", app="a", backend=slice_backend("managed")))
    synced = wait_for(lambda: (c := condition(get(custom, namespace, "targetpools", "wrong"), "Synced")) and
                      c.get("reason") == "ServiceHasSelector" and c, 20, "ServiceHasSelector")
    assert "selector" in synced["message"]
    create(custom, namespace, "targetpools", pod_pool("missing", app="a", backend=slice_backend("nope")))
    wait_for(lambda: condition(get(custom, namespace, "targetpools", "missing"), "Synced").get("reason")
             == "ServiceNotFound", 20, "ServiceNotFound")
    # the first pool kept working through all of that
    assert "192.0.2.60" in endpoints(api_client, namespace, "shared")

    # kubectl get / describe, with the real kubectl
    out = cluster.kubectl_run("get", "tp", "-n", namespace).stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "SOURCE", "BACKEND", "DESIRED", "ACTIVE", "DRAINING", "READY", "AGE"]
    first_row = next(line.split() for line in out.splitlines() if line.startswith("first "))
    assert first_row[1:7] == ["Pod", "EndpointSlice", "1", "1", "0", "True"]
    described = cluster.kubectl_run("describe", "tp", "second", "-n", namespace).stdout
    assert "Conflict" in described and "Events:" in described
    described_first = cluster.kubectl_run("describe", "tp", "first", "-n", namespace).stdout
    assert "Registered" in described_first
    assert any(reason == "Registered" for reason, _ in events_for(core, namespace, "first"))
