"""healthCheck.initialState against a real HAProxy 2.6 (retries 0, no redispatch) and real HTTP traffic.

Up: a pod that turns Ready takes traffic at once, before its first health check, and a Ready pod
with nothing listening is taken out by `fall` failed checks and stays out. Checking: a new server
takes no request before a check passed (today's behaviour). Pods swapping readiness: with Up no
request fails even when every newly Ready pod's server is added afresh.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from kubernetes import client

from poolkeeper.controller.pools import HEALTH_SECONDS
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.rollout import NO_ERRORS, ErrorWatch, backend_errors
from poolkeeper_dev.traffic import LoadGenerator, start_backend
from support.kube import GROUP, VERSION, create, get, pod_pool, wait_for
from support.pools import (
    LOOPBACK_TARGETS,
    Workloads,
    ha_backend,
    haproxy_servers,
    haproxy_stats,
    load_balancer,
    members,
    rotation,
)

SLOW = {"intervalSeconds": 30, "rise": 2, "fall": 3}  # no first check for a while after a server is added


def stat_of(haproxy: HAProxyProcess, address: str) -> dict[str, str]:
    """The `show stat` row of the poolkeeper server at `address`; {} while HAProxy has none there."""
    servers = haproxy_servers(haproxy, "web")
    name = next((n for n, a in servers.items() if a.split(":")[0] == address), None)
    row: dict[str, str] = haproxy_stats(haproxy, "web").get(name, {}) if name is not None else {}
    return row


def test_up_serves_a_newly_ready_pod_before_its_first_check(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, edge: tuple[HAProxyProcess, str]) -> None:
    haproxy, lb_name = edge
    fleet = workloads("web")
    fleet.add("w-0")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb_name, "web", healthCheck=SLOW)))
    pool = get(custom, namespace, "targetpools", "web")
    assert pool["spec"]["backend"]["haproxy"]["healthCheck"]["initialState"] == "Up", "the CRD's default"
    wait_for(lambda: members(custom, namespace, "web").get(f"Pod/{namespace}/w-0", {}).get("state") == "Active",
             20, "w-0 Active")
    load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=200).start(duration=30)
    try:
        ready_at = time.monotonic()
        new_ip = fleet.add("w-1")
        wait_for(lambda: new_ip in {b.split(":")[0] for b in load.snapshot().served_by}, 5, "w-1 served")
        served_after = time.monotonic() - ready_at
        row = stat_of(haproxy, new_ip)
        assert row["check_status"] == "INI" and row["chkfail"] == "0", row  # not one check has run yet
        assert row["status"] == "UP" and int(row["hrsp_2xx"]) > 0, row
        member = wait_for(lambda: (m := members(custom, namespace, "web").get(f"Pod/{namespace}/w-1"))
                          and m["state"] == "Active" and m, 10, "w-1 Active")
        assert member["health"] == "CHECKING" and "before its first health check" in member["reason"], member
        time.sleep(1)
    finally:
        report = load.stop()
    print(f"Ready write -> first request served by w-1: {served_after * 1000:.0f} ms; {report.ok} ok")
    assert served_after < 2.0  # the first check could not have run: every 30 s
    assert report.failed == 0, report.failures
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS


def test_up_a_ready_pod_with_no_listener_is_taken_out_after_fall_checks_and_stays_out(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, edge: tuple[HAProxyProcess, str]) -> None:
    haproxy, lb_name = edge
    fleet = workloads("web")
    fleet.add("alive")
    checks = {"intervalSeconds": 1, "rise": 2, "fall": 3, "initialState": "Up"}
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb_name, "web", healthCheck=checks)))
    wait_for(lambda: members(custom, namespace, "web").get(f"Pod/{namespace}/alive", {}).get("state") == "Active",
             20, "alive Active")
    load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=100).start(duration=120)
    try:
        dead_ip = fleet.add("dead", serve=False)  # Ready in Kubernetes, but nothing listens
        row = wait_for(lambda: (r := stat_of(haproxy, dead_ip)) and r["status"] == "DOWN" and r, 10,
                       "the dead server taken out by its checks")
        assert int(row["chkfail"]) == checks["fall"] and row["chkdown"] == "1", row  # marked up: `fall` failures
        time.sleep(0.5)  # requests sent just before it went DOWN have failed by now
        failed_at_down = load.snapshot().failed
        econ_at_down = backend_errors(haproxy.admin_endpoint, "web")["econ"]
        assert failed_at_down == econ_at_down > 0  # the price of Up: requests sent to it until then
        # kubectl shows it out within seconds: no event says a check failed, so the health resync
        # re-reads settled pools with checks every HEALTH_SECONDS (5 s; a pool settled meanwhile
        # joins at the next period; the 30 s resync was the first to see it before). The reconcile
        # that saw DOWN did not force it back.
        dead = wait_for(lambda: (m := members(custom, namespace, "web").get(f"Pod/{namespace}/dead"))
                        and m["health"] == "DOWN" and m, 2 * HEALTH_SECONDS + 5, "the member reported DOWN")
        assert dead["state"] == "Registering" and "health checks failed" in dead["reason"], dead
        time.sleep(2)
        row = stat_of(haproxy, dead_ip)
        assert row["status"] == "DOWN" and row["chkdown"] == "1", row
        snapshot = load.snapshot()
        assert snapshot.failed == failed_at_down, snapshot.failures  # nothing failed since
    finally:
        report = load.stop()
    assert report.failed == failed_at_down
    assert backend_errors(haproxy.admin_endpoint, "web") == {**NO_ERRORS, "econ": econ_at_down}
    assert report.ok > 100 and all(b.startswith(fleet.ips["alive"]) for b in report.served_by)


def test_checking_keeps_a_new_server_out_until_a_check_passed(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, tmp_path: Path) -> None:
    fleet = workloads("web")
    other = start_backend("127.0.0.1", fleet.port)  # a server from the config file keeps serving meanwhile
    name = f"init-{uuid.uuid4().hex[:6]}"
    with HAProxyProcess(tmp_path / "haproxy", backends=("web",), declared={"web": other.name}) as haproxy:
        load_balancer(custom, name, haproxy.admin_endpoint, ["web"], allowedTargetCIDRs=LOOPBACK_TARGETS)
        try:
            create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port, backend=ha_backend(
                name, "web", healthCheck={**SLOW, "initialState": "Checking"})))
            load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=100).start(duration=30)
            try:
                new_ip = fleet.add("w-0")
                row = wait_for(lambda: (member := members(custom, namespace, "web").get(f"Pod/{namespace}/w-0"))
                               and member["state"] == "Registering" and member["health"] == "CHECKING" and member,
                               10, "w-0 Registering")
                assert "waiting for health checks" in row["reason"], row
                unchecked = 0
                for _ in range(20):  # while no check has passed, not one request reaches it
                    stat = stat_of(haproxy, new_ip)
                    if stat["check_status"] != "INI":
                        break
                    unchecked += 1
                    assert stat["status"].startswith("DRAIN") and stat["stot"] == "0", stat
                    time.sleep(0.1)
                assert unchecked >= 5, "the first check ran too early to see the wait"
            finally:
                report = load.stop()
            assert report.failed == 0 and report.ok > 50, report.failures
            assert set(report.served_by) == {other.name}
            assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
        finally:
            custom.delete_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers", name=name)
            other.stop()


def test_up_pods_swapping_readiness_lose_no_request(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, edge: tuple[HAProxyProcess, str]) -> None:
    """Half the pods turn Ready as the other half turns unready, each time after the unready ones'
    servers were removed (past the deregistration delay): every newly Ready server is added afresh."""
    haproxy, lb_name = edge
    fleet = workloads("web")
    first, second = [f"a-{i}" for i in range(3)], [f"b-{i}" for i in range(3)]
    for pod in first + second:
        fleet.add(pod)
    delay = 2
    create(custom, namespace, "targetpools", pod_pool(
        "web", app="web", port=fleet.port, delay=delay,
        backend=ha_backend(lb_name, "web", healthCheck={"intervalSeconds": 2, "rise": 2, "fall": 3})))
    wait_for(lambda: len(rotation(haproxy, "web")) == 6, 20, "6 servers")
    for pod in second:
        fleet.unready(pod)
    wait_for(lambda: len(haproxy_servers(haproxy, "web")) == 3, delay + 10, "the unready pods' servers removed")
    watch = ErrorWatch(haproxy.admin_endpoint, "web", interval=0.02).start()
    load = LoadGenerator(haproxy.frontend_url("web"), connections=8, rate=200).start(duration=60)
    ready, unready = first, second
    try:
        for _ in range(4):
            for pod in unready:  # Ready writes first: never all unready
                fleet.kubelet.set_ready(fleet.namespace, pod, fleet.ips[pod])
            for pod in ready:
                fleet.unready(pod)
            ready, unready = unready, ready
            serving = {fleet.ips[p] for p in ready}
            wait_for(lambda s=serving: {a.split(":")[0] for a in haproxy_servers(haproxy, "web").values()} == s,
                     delay + 10, "the unready pods' servers removed")
    finally:
        report = load.stop()
        watch.stop()
    summary = f"{report.ok} ok, {report.failed} failed {report.failures[:3]}; {watch.errors()}"
    print(summary)
    assert report.ok > 1000, summary
    assert report.failed == 0, summary
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS, summary
    assert watch.errors() == NO_ERRORS, summary
    assert {b.split(":")[0] for b in report.served_by} == set(fleet.ips.values())
