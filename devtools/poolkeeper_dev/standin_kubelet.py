"""A stand-in kubelet for a control plane without nodes: pods "come up" by status writes.

The dev control plane has no kubelet, so tests, the demo and benchmarks make a pod ready
exactly the way a kubelet would (podIP, phase Running, ContainersReady/Ready conditions
through the `status` subresource). Pods are bound to a Node object so deleting them leaves
them Terminating (serving, not ready) until `finish_termination` is called, like a real
graceful shutdown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubelet:
    def __init__(self, kubeconfig: str, node: str = "devnode-1", node_ip: str = "192.0.2.1") -> None:
        self.api_client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api(self.api_client)
        self.node = node
        self.node_ip = node_ip

    def ensure_node(self, name: str | None = None, ip: str | None = None, labels: Mapping[str, str] | None = None,
                    ready: bool = True) -> None:
        name, ip = name or self.node, ip or self.node_ip
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": dict(labels or {})}}
        try:
            self.core.create_node(body=cast(Any, body))
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.set_node_status(name, ip, ready)

    def set_node_status(self, name: str, ip: str, ready: bool = True) -> None:
        status = {"status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady",
                            "message": "stand-in kubelet", "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}],
        }}
        self.core.patch_node_status(name=name, body=status)

    def create_pod(self, namespace: str, name: str, labels: Mapping[str, str], *, gates: Sequence[str] = (),
                   port: int = 8080, grace: int = 30) -> dict[str, Any]:
        body = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "spec": {
                "nodeName": self.node, "terminationGracePeriodSeconds": grace,
                "readinessGates": [{"conditionType": g} for g in gates],
                "containers": [{"name": "app", "image": "example.invalid/app:1",
                                "ports": [{"containerPort": port}]}],
            },
        }
        created = self.core.create_namespaced_pod(namespace=namespace, body=cast(Any, body))
        return dict(created.to_dict())

    def set_ready(self, namespace: str, name: str, ip: str, ready: bool = True) -> None:
        """Write what a kubelet writes; Ready also needs every readiness gate True, as in a kubelet."""
        gates, current = self._gates_and_conditions(namespace, name)
        gates_ok = all(current.get(g) == "True" for g in gates)
        flag = "True" if ready else "False"
        conditions = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": _now()},
            {"type": "Ready", "status": "True" if ready and gates_ok else "False", "lastTransitionTime": _now()},
        ]
        self.core.patch_namespaced_pod_status(name=name, namespace=namespace, body={"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": self.node_ip,
            "conditions": conditions}})

    def _gates_and_conditions(self, namespace: str, name: str) -> tuple[list[str], dict[str, str]]:
        pod = self.core.read_namespaced_pod(name=name, namespace=namespace)
        gates = [g.condition_type for g in (pod.spec.readiness_gates if pod.spec else None) or []]
        conditions = (pod.status.conditions if pod.status else None) or []
        return gates, {c.type: c.status for c in conditions}

    def sync_ready(self, namespace: str, name: str) -> bool:
        """Recompute Ready from ContainersReady and the gates (a kubelet does this on gate changes)."""
        gates, current = self._gates_and_conditions(namespace, name)
        ready = current.get("ContainersReady") == "True" and all(current.get(g) == "True" for g in gates)
        if (current.get("Ready") == "True") != ready:
            self.core.patch_namespaced_pod_status(name=name, namespace=namespace, body={"status": {"conditions": [
                {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": _now()}]}})
        return ready

    def delete_pod(self, namespace: str, name: str) -> None:
        """Start a graceful deletion: the pod turns Terminating and keeps serving."""
        try:
            self.core.delete_namespaced_pod(name=name, namespace=namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def finish_termination(self, namespace: str, name: str) -> None:
        """The containers exited: the kubelet completes the deletion."""
        try:
            self.core.delete_namespaced_pod(name=name, namespace=namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def close(self) -> None:
        self.api_client.close()
