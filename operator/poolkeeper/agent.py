"""The agent side of an Instance: a machine reports its state and heartbeat.

Usable as `poolkeeper instance heartbeat NAME` or from Python:

    from poolkeeper.agent import report_heartbeat
    report_heartbeat("vm-1", namespace="default", state="running")

It only needs `patch` on `instances/status` (the `poolkeeper-instance-agent` ClusterRole).
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from typing import Any

from poolkeeper import GROUP, VERSION

STATES = ("pending", "running", "stopping", "stopped", "terminated")


class HeartbeatError(RuntimeError):
    """The heartbeat could not be written; the text says why."""


def report_heartbeat(name: str, *, namespace: str = "default", state: str = "running",
                     kubeconfig: str | None = None, message: str | None = None) -> dict[str, Any]:
    """Write status.state and status.lastHeartbeatTime (now, UTC) on the Instance."""
    if state not in STATES:
        raise HeartbeatError(f"state must be one of {', '.join(STATES)}")
    status: dict[str, Any] = {
        "state": state, "lastHeartbeatTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    if message is not None:
        status["message"] = message
    asyncio.run(_patch_status(name, namespace, status, kubeconfig))
    return status


async def _patch_status(name: str, namespace: str, status: dict[str, Any], kubeconfig: str | None) -> None:
    """The operator's own client and credentials (in-cluster first, then the kubeconfig)."""
    import kopf

    from poolkeeper.kube.api import MERGE, ApiError, KubeApi, resource_path
    from poolkeeper.kube.credentials import load_credentials

    before = os.environ.get("KUBECONFIG")
    try:
        info = load_credentials(kubeconfig)
    except (kopf.LoginError, OSError) as exc:
        raise HeartbeatError(f"no Kubernetes credentials: {exc}") from exc
    finally:  # load_credentials points KUBECONFIG at the file: a library call must not leave that behind
        if before is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = before
    api = KubeApi(info)
    try:
        path = resource_path(f"{GROUP}/{VERSION}", "instances", namespace, name, "status")
        await api.patch(path, {"status": status}, content_type=MERGE)
    except ApiError as exc:
        raise HeartbeatError(str(exc)) from exc
    finally:
        await api.close()
