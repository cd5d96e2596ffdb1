"""LifecycleHandlers end to end: real operator, real API server, real worker processes, real HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.rollout import backend_errors
from poolkeeper_dev.standin_kubelet import FakeKubelet
from poolkeeper_dev.traffic import LoadGenerator
from support.kube import condition, create, events_for, get, pod_pool, selectorless_service, slice_backend, wait_for
from support.pools import (
    LOOPBACK_TARGETS,
    Workloads,
    ha_backend,
    haproxy_servers,
    load_balancer,
    members,
    servers_state,
)
from support.receiver import Receiver

ALL_EVENTS = ["up", "draining", "down", "registered", "deregistered"]
SYSTEM = "poolkeeper-system"  # the operator's namespace, where outboxes live
MAINT, DRAIN = 0x01, 0x08  # HAProxy srv_admin_state flags set by the runtime API: forced maintenance, drain


@pytest.fixture()
def own_lb(custom: client.CustomObjectsApi, tmp_path: Path) -> Iterator[tuple[HAProxyProcess, str]]:
    """A HAProxy of the test's own (backends web and api) and a LoadBalancer for it."""
    haproxy = HAProxyProcess(tmp_path / "haproxy", backends=("web", "api"))
    haproxy.start()
    lb = f"lb-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, lb, haproxy.admin_endpoint, ["web", "api"], allowedTargetCIDRs=LOOPBACK_TARGETS)
    yield haproxy, lb
    custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", name=lb)
    haproxy.stop()


@pytest.fixture()
def black_hole() -> Iterator[str]:
    """The URL of a receiver that accepts connections and never answers (a hung webhook)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)  # the kernel completes the handshakes; nobody ever reads or answers
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    sock.close()


def admin_states(haproxy: HAProxyProcess, backend: str) -> dict[str, int]:
    """server name -> srv_admin_state flags from `show servers state` (read by the test)."""
    out = {}
    for line in servers_state(haproxy, backend):
        parts = line.split()
        if len(parts) > 6 and parts[3].startswith("pk-"):
            out[parts[3]] = int(parts[6])
    return out


def reconciles(operator: OperatorProcess) -> float:
    """poolkeeper_reconciles_total, summed over results: grows with every reconcile the operator ran."""
    return sum(float(m.group(1)) for m in re.finditer(r'^poolkeeper_reconciles_total\{[^}]*\} (\S+)$',
                                                     operator.metrics(), re.MULTILINE))


def outbox_pending(core: client.CoreV1Api, handler_uid: str) -> list[dict[str, Any]] | None:
    """The pending deliveries in a handler's outbox ConfigMap (None while it was never written)."""
    try:
        cm = core.read_namespaced_config_map(name=f"poolkeeper-outbox-{handler_uid}", namespace=SYSTEM)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return list(json.loads((cm.data or {}).get("outbox.json") or "{}").get("pending") or [])


def flag_handler(handlers_dir: Path, flag: Path, result: str, extra: str = "") -> str:
    """A handler module whose `handle` waits until `flag` exists (the test decides when it succeeds).

    It touches `flag`.started when it begins, so a test can wait for the hook to be running.
    """
    module = f"flag_{uuid.uuid4().hex[:6]}"
    write_handler(handlers_dir, module, f'''
import os, time
def handle(event, context):
    open({str(flag) + ".started"!r}, "a").close()
    while not os.path.exists({str(flag)!r}):
        time.sleep(0.05)
    return {result!r}
{extra}''')
    return module


def handler(name: str, pool: str, function: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"kind": "LifecycleHandler", "metadata": {"name": name},
            "spec": {"poolRef": {"name": pool}, "events": spec.pop("events", ALL_EVENTS), "function": function,
                     **spec}}


def python(name: str) -> dict[str, Any]:
    return {"type": "Python", "python": {"handler": name}}


def http(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "HTTP", "http": {"url": url, **extra}}


