"""Tenants against the operator's privileges and its shared capacity: what the shipped
ServiceAccount may do, what a handler function can reach, who may select Nodes, and that one
namespace's slow receivers and functions do not hold up another's deliveries."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from test_lifecycle import handler, handler_status, http, lines, python, recorder_module, write_handler
from test_operator_endpointslice import slices

from poolkeeper_dev import Cluster
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.standin_kubelet import FakeKubelet
from support.kube import (
    condition,
    create,
    events_for,
    get,
    namespace_name,
    pod_pool,
    selectorless_service,
    slice_backend,
    wait_for,
)
from support.receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
OPTIONAL_RBAC = REPO / "manifests" / "optional" / "annotate-handler-rbac.yaml"
AS_OPERATOR = "--as=system:serviceaccount:poolkeeper-system:poolkeeper"
LOOPBACK_HANDLERS = ("--http-allowed-cidrs", "127.0.0.0/8")


def can_i(cluster: Cluster, *args: str) -> bool:
    out = cluster.kubectl_run("auth", "can-i", *args, AS_OPERATOR, check=False)
    assert out.stdout.strip() in ("yes", "no"), (args, out.stdout, out.stderr)
    return out.stdout.strip() == "yes"


@pytest.fixture()
def own_operator(running_operator: OperatorProcess, tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    """Stop the session's operator; the test starts its own (as the shipped ServiceAccount)."""
    running_operator.kill()
    started: list[OperatorProcess] = []
    yield started
    for proc in started:
        proc.stop()


def start_operator(session: OperatorProcess, started: list[OperatorProcess], folder: Path,
                   *extra: str) -> OperatorProcess:
    proc = OperatorProcess(session.kubeconfig, folder, handlers_dir=session.handlers_dir, extra_args=extra)
    started.append(proc)
    return proc.start()


@pytest.fixture()
def second_namespace(core: client.CoreV1Api, request: pytest.FixtureRequest) -> Iterator[str]:
    name = namespace_name("u", request.node.name)
    core.create_namespace(body={"metadata": {"name": name, "labels": {"poolkeeper.dev/test": "true"}}})
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name=name)


# ---------------------------------------------------------------- RBAC
def test_the_shipped_service_account_can_not_patch_pods_nodes_or_instances(
        running_operator: OperatorProcess, cluster: Cluster, namespace: str) -> None:
    cluster.kubectl_run("delete", "-f", str(OPTIONAL_RBAC), "--ignore-not-found")
    cluster.kubectl_run("apply", "-f", str(REPO / "manifests" / "rbac.yaml"))
    for verb, what in (("patch", "pods"), ("update", "pods"), ("patch", "nodes"), ("patch", "instances.poolkeeper.dev"),
                       ("delete", "pods"), ("get", "configmaps"), ("create", "leases"), ("patch", "leases"),
                       ("patch", "endpointslices.discovery.k8s.io")):
        assert not can_i(cluster, verb, what, "-n", namespace), (verb, what)
    assert not can_i(cluster, "patch", "nodes")
    assert not can_i(cluster, "create", "leases", "--all-namespaces")
    # What the operator needs stays: readiness gates (pods/status), its Lease, EndpointSlices, Events.
    assert can_i(cluster, "patch", "pods", "--subresource=status", "-n", namespace)
    for verb in ("get", "create", "update"):
        assert can_i(cluster, verb, "leases", "-n", "poolkeeper-system"), verb
    for verb in ("create", "update", "delete"):
        assert can_i(cluster, verb, "endpointslices.discovery.k8s.io", "-n", namespace), verb
    assert can_i(cluster, "create", "events", "-n", namespace)
    assert can_i(cluster, "patch", "targetpools.poolkeeper.dev", "-n", namespace)  # its finalizer
    # The optional file adds exactly what annotate.handle needs, and deleting it takes it away.
    cluster.kubectl_run("apply", "-f", str(OPTIONAL_RBAC))
    try:
        for what in ("pods", "instances.poolkeeper.dev"):
            assert can_i(cluster, "patch", what, "-n", namespace), what
        assert can_i(cluster, "patch", "nodes")
        assert not can_i(cluster, "delete", "pods", "-n", namespace)
    finally:
        cluster.kubectl_run("delete", "-f", str(OPTIONAL_RBAC))
    assert not can_i(cluster, "patch", "pods", "-n", namespace)


# ---------------------------------------------------------------- handler credentials
PROBE = '''
import json, os, time
def handle(event, context):
    found = {{"env": {{k: v for k, v in os.environ.items()
                     if any(w in k.upper() for w in ("KUBE", "SERVICEACCOUNT", "TOKEN", "SECRET"))}},
             "default_token": os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"),
             "env_text": "\\n".join(f"{{k}}={{v}}" for k, v in os.environ.items())}}
    from kubernetes import client, config
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        found["incluster"] = "loaded"
    except Exception as exc:
        found["incluster"] = type(exc).__name__
    try:
        config.load_kube_config(client_configuration=configuration)
        found["kubeconfig"] = configuration.host
    except Exception as exc:
        found["kubeconfig"] = type(exc).__name__ + ": " + str(exc)[:200]
    with open({out!r}, "a") as f:
        f.write(json.dumps({{"subject": event["subject"], **found}}) + "\\n")
    return {{"probed": True}}
'''


