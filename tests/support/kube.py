"""Small helpers for tests that talk to the API server."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from poolkeeper_dev import Cluster
from poolkeeper_dev.operator_process import OperatorProcess, ensure_system_namespace

REPO = Path(__file__).resolve().parents[2]

GROUP, VERSION = "poolkeeper.dev", "v1alpha1"
T = TypeVar("T")


def namespace_name(prefix: str, test_name: str, length: int = 30) -> str:
    """A namespace name that says which test made it, unique per run."""
    name = f"{prefix}-{test_name[:length].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    return "".join(c for c in name if c.isalnum() or c == "-")


@contextmanager
def api_client_for(kubeconfig: Path) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, message: str = "condition",
             interval: float = 0.1) -> T:
    """Poll a test-side predicate (never the operator's way of working) until it is truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (ApiException, KeyError, IndexError, TypeError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")


def create(custom: client.CustomObjectsApi, namespace: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
    body = {"apiVersion": f"{GROUP}/{VERSION}", **body}
    return dict(custom.create_namespaced_custom_object(group=GROUP, version=VERSION, namespace=namespace,
                                                       plural=plural, body=body))


def get(custom: client.CustomObjectsApi, namespace: str, plural: str, name: str) -> dict[str, Any]:
    return dict(custom.get_namespaced_custom_object(group=GROUP, version=VERSION, namespace=namespace,
                                                    plural=plural, name=name))


def delete(custom: client.CustomObjectsApi, namespace: str, plural: str, name: str) -> None:
    custom.delete_namespaced_custom_object(group=GROUP, version=VERSION, namespace=namespace, plural=plural, name=name)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def pod_pool(name: str, *, app: str, port: int = 8080, backend: dict[str, Any], delay: int = 30,
             **extra: Any) -> dict[str, Any]:
    return {"kind": "TargetPool", "metadata": {"name": name},
            "spec": {"source": {"kind": "Pod", "selector": {"matchLabels": {"app": app}}}, "port": port,
                     "backend": backend, "deregistrationDelaySeconds": delay, **extra}}


def slice_backend(service: str) -> dict[str, Any]:
    return {"type": "EndpointSlice", "endpointSlice": {"serviceName": service}}


def selectorless_service(core: client.CoreV1Api, namespace: str, name: str, port: int = 8080) -> None:
    core.create_namespaced_service(namespace=namespace, body={
        "metadata": {"name": name}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}]}})


def events_for(core: client.CoreV1Api, namespace: str, name: str) -> list[tuple[str, str]]:
    items = core.list_namespaced_event(namespace=namespace).items
    return [(e.reason, e.message) for e in items if e.involved_object.name == name]


def token_kubeconfig(cluster: Cluster, folder: Path, account: str, namespace: str) -> Path:
    """A kubeconfig that acts as ServiceAccount `namespace/account` (a token from `kubectl create token`)."""
    token = cluster.kubectl_run("create", "token", account, "-n", namespace, "--duration=24h").stdout.strip()
    config_text = json.loads(cluster.kubeconfig.read_text())
    config_text["users"] = [{"name": account, "user": {"token": token}}]
    config_text["contexts"][0]["context"]["user"] = account
    path = folder / f"{namespace}-{account}.kubeconfig"
    path.write_text(json.dumps(config_text))
    return path


@contextmanager
def control_plane(root: Path, what: str = "the local control plane") -> Iterator[Cluster]:
    """A control plane of the tests' own in `root`, with poolkeeper's CRDs established and its
    namespace made; stopped afterwards. One that cannot start FAILS the test (never skips)."""
    try:
        started = Cluster(root).up()
    except Exception as exc:
        pytest.fail(f"{what} could not start: {exc}", pytrace=False)
    try:
        install_crds(started)
        ensure_system_namespace(started)
        yield started
    finally:
        started.down()


def install_crds(cluster: Cluster) -> None:
    cluster.kubectl_run("apply", "--server-side", "-f", str(REPO / "manifests" / "crds"))
    cluster.kubectl_run("wait", "--for=condition=Established", "crd", "-l", "app.kubernetes.io/part-of=poolkeeper",
                        "--timeout=60s")


def started(proc: OperatorProcess, what: str = "the operator") -> OperatorProcess:
    """`proc` started and ready, or the test FAILS with its log tail."""
    try:
        return proc.start()
    except RuntimeError as exc:
        pytest.fail(f"{what} could not start: {exc}", pytrace=False)