def write_handler(handlers_dir: Path, module: str, body: str) -> None:
    (handlers_dir / f"{module}.py").write_text(body)


def recorder_module(out: Path) -> str:
    return f'''
import json, time
def handle(event, context):
    with open({str(out)!r}, "a") as f:
        f.write(json.dumps({{"event": event, "attempt": context.attempt, "function": context.function_name,
                            "remaining": context.remaining_time_ms(), "at": time.time()}}) + "\\n")
    return {{"seen": event["id"]}}
'''


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def handler_status(custom: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    return get(custom, namespace, "lifecyclehandlers", name).get("status") or {}


def test_python_handler_gets_cloudevents_for_every_transition(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, handlers_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    module = f"rec_{uuid.uuid4().hex[:6]}"
    write_handler(handlers_dir, module, recorder_module(out))
    selectorless_service(core, namespace, "web")
    pool = create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web"), delay=60))
    lh = create(custom, namespace, "lifecyclehandlers", handler("rec", "web", python(f"{module}.handle")))
    wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "rec"), "Ready").get("status") == "True",
             20, "handler Ready")
    kubelet.create_pod(namespace, "web-0", {"app": "web", "tier": "front"})
    kubelet.set_ready(namespace, "web-0", "192.0.2.77")
    wait_for(lambda: len(lines(out)) >= 2, 20, "up + registered")
    kubelet.delete_pod(namespace, "web-0")
    wait_for(lambda: len(lines(out)) >= 3, 20, "draining")
    kubelet.finish_termination(namespace, "web-0")
    wait_for(lambda: len(lines(out)) >= 5, 20, "down + deregistered")
    got = lines(out)
    types = [g["event"]["type"].rsplit(".", 1)[1] for g in got]
    assert types == ["up", "registered", "draining", "down", "deregistered"], types
    ids = [g["event"]["id"] for g in got]
    assert len(set(ids)) == 5
    first = got[0]["event"]
    assert first["specversion"] == "1.0" and first["type"] == "dev.poolkeeper.instance.up"
    assert first["source"] == f"/namespaces/{namespace}/targetpools/web"
    assert first["subject"] == f"Pod/{namespace}/web-0" and first["datacontenttype"] == "application/json"
    data = first["data"]
    assert data["from"] == "none" and data["to"] == "up" and data["pool"]["uid"] == pool["metadata"]["uid"]
    assert data["instance"]["address"] == "192.0.2.77" and data["instance"]["port"] == 8080
    assert data["instance"]["labels"] == {"app": "web", "tier": "front"}
    assert got[2]["event"]["data"]["from"] == "up" and got[2]["event"]["data"]["to"] == "draining"
    assert got[1]["event"]["type"] == "dev.poolkeeper.member.registered"
    assert got[0]["function"] == f"{module}.handle" and got[0]["attempt"] == 1
    assert 0 < got[0]["remaining"] <= 10_000
    status = wait_for(lambda: (s := handler_status(custom, namespace, "rec")).get("succeeded") == 5 and s,
                      10, "status counts")
    assert status["invocations"] == 5 and status["failed"] == 0 and status["deadLettered"] == 0
    assert status["lastInvocation"]["result"] == "Succeeded"
    assert lh["metadata"]["uid"]


