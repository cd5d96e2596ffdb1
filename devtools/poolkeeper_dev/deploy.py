"""The operator deployed as users deploy it: its image in the node's containerd, `kubectl apply -k
manifests/`, two replicas with leader election. Shared by the node tests, the node demo and the
rollout benchmark."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from poolkeeper_dev.cluster import Cluster, ClusterError
from poolkeeper_dev.image import OPERATOR_IMAGE, build_images, load_images

SYSTEM_NAMESPACE = "poolkeeper-system"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Deployed:
    """Seconds: building and loading the image; from the apply to both replicas Ready; to one leading."""

    image_seconds: float
    ready_seconds: float
    leading_seconds: float


def readyz(pod_ip: str) -> str:
    """What an operator pod's /readyz says ("leading", "standing by"), or why it did not answer."""
    try:
        with urllib.request.urlopen(f"http://{pod_ip}:8080/readyz", timeout=2) as resp:
            return str(resp.read().decode())
    except OSError as exc:
        return f"unanswered: {exc}"


def operator_pod_ips(cluster: Cluster) -> list[str]:
    pods = json.loads(cluster.kubectl_run("get", "pods", "-n", SYSTEM_NAMESPACE, "-l",
                                          "app.kubernetes.io/name=poolkeeper", "-o", "json").stdout)["items"]
    return [p["status"].get("podIP", "") for p in pods if not p["metadata"].get("deletionTimestamp")]


def deploy_operator(cluster: Cluster, repo: Path = REPO, timeout: float = 180) -> Deployed:
    started = time.monotonic()
    archives = build_images(repo / ".images", log=False)
    load_images({OPERATOR_IMAGE: archives[OPERATOR_IMAGE]}, str(cluster.node_layout().containerd_address))
    applied = time.monotonic()
    cluster.kubectl_run("apply", "-k", str(repo / "manifests"))
    try:
        cluster.kubectl_run("-n", SYSTEM_NAMESPACE, "rollout", "status", "deployment/poolkeeper",
                            f"--timeout={int(timeout)}s")
    except ClusterError as exc:
        pods = cluster.kubectl_run("-n", SYSTEM_NAMESPACE, "describe", "pods", check=False).stdout
        raise ClusterError(f"the operator Deployment did not become available: {exc}\n{pods[-3000:]}") from exc
    ready = time.monotonic()
    while "leading" not in [readyz(ip) for ip in operator_pod_ips(cluster)]:
        if time.monotonic() - applied > timeout:
            logs = cluster.kubectl_run("-n", SYSTEM_NAMESPACE, "logs", "-l", "app.kubernetes.io/name=poolkeeper",
                                       "--tail=20", check=False).stdout
            raise ClusterError(f"no operator replica leads {timeout:.0f} s after the apply:\n{logs}")
        time.sleep(0.1)
    return Deployed(applied - started, ready - applied, time.monotonic() - applied)
