"""The operator as users run it: its image, `kubectl apply -k manifests/`, two replicas with leader
election, running as its ServiceAccount and reaching the API server through the `kubernetes`
Service; it drives an HAProxy it reaches from the pod network."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from kubernetes import client

from poolkeeper_dev import Cluster
from poolkeeper_dev.deploy import Deployed
from poolkeeper_dev.deploy import readyz as pod_readyz
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.rollout import web_deployment, web_pool
from support.kube import condition, wait_for
from support.pools import load_balancer

SYSTEM = "poolkeeper-system"


def operator_pods(core: client.CoreV1Api) -> list[Any]:
    return [p for p in core.list_namespaced_pod(SYSTEM, label_selector="app.kubernetes.io/name=poolkeeper").items
            if p.metadata.deletion_timestamp is None]


def readyz(pod: Any) -> str:
    return pod_readyz(pod.status.pod_ip)


def leader_identity(node_api: client.ApiClient) -> str:
    lease = client.CoordinationV1Api(node_api).read_namespaced_lease("poolkeeper", SYSTEM)
    return str(lease.spec.holder_identity or "")


def pool_with_servers(node_cluster: Cluster, node_api: client.ApiClient, haproxy: HAProxyProcess, namespace: str,
                      lb: str, replicas: int) -> None:
    """A testweb Deployment behind a TargetPool on `haproxy`, applied with kubectl, until every member is Active."""
    load_balancer(client.CustomObjectsApi(node_api), lb, haproxy.plain_tcp_endpoint, ["web", "nodes"])
    for body in (web_deployment("web", pool="web", replicas=replicas),
                 web_pool("web", app="web", lb=lb, backend="web")):
        node_cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def active(node_api: client.ApiClient, namespace: str) -> int:
    pool = client.CustomObjectsApi(node_api).get_namespaced_custom_object(
        "poolkeeper.dev", "v1alpha1", namespace, "targetpools", "web")
    return int((pool.get("status") or {}).get("active") or 0) if condition(pool, "Ready").get("status") == "True" \
        else 0


def test_both_replicas_are_ready_and_one_leads(deployed_operator: Deployed, node_api: client.ApiClient) -> None:
    core = client.CoreV1Api(node_api)
    pods = operator_pods(core)
    assert len(pods) == 2
    assert all(c.ready for p in pods for c in p.status.container_statuses)
    assert all(p.spec.service_account_name == "poolkeeper" for p in pods)
    assert all(p.spec.containers[0].image == "ghcr.io/poolkeeper/poolkeeper:0.1.0" for p in pods)
    wait_for(lambda: sorted(readyz(p) for p in pods) == ["leading", "standing by"], 60,
             "one replica to lead and the other to stand by")
    leader = next(p for p in pods if readyz(p) == "leading")
    assert leader_identity(node_api).startswith(leader.metadata.name)
    deployment = client.AppsV1Api(node_api).read_namespaced_deployment("poolkeeper", SYSTEM)
    assert deployment.status.available_replicas == 2
    print(f"\noperator image built and loaded in {deployed_operator.image_seconds:.1f}s; after "
          f"`kubectl apply -k manifests/` both replicas Ready in {deployed_operator.ready_seconds:.1f}s, "
          f"one leading in {deployed_operator.leading_seconds:.1f}s")


def test_the_in_cluster_operator_drives_haproxy_and_a_standby_takes_over(
        deployed_operator: Deployed, node_cluster: Cluster, node_api: client.ApiClient,
        node_namespace: str, honest_haproxy: HAProxyProcess) -> None:
    core = client.CoreV1Api(node_api)
    lb = f"lb-{node_namespace}"
    pool_with_servers(node_cluster, node_api, honest_haproxy, node_namespace, lb, replicas=2)
    wait_for(lambda: active(node_api, node_namespace) == 2, 120, "2 Active members")
    with urllib.request.urlopen(honest_haproxy.frontend_url("web"), timeout=3) as resp:
        assert resp.status == 200

    leader = next(p for p in operator_pods(core) if readyz(p) == "leading")
    started = time.monotonic()
    node_cluster.kubectl_run("delete", "pod", "-n", SYSTEM, leader.metadata.name, "--grace-period=0", "--force")
    new_leader = wait_for(lambda: (who := leader_identity(node_api)) and not who.startswith(leader.metadata.name)
                          and who, 60, "another replica to take the Lease")
    took_lease = time.monotonic() - started
    # The new leader acts: a scale-up reaches HAProxy through it.
    node_cluster.kubectl_run("scale", "deployment/web", "-n", node_namespace, "--replicas=3")
    wait_for(lambda: active(node_api, node_namespace) == 3, 120, "the new leader to register the third pod")
    acting = time.monotonic() - started
    print(f"\nleader force-deleted -> {new_leader} holds the Lease in {took_lease:.1f}s; "
          f"acting (third pod Active) {acting:.1f}s after the delete")
    assert took_lease < 30