def test_http_handler_signs_retries_and_dead_letters(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, receiver: Receiver) -> None:
    key = b"s3cret-key"
    core.create_namespaced_secret(namespace=namespace, body={
        "metadata": {"name": "hook-key"}, "data": {"key": base64.b64encode(key).decode()}})
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web")))
    flaky = f"/fail-2/{namespace}"
    create(custom, namespace, "lifecyclehandlers", handler(
        "flaky", "web", http(receiver.url(flaky), secretRef={"name": "hook-key", "key": "key"}), events=["up"],
        retry={"maxAttempts": 3, "initialBackoffSeconds": 1, "maxBackoffSeconds": 2}))
    create(custom, namespace, "lifecyclehandlers", handler(
        "broken", "web", http(receiver.url("/always-500")), events=["up"],
        retry={"maxAttempts": 2, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1},
        deadLetter={"http": {"url": receiver.url(f"/dlq/{namespace}")}}))
    kubelet.create_pod(namespace, "web-0", {"app": "web"})
    kubelet.set_ready(namespace, "web-0", "192.0.2.78")

    wait_for(lambda: len(receiver.on(flaky)) >= 3, 30, "three attempts")
    attempts = receiver.on(flaky)
    assert len({a.event_id for a in attempts}) == 1  # the same id on every retry
    for attempt in attempts:
        headers = attempt.headers
        assert headers["ce-specversion"] == "1.0" and headers["ce-type"] == "dev.poolkeeper.instance.up"
        assert headers["ce-source"] == f"/namespaces/{namespace}/targetpools/web"
        assert headers["ce-subject"] == f"Pod/{namespace}/web-0" and headers["content-type"] == "application/json"
        expected = "sha256=" + hmac.new(key, attempt.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["poolkeeper-signature"], expected)
        assert attempt.data["to"] == "up"
    status = wait_for(lambda: (s := handler_status(custom, namespace, "flaky")).get("succeeded") == 1 and s,
                      10, "flaky succeeded")
    assert status["lastInvocation"]["attempts"] == 3 and status["lastInvocation"]["result"] == "Succeeded"

    dlq = wait_for(lambda: receiver.on(f"/dlq/{namespace}"), 30, "dead-letter delivery")
    status = wait_for(lambda: (s := handler_status(custom, namespace, "broken")).get("deadLettered") == 1 and s,
                      10, "dead-lettered count")
    assert status["lastInvocation"]["result"] == "DeadLettered" and "500" in status["lastInvocation"]["error"]
    assert dlq[0].headers["ce-type"] == "dev.poolkeeper.instance.up"
    wait_for(lambda: any(r == "DeadLettered" for r, _ in events_for(core, namespace, "broken")), 10, "Event")


def test_ordering_per_instance_and_no_head_of_line_blocking(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, receiver: Receiver) -> None:
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web"), delay=60))
    path = "/slow-slowpod"
    create(custom, namespace, "lifecyclehandlers", handler("ordered", "web", http(receiver.url(path)),
                                                           events=["up", "draining"]))
    kubelet.create_pod(namespace, "slowpod", {"app": "web"})
    kubelet.set_ready(namespace, "slowpod", "192.0.2.80")
    wait_for(lambda: [r for r in receiver.on(path) if r.headers["ce-subject"].endswith("slowpod")], 10, "slow up")
    kubelet.delete_pod(namespace, "slowpod")  # draining, queued behind the slow `up`
    started = time.time()
    kubelet.create_pod(namespace, "fastpod", {"app": "web"})
    kubelet.set_ready(namespace, "fastpod", "192.0.2.81")
    fast = wait_for(lambda: [r for r in receiver.on(path) if r.headers["ce-subject"].endswith("fastpod")], 10, "fast")
    assert fast[0].at - started < 3.0  # not stuck behind slowpod's 4 s deliveries
    slow = wait_for(lambda: (s := [r for r in receiver.on(path) if r.headers["ce-subject"].endswith("slowpod")])
                    and len(s) == 2 and s, 20, "slow draining")
    assert [r.headers["ce-type"].rsplit(".", 1)[1] for r in slow] == ["up", "draining"]
    assert slow[1].at - slow[0].at >= 3.9  # the draining event waited for the slow `up` to finish