def test_handler_functions_get_no_credentials_unless_granted_and_annotate_then_works(
        running_operator: OperatorProcess, own_operator: list[OperatorProcess], namespace: str,
        core: client.CoreV1Api, custom: client.CustomObjectsApi, kubelet: FakeKubelet, cluster: Cluster,
        tmp_path: Path) -> None:
    session = running_operator
    handlers_dir = session.handlers_dir
    out = tmp_path / "probe.jsonl"
    module = f"probe_{uuid.uuid4().hex[:6]}"
    write_handler(handlers_dir, module, PROBE.format(out=str(out)))
    token = json.loads(Path(session.kubeconfig).read_text())["users"][0]["user"]["token"]

    # As shipped: no --handler-credentials.
    operator = start_operator(session, own_operator, tmp_path / "plain", *LOOPBACK_HANDLERS)
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web"), delay=1))
    create(custom, namespace, "lifecyclehandlers", handler("probe", "web", python(f"{module}.handle"), events=["up"]))
    create(custom, namespace, "lifecyclehandlers", handler(
        "stamp", "web", python("annotate.handle"), events=["up"], retry={"maxAttempts": 1}))
    for name in ("probe", "stamp"):
        wait_for(lambda n=name: condition(get(custom, namespace, "lifecyclehandlers", n),  # type: ignore[misc]
                                          "Ready").get("status") == "True", 20, f"{name} Ready")
    kubelet.create_pod(namespace, "web-0", {"app": "web"})
    kubelet.set_ready(namespace, "web-0", "198.51.100.20")
    (found,) = wait_for(lambda: lines(out), 20, "the probe's report")
    assert found["env"] == {"KUBECONFIG": "/dev/null"}, found["env"]
    assert not found["default_token"]
    assert found["incluster"] == "ConfigException"
    assert found["kubeconfig"].startswith("ConfigException"), found["kubeconfig"]
    assert str(session.kubeconfig) not in found["env_text"] and token not in found["env_text"]
    status = wait_for(lambda: (s := handler_status(custom, namespace, "stamp")).get("deadLettered") and s, 20,
                      "annotate failed without credentials")
    assert "ConfigException" in status["lastInvocation"]["error"], status["lastInvocation"]
    pod = core.read_namespaced_pod(name="web-0", namespace=namespace)
    assert "poolkeeper.dev/last-transition" not in (pod.metadata.annotations or {})
    operator.stop()

    # Granted: the optional RBAC applied and --handler-credentials=operator.
    cluster.kubectl_run("apply", "-f", str(OPTIONAL_RBAC))
    try:
        start_operator(session, own_operator, tmp_path / "granted", *LOOPBACK_HANDLERS,
                       "--handler-credentials", "operator")
        kubelet.create_pod(namespace, "web-1", {"app": "web"})
        kubelet.set_ready(namespace, "web-1", "198.51.100.21")
        note = wait_for(lambda: (core.read_namespaced_pod(name="web-1", namespace=namespace).metadata.annotations
                                 or {}).get("poolkeeper.dev/last-transition"), 20, "annotation")
        assert json.loads(note)["type"].endswith(".up")
        granted = wait_for(lambda: [r for r in lines(out) if r["subject"].endswith("/web-1")], 20, "second report")
        assert granted[0]["env"] == {"KUBECONFIG": str(session.kubeconfig)}
    finally:
        cluster.kubectl_run("delete", "-f", str(OPTIONAL_RBAC))


# ---------------------------------------------------------------- Node sources
def test_node_sources_only_in_the_namespaces_the_admin_allows(
        running_operator: OperatorProcess, own_operator: list[OperatorProcess], namespace: str,
        core: client.CoreV1Api, custom: client.CustomObjectsApi, api_client: client.ApiClient,
        tmp_path: Path) -> None:
    start_operator(running_operator, own_operator, tmp_path / "nodes", "--endpointslice-allow-external-sources",
                   "--node-source-namespaces", "poolkeeper.dev/node-sources=allowed")
    selectorless_service(core, namespace, "nodes")
    create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "nodes"}, "spec": {
        "source": {"kind": "Node"}, "port": 30080, "backend": slice_backend("nodes")}})
    synced = wait_for(lambda: (c := condition(get(custom, namespace, "targetpools", "nodes"), "Synced"))
                      .get("status") == "False" and c, 20, "refused")
    assert synced["reason"] == "NodeSourceNotAllowed"
    assert "--node-source-namespaces=poolkeeper.dev/node-sources=allowed" in synced["message"]
    wait_for(lambda: any(r == "NodeSourceNotAllowed" for r, _ in events_for(core, namespace, "nodes")), 10, "Event")
    time.sleep(1)
    assert slices(api_client, namespace, "nodes") == []  # touched nothing
    assert not (get(custom, namespace, "targetpools", "nodes").get("status") or {}).get("members")
    # The admin allows the namespace: the pool syncs (every Node of the cluster becomes a member).
    core.patch_namespace(name=namespace, body={"metadata": {"labels": {"poolkeeper.dev/node-sources": "allowed"}}})
    wait_for(lambda: condition(get(custom, namespace, "targetpools", "nodes"), "Synced").get("status") == "True",
             20, "synced once allowed")
    wait_for(lambda: (get(custom, namespace, "targetpools", "nodes").get("status") or {}).get("members"), 20,
             "the Nodes as members")


