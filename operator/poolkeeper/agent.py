"""The agent side of an Instance: a machine reports its state and heartbeat.

Usable as `poolkeeper instance heartbeat NAME` or from Python:

    from poolkeeper.agent import report_heartbeat
    report_heartbeat("vm-1", namespace="default", state="running")

It only needs `patch` on `instances/status` (the `poolkeeper-instance-agent` ClusterRole).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

STATES = ("pending", "running", "stopping", "stopped", "terminated")


class HeartbeatError(RuntimeError):
    """The heartbeat could not be written; the text says why."""


def report_heartbeat(name: str, *, namespace: str = "default", state: str = "running",
                     kubeconfig: str | None = None, message: str | None = None) -> dict[str, Any]:
    """Write status.state and status.lastHeartbeatTime (now, UTC) on the Instance."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    if state not in STATES:
        raise HeartbeatError(f"state must be one of {', '.join(STATES)}")
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        else:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
    except (ConfigException, OSError) as exc:
        raise HeartbeatError(f"no Kubernetes credentials: {exc}") from exc
    status: dict[str, Any] = {
        "state": state, "lastHeartbeatTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    if message is not None:
        status["message"] = message
    api = client.CustomObjectsApi()
    try:
        api.patch_namespaced_custom_object_status(
            group="poolkeeper.dev", version="v1alpha1", namespace=namespace, plural="instances", name=name,
            body={"status": status})
    except ApiException as exc:
        raise HeartbeatError(f"{exc.status} {exc.reason}: {exc.body}") from exc
    return status