def test_timeout_is_a_hard_stop(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, handlers_dir: Path) -> None:
    module = f"sleepy_{uuid.uuid4().hex[:6]}"
    write_handler(handlers_dir, module, "import time\ndef handle(event, context):\n    time.sleep(60)\n")
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web")))
    create(custom, namespace, "lifecyclehandlers", handler("sleepy", "web", python(f"{module}.handle"),
                                                           events=["up"], timeoutSeconds=1, retry={"maxAttempts": 1}))
    wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "sleepy"), "Ready").get("status") == "True",
             20, "Ready")
    kubelet.create_pod(namespace, "web-0", {"app": "web"})
    kubelet.set_ready(namespace, "web-0", "192.0.2.82")
    status = wait_for(lambda: (s := handler_status(custom, namespace, "sleepy")).get("deadLettered") == 1 and s,
                      20, "timed out and dead-lettered")
    last = status["lastInvocation"]
    assert "timed out" in last["error"] and last["durationMs"] < 3000 and status["failed"] == 1


def test_broken_handler_file_reports_and_recovers(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        handlers_dir: Path) -> None:
    module = f"broken_{uuid.uuid4().hex[:6]}"
    write_handler(handlers_dir, module, "def handle(event, context)\n    return 1\n")  # SyntaxError
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web")))
    create(custom, namespace, "lifecyclehandlers", handler("fixme", "web", python(f"{module}.handle")))
    create(custom, namespace, "lifecyclehandlers", handler("missing", "web", python("no_such_file.handle")))
    ready = wait_for(lambda: (c := condition(get(custom, namespace, "lifecyclehandlers", "fixme"), "Ready")) and
                     c.get("status") == "False" and c, 20, "Ready False")
    assert ready["reason"] == "HandlerLoadFailed" and "SyntaxError" in ready["message"]
    missing = wait_for(lambda: (c := condition(get(custom, namespace, "lifecyclehandlers", "missing"), "Ready")) and
                       c.get("status") == "False" and c, 20, "missing file")
    assert "no_such_file" in missing["message"]
    wait_for(lambda: any(r == "HandlerLoadFailed" for r, _ in events_for(core, namespace, "fixme")), 10, "Event")
    write_handler(handlers_dir, module, "def handle(event, context):\n    return 1\n")
    wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "fixme"), "Ready").get("status") == "True",
             20, "recovered without a restart")


def test_blocking_up_hook_gates_registration(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        workloads: Workloads, handlers_dir: Path, tmp_path: Path, own_lb: tuple[HAProxyProcess, str]) -> None:
    haproxy, lb = own_lb
    flag = tmp_path / "go"
    module = flag_handler(handlers_dir, flag, "warm", extra='''
def refuse(event, context):
    raise RuntimeError("not today")
''')
    fleet = workloads("web")
    other = workloads("api")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb, "web")))
    create(custom, namespace, "lifecyclehandlers", handler("warmup", "web", python(f"{module}.handle"),
                                                           events=["up"], blocking=True, timeoutSeconds=30))
    create(custom, namespace, "targetpools", pod_pool("api", app="api", port=other.port,
                                                       backend=ha_backend(lb, "api")))
    create(custom, namespace, "lifecyclehandlers", handler(
        "veto", "api", python(f"{module}.refuse"), events=["up"], blocking=True, onFailure="Abandon",
        retry={"maxAttempts": 1}))
    for name in ("warmup", "veto"):
        wait_for(lambda n=name: condition(get(custom, namespace, "lifecyclehandlers", n),  # type: ignore[misc]
                                          "Ready").get("status") == "True", 20, f"{name} Ready")
    fleet.add("web-0")
    other.add("api-0")
    ref = f"Pod/{namespace}/web-0"
    member = wait_for(lambda: members(custom, namespace, "web").get(ref), 20, "member listed")
    assert member["state"] == "Registering" and "hook" in member["reason"]
    wait_for(lambda: Path(f"{flag}.started").exists(), 20, "the up hook running")
    states = wait_for(lambda: admin_states(haproxy, "web"), 20, "the server added")
    assert len(states) == 1 and all(flags & MAINT for flags in states.values())  # in maintenance: no traffic
    report = LoadGenerator(haproxy.frontend_url("web"), connections=1).start(count=5).wait(30)
    assert report.ok == 0  # nothing is in rotation while the hook runs
    flag.write_text("go")
    wait_for(lambda: members(custom, namespace, "web").get(ref, {}).get("state") == "Active", 20, "Active")
    refused_while_held = backend_errors(haproxy.admin_endpoint, "web")  # the 5 requests above
    report = LoadGenerator(haproxy.frontend_url("web"), connections=1).start(count=20).wait(30)
    assert report.ok == 20 and report.failed == 0
    assert backend_errors(haproxy.admin_endpoint, "web") == refused_while_held

    held = wait_for(lambda: (m := members(custom, namespace, "api").get(f"Pod/{namespace}/api-0")) and
                    m["state"] == "Held" and m, 20, "Held after an abandoned hook")
    assert "hook" in held["reason"]
    report = LoadGenerator(haproxy.frontend_url("api"), connections=1).start(count=5).wait(30)
    assert report.ok == 0  # never takes traffic
    wait_for(lambda: any(r == "LifecycleHook" for r, _ in events_for(core, namespace, "api")), 10, "pool Event")


