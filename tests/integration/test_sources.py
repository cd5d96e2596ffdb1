"""Instances from Nodes and from Instance custom resources (heartbeats), and label changes."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

from kubernetes import client
from test_operator_endpointslice import endpoints

from poolkeeper.agent import report_heartbeat
from poolkeeper_dev import Cluster
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.standin_kubelet import FakeKubelet
from support.kube import condition, create, get, pod_pool, selectorless_service, slice_backend, wait_for


def test_instances_follow_state_and_heartbeats(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        api_client: client.ApiClient, cluster: Cluster) -> None:
    selectorless_service(core, namespace, "vms")
    create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "vms"}, "spec": {
        "source": {"kind": "Instance", "selector": {"matchLabels": {"group": "vms"}}}, "port": 8080,
        "backend": slice_backend("vms"), "deregistrationDelaySeconds": 60}})
    for name, address, timeout in (("vm-1", "192.0.2.101", 5), ("vm-2", "192.0.2.102", None)):
        spec = {"address": address, **({"heartbeatTimeoutSeconds": timeout} if timeout else {})}
        create(custom, namespace, "instances", {"kind": "Instance", "metadata": {"name": name,
                                                "labels": {"group": "vms"}}, "spec": spec})
    # pending: not up yet. Wait until the operator has reconciled the pool, then look.
    wait_for(lambda: condition(get(custom, namespace, "targetpools", "vms"), "Ready").get("reason") == "NoMembers",
             20, "pool reconciled with no members")
    assert not endpoints(api_client, namespace, "vms")
    # the agent CLI, as a machine would run it
    env = {"KUBECONFIG": str(cluster.kubeconfig), "PATH": "/usr/bin:/bin"}
    beat = time.monotonic()
    cli = subprocess.run([sys.executable, "-m", "poolkeeper", "instance", "heartbeat", "vm-1", "-n", namespace],
                         capture_output=True, text=True, env=env, check=False)
    assert cli.returncode == 0, cli.stderr
    assert "state=running" in cli.stdout
    report_heartbeat("vm-2", namespace=namespace, state="running", kubeconfig=str(cluster.kubeconfig))
    eps = wait_for(lambda: (e := endpoints(api_client, namespace, "vms")) and len(e) == 2 and e, 20, "both up")
    assert all(c.ready for c in eps.values())
    out = cluster.kubectl_run("get", "inst", "-n", namespace).stdout
    assert out.splitlines()[0].split() == ["NAME", "ADDRESS", "STATE", "LAST-HEARTBEAT", "AGE"]
    # vm-1 stops sending heartbeats: it goes down after 5 s by the operator's own clock
    wait_for(lambda: "192.0.2.101" not in endpoints(api_client, namespace, "vms"), 15, "heartbeat lost")
    assert 5.0 <= time.monotonic() - beat < 12.0
    # a fresh heartbeat brings it back
    report_heartbeat("vm-1", namespace=namespace, kubeconfig=str(cluster.kubeconfig))
    wait_for(lambda: "192.0.2.101" in endpoints(api_client, namespace, "vms"), 10, "back after a heartbeat")
    # stopping -> draining (serving, terminating); stopped -> removed
    report_heartbeat("vm-2", namespace=namespace, state="stopping", kubeconfig=str(cluster.kubeconfig))
    cond = wait_for(lambda: (c := endpoints(api_client, namespace, "vms").get("192.0.2.102")) and c.terminating
                    and c, 10, "draining")
    assert cond.serving and not cond.ready
    report_heartbeat("vm-2", namespace=namespace, state="stopped", kubeconfig=str(cluster.kubeconfig))
    wait_for(lambda: "192.0.2.102" not in endpoints(api_client, namespace, "vms"), 10, "stopped removed")


def test_nodes_cordon_and_exclusion(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        api_client: client.ApiClient, kubelet: FakeKubelet) -> None:
    role = f"edge-{uuid.uuid4().hex[:5]}"
    names = [f"{role}-{i}" for i in range(3)]
    for i, name in enumerate(names):
        kubelet.ensure_node(name, f"198.51.100.{10 + i}", labels={"role": role})
    selectorless_service(core, namespace, "nodes")
    create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "nodes"}, "spec": {
        "source": {"kind": "Node", "selector": {"matchLabels": {"role": role}}}, "port": 30080,
        "backend": slice_backend("nodes"), "deregistrationDelaySeconds": 60}})
    eps = wait_for(lambda: (e := endpoints(api_client, namespace, "nodes")) and len(e) == 3 and e, 20, "3 nodes")
    assert all(c.ready for c in eps.values())
    core.patch_node(name=names[0], body={"spec": {"unschedulable": True}})  # cordon: draining
    wait_for(lambda: (c := endpoints(api_client, namespace, "nodes").get("198.51.100.10")) and c.terminating,
             10, "cordoned node draining")
    core.patch_node(name=names[1], body={"metadata": {"labels": {
        "node.kubernetes.io/exclude-from-external-load-balancers": "true"}}})
    wait_for(lambda: "198.51.100.11" not in endpoints(api_client, namespace, "nodes"), 10, "excluded node removed")
    kubelet.set_node_status(names[2], "198.51.100.12", ready=False)
    wait_for(lambda: "198.51.100.12" not in endpoints(api_client, namespace, "nodes"), 10, "NotReady node removed")
    for name in names:
        core.delete_node(name=name)


def test_relabelled_pod_leaves_and_reused_ip_is_a_new_member(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        api_client: client.ApiClient, kubelet: FakeKubelet) -> None:
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web")))
    kubelet.create_pod(namespace, "a", {"app": "web"})
    kubelet.set_ready(namespace, "a", "192.0.2.200")
    first = wait_for(lambda: (m := {x["instance"]: x for x in get(custom, namespace, "targetpools", "web")
                                    .get("status", {}).get("members", [])}) and m.get(f"Pod/{namespace}/a"),
                     20, "a active")
    assert first["address"] == "192.0.2.200"
    core.patch_namespaced_pod(name="a", namespace=namespace, body={"metadata": {"labels": {"app": "other"}}})
    wait_for(lambda: "192.0.2.200" not in endpoints(api_client, namespace, "web"), 10, "relabelled pod removed")
    # the IP comes back on a new pod: a different member, not confused with the old one
    kubelet.finish_termination(namespace, "a")
    kubelet.create_pod(namespace, "b", {"app": "web"})
    kubelet.set_ready(namespace, "b", "192.0.2.200")
    eps = wait_for(lambda: endpoints(api_client, namespace, "web").get("192.0.2.200"), 10, "b registered")
    assert eps.ready
    slices = client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice(namespace=namespace).items
    refs = [ep.target_ref.name for s in slices for ep in s.endpoints or [] if ep.target_ref]
    assert "b" in refs and "a" not in refs
    wait_for(lambda: condition(get(custom, namespace, "targetpools", "web"), "Ready").get("status") == "True",
             10, "pool Ready")
