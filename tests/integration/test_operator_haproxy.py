"""The operator driving a real HAProxy, with real HTTP traffic through it (127.0.0.0/8 only)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.rollout import NO_ERRORS, backend_errors
from poolkeeper_dev.standin_kubelet import FakeKubelet
from poolkeeper_dev.traffic import LoadGenerator
from support.kube import condition, create, events_for, get, pod_pool, wait_for
from support.pools import (
    LOOPBACK_TARGETS,
    Workloads,
    ha_backend,
    haproxy_servers,
    haproxy_stats,
    load_balancer,
    members,
)


@pytest.fixture()
def haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web", "api"), declared={"web": "127.0.0.1:9 disabled"})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture()
def lb_name(custom: client.CustomObjectsApi, haproxy: HAProxyProcess) -> Iterator[str]:
    name = f"edge-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, name, haproxy.admin_endpoint, ["web", "api", "no_such_backend"],
                  allowedTargetCIDRs=LOOPBACK_TARGETS)
    yield name
    custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", name=name)


def test_rolling_replacement_under_load_loses_nothing(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        kubelet: FakeKubelet, workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    gate = "poolkeeper.dev/web"
    fleet = workloads("web", gates=(gate,))
    for i in range(10):
        fleet.add(f"web-{i}")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb_name, "web"), delay=30))
    wait_for(lambda: len([m for m in members(custom, namespace, "web").values() if m["state"] == "Active"]) == 10,
             30, "10 active members")
    assert len(haproxy_servers(haproxy, "web")) == 10

    def gate_true(pod: str) -> bool:
        obj = core.read_namespaced_pod(name=pod, namespace=namespace)
        return any(c.type == gate and c.status == "True" for c in obj.status.conditions or [])

    load = LoadGenerator(haproxy.frontend_url("web"), connections=8, rate=300).start(duration=120)
    try:
        wait_for(lambda: load.snapshot().ok >= 50, 10, "traffic flowing before the replacement starts")
        for i in range(10):
            old, new = f"web-{i}", f"web-new-{i}"
            fleet.add(new)
            wait_for(lambda n=new: gate_true(n), 20, f"{new} registered")  # type: ignore[misc]
            kubelet.delete_pod(namespace, old)  # Terminating: still serving while it drains
            wait_for(lambda o=old: f"Pod/{namespace}/{o}" not in members(custom, namespace, "web"),  # type: ignore[misc]
                     30, f"{old} drained and removed")
            fleet.backends.pop(old).stop()  # only now does the process exit
            kubelet.finish_termination(namespace, old)
    finally:
        report = load.stop()
    assert report.total > 500, report
    assert report.failed == 0, report.failures
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
    served = {body.split(":")[0] for body in report.served_by}
    assert len(served) >= 15 and all(ip.startswith(f"127.{100 + fleet.subnet}.") for ip in served)
    assert len(haproxy_servers(haproxy, "web")) == 10
    assert "declared" not in " ".join(haproxy_servers(haproxy, "web"))  # config servers never reported
    pool = wait_for(lambda: (p := get(custom, namespace, "targetpools", "web")) and
                    condition(p, "Ready").get("status") == "True" and p, 10, "pool Ready")
    assert pool["status"]["active"] == 10 and pool["status"]["desired"] == 10
    reasons = [r for r, _ in events_for(core, namespace, "web")]
    assert "Registered" in reasons and "Deregistered" in reasons


def test_haproxy_restart_is_noticed_and_reapplied(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    fleet = workloads("api")
    for i in range(3):
        fleet.add(f"api-{i}")
    create(custom, namespace, "targetpools", pod_pool("api", app="api", port=fleet.port,
                                                       backend=ha_backend(lb_name, "api")))
    wait_for(lambda: len(haproxy_servers(haproxy, "api")) == 3, 20, "3 servers")
    haproxy.kill()
    synced = wait_for(lambda: (c := condition(get(custom, namespace, "targetpools", "api"), "Synced")) and
                      c.get("reason") == "BackendUnreachable" and c, 20, "BackendUnreachable")
    assert synced["status"] == "False"
    wait_for(lambda: condition(custom.get_cluster_custom_object(
        group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", name=lb_name), "Reachable")
        .get("status") == "False", 10, "LoadBalancer not Reachable")
    haproxy.start()  # a fresh HAProxy: every runtime server is gone
    restarted = time.monotonic()
    wait_for(lambda: len(haproxy_servers(haproxy, "api")) == 3, 10, "servers re-applied")
    assert time.monotonic() - restarted < 5.0
    report = LoadGenerator(haproxy.frontend_url("api"), connections=4).start(count=200).wait(30)
    assert report.failed == 0 and report.ok == 200, report.failures
    assert backend_errors(haproxy.admin_endpoint, "api") == NO_ERRORS
    wait_for(lambda: condition(get(custom, namespace, "targetpools", "api"), "Ready").get("status") == "True",
             10, "pool Ready again")


def test_operator_killed_during_churn_converges_without_duplicates(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        kubelet: FakeKubelet, workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    fleet = workloads("web")
    for i in range(6):
        fleet.add(f"w-{i}")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb_name, "web"), delay=5))
    wait_for(lambda: len(haproxy_servers(haproxy, "web")) == 6, 20, "6 servers")
    report = LoadGenerator(haproxy.frontend_url("web"), connections=2).start(count=60).wait(30)
    assert report.ok == 60
    before = haproxy_stats(haproxy, "web")  # session counters reset if a server were re-added
    # churn, and kill the operator in the middle of it
    fleet.add("w-6")
    fleet.unready("w-0")
    running_operator.kill()
    fleet.add("w-7")
    kubelet.finish_termination(namespace, "w-1")
    running_operator.start()
    expected = {f"Pod/{namespace}/w-{i}" for i in (2, 3, 4, 5, 6, 7)}
    wait_for(lambda: {k for k, m in members(custom, namespace, "web").items() if m["state"] == "Active"}
             == expected and len(haproxy_servers(haproxy, "web")) == 6, 30, "converged")
    after = haproxy_stats(haproxy, "web")
    kept = set(before) & set(after)
    assert len(kept) == 4  # w-2..w-5 stayed ...
    for name in kept:  # ... never removed and re-added (counters intact), never drained
        assert int(after[name]["stot"]) >= int(before[name]["stot"]) > 0, (before[name], after[name])
        assert after[name]["status"] in ("UP", "no check"), after[name]["status"]
    registered = [m for r, m in events_for(core, namespace, "web") if r == "Registered"]
    names = [name for m in registered for name in re.findall(r" as (pk-[0-9a-f]+-[0-9a-f]+)", m)]
    # each server registered once (an Event in flight when the process was killed may be lost)
    assert len(names) == len(set(names)) >= 7, registered
    # the restarted operator applied what it found (the session operator also serves other tests'
    # pools, some failing on purpose, so its error count says nothing about this one)
    metrics = running_operator.metrics()
    applied = re.search(r"^poolkeeper_event_to_backend_seconds_count ([0-9.e+]+)$", metrics, re.M)
    assert applied is not None and float(applied.group(1)) > 0, metrics[:2000]


def test_faults_are_contained_to_their_own_pool(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str, tmp_path: Path) -> None:
    fleet = workloads("web")
    dead = f"dead-{uuid.uuid4().hex[:6]}"
    picky = f"picky-{uuid.uuid4().hex[:6]}"
    fenced = f"fenced-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, dead, f"unix://{tmp_path}/nothing-here.sock")
    load_balancer(custom, picky, haproxy.admin_endpoint, ["api"],
                  allowedNamespaces={"from": "Selector", "selector": {"matchLabels": {"team": "payments"}}})
    load_balancer(custom, fenced, haproxy.admin_endpoint, ["api"], allowedTargetCIDRs=["127.250.0.0/16"])
    try:
        fleet.add("w-0")
        fleet.add("w-1")
        create(custom, namespace, "targetpools", pod_pool("good", app="web", port=fleet.port,
                                                           backend=ha_backend(lb_name, "web")))
        create(custom, namespace, "targetpools", pod_pool("unreachable", app="web", port=fleet.port,
                                                           backend=ha_backend(dead, "web")))
        create(custom, namespace, "targetpools", pod_pool("notallowed", app="web", port=fleet.port,
                                                           backend=ha_backend(picky, "api")))
        create(custom, namespace, "targetpools", pod_pool("nobackend", app="web", port=fleet.port,
                                                           backend=ha_backend(lb_name, "no_such_backend")))
        create(custom, namespace, "targetpools", pod_pool("refused", app="web", port=fleet.port,
                                                           backend=ha_backend(fenced, "api")))
        for pool, reason in (("unreachable", "BackendUnreachable"), ("notallowed", "NotAllowed"),
                             ("nobackend", "BackendNotFound")):
            cond = wait_for(lambda p=pool, r=reason: (c := condition(get(custom, namespace, "targetpools", p),  # type: ignore[misc]
                                                                     "Synced")) and c.get("reason") == r and c,
                            20, f"{pool}: {reason}")
            assert cond["status"] == "False" and cond["message"]
        lb = wait_for(lambda: (o := custom.get_cluster_custom_object(
            group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", name=dead)) and
            condition(o, "Reachable").get("status") == "False" and o["status"].get("pools") == 1 and o,
            20, "dead LB not Reachable, used by one pool")
        assert "nothing-here.sock" in condition(lb, "Reachable")["message"]
        ok_lb = custom.get_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers",
                                                 name=lb_name)
        reachable = condition(ok_lb, "Reachable")
        assert reachable["status"] == "True" and "HAProxy" in reachable["message"]
        # addresses outside allowedTargetCIDRs are refused, with an Event
        wait_for(lambda: any(r == "MemberRefused" and "allowedTargetCIDRs" in m
                             for r, m in events_for(core, namespace, "refused")), 20, "MemberRefused event")
        refused = members(custom, namespace, "refused")[f"Pod/{namespace}/w-0"]
        assert refused["state"] == "Held" and "allowedTargetCIDRs" in refused["reason"]
        # the healthy pool was never disturbed
        good = wait_for(lambda: (p := get(custom, namespace, "targetpools", "good")) and
                        condition(p, "Ready").get("status") == "True" and p, 20, "good pool Ready")
        assert good["status"]["active"] == 2
        report = LoadGenerator(haproxy.frontend_url("web"), connections=2).start(count=20).wait(30)
        assert report.ok == 20 and report.failed == 0, report.failures
        assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
        # served by exactly the two pods, through the only servers in the backend: the good pool's
        assert {b.split(":")[0] for b in report.served_by} == {fleet.backends[n].address for n in ("w-0", "w-1")}
        assert sorted(a.split(":")[0] for a in haproxy_servers(haproxy, "web").values()) == sorted(
            fleet.backends[n].address for n in ("w-0", "w-1"))
    finally:
        for name in (dead, picky, fenced):
            custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers",
                                                name=name)


def test_health_checks_keep_traffic_off_dead_targets(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    fleet = workloads("web")
    fleet.add("alive")
    fleet.add("dead", serve=False)  # ready in Kubernetes, but nothing listens
    create(custom, namespace, "targetpools", pod_pool(
        "web", app="web", port=fleet.port,
        backend=ha_backend(lb_name, "web", healthCheck={"intervalSeconds": 1, "rise": 1, "fall": 1,
                                                         "initialState": "Checking"})))
    wait_for(lambda: members(custom, namespace, "web").get(f"Pod/{namespace}/alive", {}).get("state")
             == "Active", 20, "alive Active")
    # the dead target is in HAProxy, checked every second, and never gets a request
    report = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=100).start(duration=3).wait(30)
    dead = members(custom, namespace, "web")[f"Pod/{namespace}/dead"]
    assert dead["state"] == "Registering" and dead["health"] in ("DOWN", "CHECKING"), dead
    assert report.failed == 0, report.failures  # 503s before the first pass would show here
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
    assert all(body.startswith(fleet.backends["alive"].address) for body in report.served_by)
    pool = get(custom, namespace, "targetpools", "web")
    assert condition(pool, "Ready")["status"] == "False" and pool["status"]["active"] == 1


def test_tls_runtime_api_with_client_certificate_from_secret(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, tmp_path: Path) -> None:
    import base64

    haproxy = HAProxyProcess(tmp_path / "haproxy-tls", backends=("web",), tls=True)
    haproxy.start()
    files = haproxy.tls_files
    data = {key: base64.b64encode(Path(path).read_bytes()).decode()
            for key, path in (("ca.crt", files.ca_file), ("tls.crt", files.cert_file), ("tls.key", files.key_file))}
    core.create_namespaced_secret(namespace=namespace, body={"metadata": {"name": "haproxy-admin"}, "data": data})
    lb = f"tls-{uuid.uuid4().hex[:6]}"
    bad = f"tls-nosecret-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, lb, haproxy.tcp_endpoint, allowedTargetCIDRs=LOOPBACK_TARGETS,
                  haproxy={"endpoint": haproxy.tcp_endpoint,
                           "tls": {"secretRef": {"namespace": namespace, "name": "haproxy-admin"}}})
    load_balancer(custom, bad, haproxy.tcp_endpoint,
                  haproxy={"endpoint": haproxy.tcp_endpoint,
                           "tls": {"secretRef": {"namespace": namespace, "name": "missing"}}})
    fleet = workloads("web")
    try:
        fleet.add("w-0")
        create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                           backend=ha_backend(lb, "web")))
        wait_for(lambda: condition(custom.get_cluster_custom_object(
            group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", name=lb), "Reachable")
            .get("status") == "True", 20, "TLS LoadBalancer reachable")
        wait_for(lambda: members(custom, namespace, "web").get(f"Pod/{namespace}/w-0", {}).get("state") == "Active",
                 20, "member Active through the TLS runtime API")
        report = LoadGenerator(haproxy.frontend_url("web"), connections=2).start(count=20).wait(30)
        assert report.ok == 20
        cond = wait_for(lambda: (c := condition(custom.get_cluster_custom_object(
            group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", name=bad), "Reachable"))
            and c.get("reason") == "TLSSecretInvalid" and c, 20, "missing TLS secret reported")
        assert "missing" in cond["message"]
    finally:
        for name in (lb, bad):
            custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers",
                                                name=name)
        haproxy.stop()


def test_pool_deleted_while_operator_is_down_is_cleaned_up(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    fleet = workloads("api")
    for i in range(3):
        fleet.add(f"api-{i}")
    create(custom, namespace, "targetpools", pod_pool("api", app="api", port=fleet.port,
                                                       backend=ha_backend(lb_name, "api"), delay=5))
    wait_for(lambda: len(haproxy_servers(haproxy, "api")) == 3, 20, "3 servers")
    running_operator.kill()
    custom.delete_namespaced_custom_object(group="poolkeeper.dev", version="v1alpha1", namespace=namespace,
                                           plural="targetpools", name="api")
    # the finalizer holds the pool for the operator: nothing else may remove its servers meanwhile
    held = get(custom, namespace, "targetpools", "api")
    assert held["metadata"]["deletionTimestamp"] and "poolkeeper.dev/cleanup" in held["metadata"]["finalizers"]
    assert len(haproxy_servers(haproxy, "api")) == 3
    running_operator.start()
    wait_for(lambda: not haproxy_servers(haproxy, "api"), 20, "servers removed after the restart")
    wait_for(lambda: not custom.list_namespaced_custom_object(
        group="poolkeeper.dev", version="v1alpha1", namespace=namespace, plural="targetpools")["items"],
        20, "pool gone once cleaned up")


def test_health_check_change_replaces_servers_without_dropping_requests(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    fleet = workloads("web")
    for i in range(3):
        fleet.add(f"w-{i}")
    create(custom, namespace, "targetpools", pod_pool(
        "web", app="web", port=fleet.port,
        backend=ha_backend(lb_name, "web", healthCheck={"intervalSeconds": 1, "rise": 1, "fall": 2})))
    wait_for(lambda: sum(m["state"] == "Active" for m in members(custom, namespace, "web").values()) == 3,
             20, "3 active")
    before = set(haproxy_servers(haproxy, "web"))
    load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=150).start(duration=60)
    try:
        wait_for(lambda: load.snapshot().ok >= 50, 10, "traffic before the change")
        custom.patch_namespaced_custom_object(
            group="poolkeeper.dev", version="v1alpha1", namespace=namespace, plural="targetpools", name="web",
            body={"spec": {"backend": {"haproxy": {"healthCheck": {"rise": 2}}}}})
        wait_for(lambda: (now := set(haproxy_servers(haproxy, "web"))) and len(now) == 3 and not now & before,
                 30, "every server replaced")
        wait_for(lambda: sum(m["state"] == "Active" for m in members(custom, namespace, "web").values()) == 3,
                 20, "3 active again")
        # initialState Up: the successors serve at once, so the change itself may take well under a second
        replaced = load.snapshot().ok
        wait_for(lambda: load.snapshot().ok >= replaced + 50, 10, "traffic through the new servers")
    finally:
        report = load.stop()
    assert report.failed == 0, report.failures
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
    assert report.ok > 100


def test_member_of_a_pod_gone_unready_drains_its_requests_and_names_the_pod(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str) -> None:
    import threading
    import urllib.request

    fleet = workloads("web")
    fleet.add("slow")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb_name, "web"), delay=60))
    ref = f"Pod/{namespace}/slow"
    wait_for(lambda: members(custom, namespace, "web").get(ref, {}).get("state") == "Active", 20, "Active")
    answers: list[int] = []
    request = threading.Thread(target=lambda: answers.append(urllib.request.urlopen(
        haproxy.frontend_url("web") + "/?delay=4", timeout=20).status))
    request.start()
    wait_for(lambda: [row["scur"] for row in haproxy_stats(haproxy, "web").values()] == ["1"], 10,
             "the request in flight on the member")
    fleet.unready("slow")
    row = wait_for(lambda: (m := members(custom, namespace, "web").get(ref)) and m["state"] == "Draining" and m,
                   10, "draining, still named after its pod")
    assert row["instance"] == ref
    request.join(20)
    assert answers == [200]  # the in-flight request finished
    wait_for(lambda: ref not in members(custom, namespace, "web") and not haproxy_servers(haproxy, "web"),
             20, "removed once its session ended")


def status_writes(proc: OperatorProcess, resource: str) -> float:
    found = re.search(rf'^poolkeeper_status_writes_total{{resource="{resource}"}} ([0-9.e+]+)$', proc.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


def test_a_restart_that_finds_every_status_as_it_would_write_it_writes_none(
        cluster: Cluster, namespace: str, tmp_path: Path, custom: client.CustomObjectsApi,
        workloads: Workloads, haproxy: HAProxyProcess, lb_name: str,
        without_session_operator: OperatorProcess) -> None:
    # an operator of this namespace only: the other tests' pools would have their statuses written
    proc = OperatorProcess(cluster.kubeconfig, tmp_path / "op", extra_args=("--namespace", namespace)).start()
    try:
        fleet = workloads("web")
        for i in range(3):
            fleet.add(f"w-{i}")
        create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                           backend=ha_backend(lb_name, "web"), delay=5))
        wait_for(lambda: len(members(custom, namespace, "web")) == 3
                 and condition(get(custom, namespace, "targetpools", "web"), "Ready").get("status") == "True", 30,
                 "pool Ready")
        assert status_writes(proc, "targetpools") >= 1
        proc.stop()
        before = get(custom, namespace, "targetpools", "web")
        proc.start()
        gauge = f'poolkeeper_pool_active_members{{namespace="{namespace}",pool="web"}} 3.0'
        wait_for(lambda: gauge in proc.metrics(), 30, "the pool reconciled after the restart")
        time.sleep(1.0)  # a status write would have been sent within 0.25 s
        assert status_writes(proc, "targetpools") == 0, "the status the pool has is the one it would write"
        assert get(custom, namespace, "targetpools", "web")["status"] == before["status"]
        fleet.unready("w-0")  # and a change after the restart is written as before
        wait_for(lambda: f"Pod/{namespace}/w-0" not in members(custom, namespace, "web"), 20,
                 "w-0 drained and gone from status")
        assert status_writes(proc, "targetpools") >= 1
    finally:
        proc.stop()