def test_delivery_survives_operator_sigkill_with_same_id(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, receiver: Receiver) -> None:
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web")))
    path = f"/fail-2/{namespace}/restart"
    create(custom, namespace, "lifecyclehandlers", handler(
        "durable", "web", http(receiver.url(path)), events=["up"],
        retry={"maxAttempts": 10, "initialBackoffSeconds": 3, "maxBackoffSeconds": 3}))
    kubelet.create_pod(namespace, "web-0", {"app": "web"})
    kubelet.set_ready(namespace, "web-0", "192.0.2.83")
    first = wait_for(lambda: receiver.on(path), 20, "first (failing) attempt")
    running_operator.kill()  # mid-retry (kill waits for the process to be gone)
    running_operator.start()
    wait_for(lambda: len(receiver.on(path)) >= 3, 30, "delivered after the restart")
    assert {r.event_id for r in receiver.on(path)} == {first[0].event_id}
    status = wait_for(lambda: (s := handler_status(custom, namespace, "durable")).get("succeeded", 0) >= 1 and s,
                      20, "succeeded")
    assert status["lastInvocation"]["eventId"] == first[0].event_id


def test_transitions_while_the_operator_is_down_are_coalesced(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, receiver: Receiver) -> None:
    selectorless_service(core, namespace, "web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web")))
    path = f"/ok/{namespace}/coalesce"
    create(custom, namespace, "lifecyclehandlers", handler("told", "web", http(receiver.url(path)),
                                                           events=["up", "draining", "down"]))
    kubelet.create_pod(namespace, "web-0", {"app": "web"})
    kubelet.set_ready(namespace, "web-0", "192.0.2.90")
    kubelet.create_pod(namespace, "web-1", {"app": "web"})
    kubelet.set_ready(namespace, "web-1", "192.0.2.91")
    wait_for(lambda: len(receiver.on(path)) == 2, 20, "two up events")
    running_operator.kill()
    # while it is down: web-0 drains and goes away (up -> draining -> gone), web-1 flaps back to up
    kubelet.delete_pod(namespace, "web-0")
    kubelet.finish_termination(namespace, "web-0")
    kubelet.set_ready(namespace, "web-1", "192.0.2.91", ready=False)
    kubelet.set_ready(namespace, "web-1", "192.0.2.91", ready=True)
    running_operator.start()
    def distinct() -> list[Any]:
        """At-least-once: a delivery whose success was not yet recorded when the operator was killed
        may come again, with the same id. Handlers de-duplicate on the id; so does this test."""
        seen: dict[str, Any] = {}
        for r in receiver.on(path):
            seen.setdefault(r.event_id, r)
        return list(seen.values())

    wait_for(lambda: len(distinct()) >= 3, 20, "the coalesced event")
    # Nothing else may arrive: the outbox holds nothing more to deliver, and the pool has settled on web-1.
    uid = get(custom, namespace, "lifecyclehandlers", "told")["metadata"]["uid"]
    wait_for(lambda: outbox_pending(core, uid) == [], 20, "an empty outbox")
    wait_for(lambda: set(members(custom, namespace, "web")) == {f"Pod/{namespace}/web-1"}, 20, "web-1 alone")
    got = distinct()
    assert len(got) == 3, [(r.headers["ce-type"], r.headers["ce-subject"]) for r in got]
    last = got[2]
    assert last.headers["ce-subject"].endswith("/web-0") and last.headers["ce-type"].endswith(".down")
    assert last.data["from"] == "up" and last.data["to"] == "down"
    assert sorted((r.headers["ce-subject"].rsplit("/", 1)[1], r.data["to"]) for r in got[:2]) == [
        ("web-0", "up"), ("web-1", "up")]  # web-1's flap (up -> down -> up) was nothing to tell


