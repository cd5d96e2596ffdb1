"""Real rollouts through a real kubelet, counted honestly.

HAProxy runs with `retries 0` and no redispatch, so a request sent to a server that is already
gone fails; its own per-server error counters are read all along and asserted zero as well as
the client's count. The termination race (the kubelet's SIGTERM and the operator's drain start
at the same moment) is measured: the pods use `preStop: sleep`, the recommendation in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from typing import Any

from kubernetes import client
from test_operator_deployed import active

from poolkeeper_dev import Cluster
from poolkeeper_dev.deploy import Deployed, operator_pod_ips
from poolkeeper_dev.deploy import readyz as pod_readyz
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.node import NODE_NAME
from poolkeeper_dev.rollout import (
    ErrorWatch,
    server_status,
    show_stat,
    time_to_drain,
    wait_rollout,
    web_deployment,
    web_pool,
)
from poolkeeper_dev.traffic import LoadGenerator
from support.kube import wait_for
from support.pools import load_balancer

ROLLOUTS = 3
RATE = 200.0


def setup_pool(cluster: Cluster, node_api: client.ApiClient, haproxy: HAProxyProcess, namespace: str,
               replicas: int = 3, app: str = "web", **deployment: Any) -> None:
    """Deployment `app` (pods labelled app=`app`) behind TargetPool `web` in HAProxy backend `web`."""
    load_balancer(client.CustomObjectsApi(node_api), f"lb-{namespace}", haproxy.plain_tcp_endpoint, ["web", "nodes"])
    for body in (web_deployment(app, pool="web", replicas=replicas, **deployment),
                 web_pool("web", app=app, lb=f"lb-{namespace}", backend="web")):
        cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    wait_for(lambda: active(node_api, namespace) == replicas, 150, f"{replicas} Active members")


def test_three_rollouts_drop_no_request(deployed_operator: Deployed, node_cluster: Cluster,
                                        node_api: client.ApiClient, node_namespace: str,
                                        honest_haproxy: HAProxyProcess) -> None:
    setup_pool(node_cluster, node_api, honest_haproxy, node_namespace)
    watch = ErrorWatch(honest_haproxy.plain_tcp_endpoint, "web").start()
    took = []
    with LoadGenerator(honest_haproxy.frontend_url("web"), connections=8, rate=RATE) as load:
        load.start(duration=600)
        for _ in range(ROLLOUTS):
            node_cluster.kubectl_run("rollout", "restart", "deployment/web", "-n", node_namespace)
            took.append(wait_rollout(node_cluster.kubectl_run, node_namespace, "web"))
        wait_for(lambda: active(node_api, node_namespace) == 3, 60, "3 Active members after the last rollout")
        report = load.stop()
    errors = watch.stop().errors()
    print(f"\n{ROLLOUTS} rollouts ({', '.join(f'{t:.0f}s' for t in took)}) at {RATE:.0f} req/s: "
          f"{report.ok} served, {report.failed} failed; HAProxy {errors}; {watch.samples} counter samples, "
          f"{len(watch.servers)} servers seen")
    assert report.ok > RATE * sum(took) * 0.5, "the client sent far less than asked: the count proves nothing"
    assert len(watch.servers) >= 3 * (ROLLOUTS + 1), "not every pod generation went through HAProxy"
    assert report.failed == 0, report.failures
    assert errors == {"econ": 0, "eresp": 0, "wretr": 0, "wredis": 0}


def test_a_deleted_pod_is_drained_before_its_prestop_sleep_ends(
        deployed_operator: Deployed, node_cluster: Cluster, node_api: client.ApiClient,
        node_namespace: str, honest_haproxy: HAProxyProcess) -> None:
    setup_pool(node_cluster, node_api, honest_haproxy, node_namespace, replicas=2)
    core = client.CoreV1Api(node_api)
    pod = core.list_namespaced_pod(node_namespace, label_selector="app=web").items[0]
    address = pod.status.pod_ip
    endpoint = honest_haproxy.plain_tcp_endpoint
    assert server_status(endpoint, "web", address) == "UP"
    drained, status = time_to_drain(endpoint, "web", address,
                                    lambda: core.delete_namespaced_pod(pod.metadata.name, node_namespace))
    print(f"\npod delete request -> server {status} in HAProxy: {drained * 1000:.0f} ms "
          f"(the container's preStop sleep is 5 s)")
    assert status in ("DRAIN", "MAINT", "GONE")
    assert drained < 2.0
    # The operator measures its side of the race too (watch event -> drain applied).
    leader = next(ip for ip in operator_pod_ips(node_cluster) if pod_readyz(ip) == "leading")
    with urllib.request.urlopen(f"http://{leader}:8080/metrics", timeout=3) as resp:
        metrics = resp.read().decode()
    count = next(line for line in metrics.splitlines()
                 if line.startswith("poolkeeper_termination_to_drain_seconds_count"))
    assert float(count.split()[-1]) >= 1


def test_the_readiness_gate_holds_a_rollout_while_the_lb_is_unreachable(
        deployed_operator: Deployed, node_cluster: Cluster, node_api: client.ApiClient,
        node_namespace: str, honest_haproxy: HAProxyProcess) -> None:
    setup_pool(node_cluster, node_api, honest_haproxy, node_namespace, replicas=2)
    core = client.CoreV1Api(node_api)
    old = {p.metadata.name for p in core.list_namespaced_pod(node_namespace, label_selector="app=web").items}
    honest_haproxy.stop()
    node_cluster.kubectl_run("rollout", "restart", "deployment/web", "-n", node_namespace)

    def new_pod_running() -> Any:
        pods = core.list_namespaced_pod(node_namespace, label_selector="app=web").items
        fresh = [p for p in pods if p.metadata.name not in old and p.status.phase == "Running"
                 and all(c.ready for c in p.status.container_statuses or [])]
        return fresh[0] if fresh else None

    fresh = wait_for(new_pod_running, 90, "the new pod's container to be ready")
    time.sleep(10)  # the gate would have opened by now if anything let it
    pods = {p.metadata.name: p for p in core.list_namespaced_pod(node_namespace, label_selector="app=web").items}
    gates = {c.type: c.status for c in pods[fresh.metadata.name].status.conditions}
    # Kubernetes counts a gate condition that is absent as False: the pod stays unready either way.
    assert gates.get("poolkeeper.dev/web") != "True" and gates["Ready"] == "False"
    assert gates["ContainersReady"] == "True"
    assert old <= set(pods), "an old pod went away while its replacement was not in the load balancer"
    assert all(pods[name].metadata.deletion_timestamp is None for name in old)

    honest_haproxy.start()
    wait_rollout(node_cluster.kubectl_run, node_namespace, "web", timeout=120)
    wait_for(lambda: active(node_api, node_namespace) == 2, 60, "2 Active members after the LB came back")


def test_kubectl_drain_drains_the_node_member_and_the_pods(
        deployed_operator: Deployed, node_cluster: Cluster, node_api: client.ApiClient,
        node_namespace: str, honest_haproxy: HAProxyProcess) -> None:
    # A label no other test's pods carry: drain evicts by selector across every namespace.
    app = f"drain-{node_namespace[-5:]}"
    setup_pool(node_cluster, node_api, honest_haproxy, node_namespace, replicas=2, app=app, pre_stop_sleep=10)
    custom = client.CustomObjectsApi(node_api)
    custom.create_namespaced_custom_object("poolkeeper.dev", "v1alpha1", node_namespace, "targetpools", {
        "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "TargetPool", "metadata": {"name": "nodes"},
        "spec": {"source": {"kind": "Node", "selector": {"matchLabels": {"kubernetes.io/hostname": NODE_NAME}}},
                 "port": 30080, "deregistrationDelaySeconds": 120, "backend": {"type": "HAProxy", "haproxy": {
                     "loadBalancerRef": {"name": f"lb-{node_namespace}"}, "backend": "nodes"}}}})

    def states(pool: str) -> list[str]:
        body = custom.get_namespaced_custom_object("poolkeeper.dev", "v1alpha1", node_namespace, "targetpools", pool)
        return sorted(m["state"] for m in (body.get("status") or {}).get("members") or [])

    wait_for(lambda: states("nodes") == ["Active"], 30, "the node's member Active")
    drain = subprocess.Popen(
        [str(node_cluster.kubectl), "drain", NODE_NAME, f"--pod-selector=app={app}", "--timeout=120s"],
        env={**os.environ, "KUBECONFIG": str(node_cluster.kubeconfig)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        # Draining, or already gone: with no connection open the drain completes at once.
        wait_for(lambda: states("nodes") in (["Draining"], []), 30, "the cordoned node's member to drain")
        assert not [r for r in show_stat(honest_haproxy.plain_tcp_endpoint)
                    if r["pxname"] == "nodes" and r["svname"].startswith("pk-") and r["status"] == "UP"]
        # Evicted pods drain (their preStop sleep keeps them serving meanwhile), then leave the pool.
        wait_for(lambda: ("Draining" in states("web") and "Active" not in states("web"))
                 or not states("web"), 30, "the evicted pods to drain")
        output, _ = drain.communicate(timeout=150)
        assert drain.returncode == 0, output
        assert "Active" not in states("web")
    finally:
        drain.kill()
        node_cluster.kubectl_run("uncordon", NODE_NAME)
    wait_for(lambda: states("nodes") == ["Active"], 30, "the node's member Active again once uncordoned")
    wait_for(lambda: active(node_api, node_namespace) == 2, 120, "the pods back once the node is uncordoned")