# ---------------------------------------------------------------- fairness
SLOW_FUNCTION = '''
import json, time
def handle(event, context):
    with open({out!r}, "a") as f:
        f.write(json.dumps({{"subject": event["subject"], "at": time.time()}}) + "\\n")
    time.sleep(6)
    return None
'''


def ready_pods(kubelet: FakeKubelet, namespace: str, count: int, base: int) -> None:
    for index in range(count):
        kubelet.create_pod(namespace, f"web-{index}", {"app": "web"})
        kubelet.set_ready(namespace, f"web-{index}", f"198.51.100.{base + index}")


def pool_with_handlers(core: client.CoreV1Api, custom: client.CustomObjectsApi, namespace: str,
                       url: str, function: str) -> None:
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web"), delay=1))
    for name, fn in (("hook", http(url)), ("fn", python(function))):
        create(custom, namespace, "lifecyclehandlers", handler(name, "web", fn, events=["up"], timeoutSeconds=10,
                                                               maxConcurrency=10, retry={"maxAttempts": 1}))
    for name in ("hook", "fn"):
        wait_for(lambda n=name: condition(get(custom, namespace, "lifecyclehandlers", n),  # type: ignore[misc]
                                          "Ready").get("status") == "True", 20, f"{namespace}/{name} Ready")


def test_a_namespace_with_slow_receivers_and_functions_does_not_delay_another(
        running_operator: OperatorProcess, own_operator: list[OperatorProcess], namespace: str,
        second_namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi, kubelet: FakeKubelet,
        tmp_path: Path) -> None:
    handlers_dir = running_operator.handlers_dir
    # Small totals, so the slow namespace could fill all of them: 4 connections, 2 function workers.
    start_operator(running_operator, own_operator, tmp_path / "fair", *LOOPBACK_HANDLERS, "--http-connections", "4",
                   "--http-namespace-concurrency", "2", "--function-workers", "2")
    receiver = Receiver().start()
    try:
        slow_calls, fast_calls = tmp_path / "slow.jsonl", tmp_path / "fast.jsonl"
        slow_module, fast_module = f"slow_{uuid.uuid4().hex[:6]}", f"fast_{uuid.uuid4().hex[:6]}"
        write_handler(handlers_dir, slow_module, SLOW_FUNCTION.format(out=str(slow_calls)))
        write_handler(handlers_dir, fast_module, recorder_module(fast_calls))
        slow, fast = namespace, second_namespace
        pool_with_handlers(core, custom, slow, receiver.url("/slow-"), f"{slow_module}.handle")  # 4 s each
        pool_with_handlers(core, custom, fast, receiver.url(f"/ok/{fast}"), f"{fast_module}.handle")

        ready_pods(kubelet, slow, 6, 30)  # 6 deliveries of each kind want to run at once
        wait_for(lambda: len(receiver.on("/slow-")) >= 2 and lines(slow_calls), 20, "slow deliveries")
        time.sleep(0.5)
        assert len(receiver.on("/slow-")) == 2  # its share of the connections, no more
        assert len(lines(slow_calls)) == 1  # its share of the workers: all but one

        started = time.time()
        ready_pods(kubelet, fast, 1, 60)
        got = wait_for(lambda: receiver.on(f"/ok/{fast}"), 10, "the other namespace's HTTP delivery")
        ran = wait_for(lambda: lines(fast_calls), 10, "the other namespace's function")
        http_delay, function_delay = got[0].at - started, ran[0]["at"] - started
        print(f"fairness: other namespace HTTP {http_delay * 1000:.0f} ms, function {function_delay * 1000:.0f} ms")
        assert http_delay < 2.0, http_delay  # the slow receiver answers after 4 s, the slow function after 6 s
        assert function_delay < 2.0, function_delay
        assert len(receiver.on("/slow-")) == 2  # still waiting for the first two
        # The slow namespace still gets everything delivered, two (and one) at a time.
        wait_for(lambda: len(receiver.on("/slow-")) >= 4, 15, "the slow namespace's next deliveries")
    finally:
        receiver.stop()