def test_link_local_url_is_refused_before_anything_is_sent(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi) -> None:
    create(custom, namespace, "lifecyclehandlers", handler("metadata", "web",
                                                           http("http://169.254.169.254/latest/meta-data")))
    cond = wait_for(lambda: (c := condition(get(custom, namespace, "lifecyclehandlers", "metadata"), "Ready")) and
                    c.get("status") == "False" and c, 20, "refused URL")
    assert cond["reason"] == "URLNotAllowed" and "169.254.169.254" in cond["message"]


def test_blocking_draining_hook_holds_removal(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        workloads: Workloads, handlers_dir: Path, tmp_path: Path, own_lb: tuple[HAProxyProcess, str]) -> None:
    haproxy, lb = own_lb
    flag = tmp_path / "drained"
    module = flag_handler(handlers_dir, flag, "flushed")
    fleet = workloads("web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb, "web"), delay=120))
    create(custom, namespace, "lifecyclehandlers", handler("flush", "web", python(f"{module}.handle"),
                                                           events=["draining"], blocking=True, timeoutSeconds=60))
    # (annotate.handle needs --handler-credentials and the optional RBAC: test_tenancy_privilege.py)
    wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "flush"), "Ready").get("status") == "True",
             20, "flush Ready")
    fleet.add("web-0")
    ref = f"Pod/{namespace}/web-0"
    wait_for(lambda: members(custom, namespace, "web").get(ref, {}).get("state") == "Active", 20, "Active")
    fleet.begin_termination("web-0")
    wait_for(lambda: members(custom, namespace, "web").get(ref, {}).get("state") == "Draining", 20, "Draining")
    wait_for(lambda: Path(f"{flag}.started").exists(), 20, "the draining hook running")
    # The server is draining and idle: without the hook, the next reconcile would remove it.
    wait_for(lambda: (s := admin_states(haproxy, "web")) and all(f & DRAIN for f in s.values()), 20, "drain set")
    seen = reconciles(running_operator)
    wait_for(lambda: reconciles(running_operator) >= seen + 2, 30, "two more reconciles")
    assert len(haproxy_servers(haproxy, "web")) == 1  # the hook still runs: not removed
    flag.write_text("done")
    wait_for(lambda: not haproxy_servers(haproxy, "web"), 20, "removed once the hook succeeded")


