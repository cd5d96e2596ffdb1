"""The real node: registered and Ready through a real kubelet on cgroup v1, pods from images built
here serving HTTP on their pod addresses, Services programmed by kube-proxy."""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.request

from kubernetes import client

from poolkeeper_dev import Cluster
from poolkeeper_dev.node import NODE_IP, NODE_NAME, POD_CIDR, SERVICE_CIDR
from poolkeeper_dev.rollout import TESTWEB_IMAGE
from support.kube import wait_for


def get_text(url: str) -> str:
    """The body, or "" while nothing answers (so it can be polled)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


def test_the_node_is_ready_on_a_real_kubelet_and_containerd(node_cluster: Cluster) -> None:
    node = json.loads(node_cluster.kubectl_run("get", "node", NODE_NAME, "-o", "json").stdout)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.34.2"
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert {"type": "InternalIP", "address": NODE_IP} in node["status"]["addresses"]


def test_a_pod_runs_from_a_local_image_and_serves_on_its_pod_address(
        node_cluster: Cluster, node_namespace: str, node_api: client.ApiClient) -> None:
    core = client.CoreV1Api(node_api)
    core.create_namespaced_pod(node_namespace, {
        "metadata": {"name": "web-0", "labels": {"app": "web"}},
        "spec": {"containers": [{
            "name": "web", "image": TESTWEB_IMAGE, "imagePullPolicy": "Never",
            "env": [{"name": "POD_NAME", "value": "web-0"}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}}]}})

    pod = wait_for(lambda: (p := core.read_namespaced_pod("web-0", node_namespace)).status.pod_ip
                   and all(c.ready for c in p.status.container_statuses or [None]) and p, 90, "the pod Ready")
    assert pod.spec.node_name == NODE_NAME
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(POD_CIDR)
    assert "web-0" in get_text(f"http://{pod.status.pod_ip}:8080/")

    # A ClusterIP Service for it, programmed by kube-proxy, answers from this machine too.
    core.create_namespaced_service(node_namespace, {
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    service_ip = core.read_namespaced_service("web", node_namespace).spec.cluster_ip
    assert ipaddress.ip_address(service_ip) in ipaddress.ip_network(SERVICE_CIDR)
    assert "web-0" in wait_for(lambda: get_text(f"http://{service_ip}/"), 30, "kube-proxy to program the Service",
                               interval=0.5)


def test_up_again_on_a_running_node_cluster_changes_nothing(node_cluster: Cluster) -> None:
    pids = dict(node_cluster.state["pids"])
    started = time.monotonic()
    again = Cluster(node_cluster.root).up(node=True)
    assert time.monotonic() - started < 3
    assert again.state["pids"] == pids
    # A node-less request is served by the node cluster as it is.
    assert Cluster(node_cluster.root).up().state["pids"] == pids