def test_a_stuck_receiver_never_holds_back_the_load_balancer(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, workloads: Workloads, own_lb: tuple[HAProxyProcess, str], black_hole: str) -> None:
    """Non-blocking handlers whose receiver never answers, and many transitions: HAProxy keeps following the
    pods and the pool stays Synced. `archive` (default bound) keeps at most 3 events per instance: the one
    being attempted, then the newest state and member event (flaps behind it cancel out); before, its
    outbox of ~8 KB events (the pods' labels) outgrew a ConfigMap and stopped the pool. `audit`
    (maxPendingEvents 8) dead-letters the oldest past its bound, counted in status, an Event, a metric."""
    haproxy, lb = own_lb
    fleet = workloads("web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb, "web"), delay=1))
    create(custom, namespace, "lifecyclehandlers", handler(
        "audit", "web", http(black_hole), timeoutSeconds=30, retry={"maxAttempts": 5}, maxPendingEvents=8))
    create(custom, namespace, "lifecyclehandlers", handler(
        "archive", "web", http(black_hole), timeoutSeconds=30, retry={"maxAttempts": 5}))
    for name in ("audit", "archive"):
        wait_for(lambda n=name: condition(get(custom, namespace, "lifecyclehandlers", n),  # type: ignore[misc]
                                          "Ready").get("status") == "True", 20, f"{name} Ready")
    big_labels = {f"team.example.com/label-{i:02d}-{'k' * 40}": "v" * 63 for i in range(60)}
    unsynced: list[dict[str, Any]] = []

    def following(expected: Callable[[], set[str]]) -> Callable[[], bool]:
        """HAProxy has exactly the expected servers; any Synced=False seen meanwhile is kept for the end."""
        def check() -> bool:
            synced = condition(get(custom, namespace, "targetpools", "web"), "Synced")
            if synced.get("status") == "False":
                unsynced.append(synced)
            return set(haproxy_servers(haproxy, "web").values()) == expected()
        return check

    def serving() -> set[str]:
        return {f"{ip}:{fleet.port}" for ip in fleet.ips.values()}

    names = [f"web-{i}" for i in range(12)]
    for name in names:
        fleet.add(name)
        core.patch_namespaced_pod(name=name, namespace=namespace, body={"metadata": {"labels": big_labels}})
    wait_for(following(serving), 30, "12 servers")
    flappers = names[:6]
    for _ in range(5):  # each flap: down + deregistered, then up + registered, all stuck behind the first event
        for name in flappers:
            fleet.unready(name)
        wait_for(following(lambda: serving() - {f"{fleet.ips[n]}:{fleet.port}" for n in flappers}), 30, "flapped out")
        for name in flappers:
            kubelet.set_ready(namespace, name, fleet.ips[name])
        wait_for(following(serving), 30, "flapped back")
    for name in names[8:]:
        fleet.begin_termination(name)
        fleet.finish_termination(name)
    wait_for(following(serving), 30, "the 8 remaining pods")
    assert unsynced == [], unsynced
    assert condition(get(custom, namespace, "targetpools", "web"), "Synced")["status"] == "True"

    def pending_of(name: str) -> list[dict[str, Any]]:
        uid = get(custom, namespace, "lifecyclehandlers", name)["metadata"]["uid"]
        return wait_for(lambda: outbox_pending(core, uid), 20, f"{name}'s outbox written")

    archived = pending_of("archive")
    assert len(archived) <= 3 * len(names), len(archived)
    assert handler_status(custom, namespace, "archive").get("deadLettered", 0) == 0  # coalesced, none dropped
    assert 0 < len(pending_of("audit")) <= 8
    status = wait_for(lambda: (s := handler_status(custom, namespace, "audit")).get("deadLettered", 0) > 0 and s,
                      20, "dead letters counted")
    assert status["lastDeadLetter"]["reason"] == "BacklogFull" and status["lastDeadLetter"]["eventId"]
    assert status["succeeded"] == 0  # nothing was ever answered
    wait_for(lambda: any(r == "BacklogFull" for r, _ in events_for(core, namespace, "audit")), 20, "the Event")
    metric = wait_for(lambda: re.search(r'^poolkeeper_handler_dead_lettered_total\{reason="BacklogFull"\} (\S+)$',
                                        running_operator.metrics(), re.MULTILINE), 10, "the metric")
    assert float(metric.group(1)) >= status["deadLettered"]
