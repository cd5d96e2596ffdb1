"""HAProxy faults under traffic: a reload (master-worker, SIGUSR2) and a runtime API that hangs (SIGSTOP).

Real operator, real control plane, real HAProxy, real HTTP. Measured times are printed (run
with -s to see them) and bounded by the assertions.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from poolkeeper.controller.loadbalancers import LoadBalancers
from poolkeeper.kube.status import StatusBody
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.rollout import ERROR_COUNTERS, NO_ERRORS, backend_errors, server_status
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

GROUP, VERSION = "poolkeeper.dev", "v1alpha1"


@pytest.fixture()
def lbs(custom: client.CustomObjectsApi, tmp_path: Path) -> Iterator[Callable[..., tuple[HAProxyProcess, str]]]:
    """make(backends, master_worker=False) -> a started HAProxy of the test's own and a LoadBalancer for it."""
    made: list[tuple[HAProxyProcess, str]] = []

    def make(backends: tuple[str, ...], master_worker: bool = False) -> tuple[HAProxyProcess, str]:
        haproxy = HAProxyProcess(tmp_path / f"haproxy-{len(made)}", backends=backends, master_worker=master_worker)
        haproxy.start()
        lb = f"lb-{uuid.uuid4().hex[:6]}"
        made.append((haproxy, lb))
        load_balancer(custom, lb, haproxy.admin_endpoint, list(backends), allowedTargetCIDRs=LOOPBACK_TARGETS)
        return haproxy, lb

    yield make
    for haproxy, lb in made:
        haproxy.stop()
        custom.delete_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers", name=lb)


def lb_condition(custom: client.CustomObjectsApi, lb: str, kind: str) -> dict[str, Any]:
    return condition(custom.get_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers",
                                                      name=lb), kind)


def lb_events(core: client.CoreV1Api, lb: str) -> list[str]:
    items = core.list_namespaced_event(namespace="default", field_selector=f"involvedObject.name={lb}").items
    return [e.reason for e in items]


def statuses(haproxy: HAProxyProcess, backend: str, ips: dict[str, str]) -> dict[str, str]:
    """pod -> HAProxy status of its server (UP, DRAIN, MAINT, ... or GONE), read on a new connection."""
    return {pod: server_status(haproxy.admin_endpoint, backend, ip) for pod, ip in ips.items()}


# ----- LoadBalancers alone: a real HAProxy, Kubernetes writes recorded instead of sent


class Recorded:
    """Stands in for the EventRecorder and the StatusWriter: what they were asked to write."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool]] = []
        self.status: dict[str, Any] = {}

    def post(self, obj: Any, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append((reason, warning))

    def submit(self, path: str, status: StatusBody, observed: Any = None) -> None:
        self.status = status() if callable(status) else status

    def forget(self, path: str) -> None:
        pass

    def reachable(self) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == "Reachable")


def lb_body(endpoint: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoadBalancer",
            "metadata": {"name": "edge", "uid": "uid-edge", "generation": 1},
            "spec": {"type": "HAProxy", "haproxy": {"endpoint": endpoint, "backends": [{"name": "web"}]}}}


async def test_load_balancers_notice_a_reload_and_requeue_their_pools(tmp_path: Path) -> None:
    recorded, queued = Recorded(), []
    lbs = LoadBalancers(None, recorded, recorded, lambda lb: [("shop", "web")], queued.append)  # type: ignore[arg-type]
    with HAProxyProcess(tmp_path / "mw", ["web"], master_worker=True) as haproxy:
        try:
            await lbs.upsert(lb_body(haproxy.admin_endpoint))
            await lbs.check("edge")
            assert recorded.reachable()["status"] == "True" and queued == [] and recorded.events == []
            haproxy.reload()
            await lbs.check("edge")
            assert queued == [("shop", "web")]
            assert recorded.events == [("Reloaded", False)]
            await lbs.check("edge")  # the same new worker: nothing more to do
            assert queued == [("shop", "web")] and len(recorded.events) == 1
        finally:
            await lbs.close()


async def test_load_balancers_report_a_hung_haproxy_within_the_probe_timeout(tmp_path: Path) -> None:
    recorded, queued = Recorded(), []
    lbs = LoadBalancers(None, recorded, recorded, lambda lb: [("shop", "web")], queued.append,  # type: ignore[arg-type]
                        probe_timeout=0.5)
    with HAProxyProcess(tmp_path / "hung", ["web"]) as haproxy:
        try:
            await lbs.upsert(lb_body(haproxy.admin_endpoint))
            haproxy.pause()
            try:
                started = asyncio.get_running_loop().time()
                await lbs.check("edge")
                assert asyncio.get_running_loop().time() - started < 1.5
                assert recorded.reachable()["status"] == "False"
                assert "did not answer within 0.5 s" in recorded.reachable()["message"]
                assert recorded.events == [("Unreachable", True)] and queued == [("shop", "web")]
                found = lbs.get("edge")
                assert found is not None
                with pytest.raises(Exception, match="waiting for it to answer the health probe"):
                    await found[1].execute(["show info"])  # the pools' calls fail at once meanwhile
            finally:
                haproxy.resume()
            await lbs.check("edge")
            assert recorded.reachable()["status"] == "True"
            assert recorded.events[-1] == ("Reachable", False) and queued[-1] == ("shop", "web")
        finally:
            await lbs.close()


# ----- the operator


def test_reload_puts_servers_back_within_5s_keeping_drain_and_held_states(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, handlers_dir: Path, lbs: Callable[..., tuple[HAProxyProcess, str]]) -> None:
    haproxy, lb = lbs(("web",), master_worker=True)
    module = f"veto_{uuid.uuid4().hex[:6]}"
    (handlers_dir / f"{module}.py").write_text('''
def handle(event, context):
    if event["subject"].endswith("/web-held"):
        raise RuntimeError("not this one")
    return "ok"
''')
    fleet = workloads("web")
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb, "web"), delay=120))
    create(custom, namespace, "lifecyclehandlers", {
        "kind": "LifecycleHandler", "metadata": {"name": "veto"},
        "spec": {"poolRef": {"name": "web"}, "events": ["up"], "blocking": True, "onFailure": "Abandon",
                 "retry": {"maxAttempts": 1},
                 "function": {"type": "Python", "python": {"handler": f"{module}.handle"}}}})
    wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "veto"), "Ready").get("status") == "True",
             20, "handler Ready")
    pods = ["web-0", "web-1", "web-2", "web-drain", "web-held"]
    ips = {pod: fleet.add(pod) for pod in pods}
    expected = {**{f"Pod/{namespace}/{p}": "Active" for p in pods[:4]}, f"Pod/{namespace}/web-held": "Held"}
    wait_for(lambda: {k: m["state"] for k, m in members(custom, namespace, "web").items()} == expected, 30,
             "4 members Active, web-held Held")
    ready = {"web-0": "no check", "web-1": "no check", "web-2": "no check"}  # in rotation, without checks
    # 9 s requests (HAProxy's `timeout server` is 10 s) on every member: web-drain drains (sessions open)
    # instead of being removed at once
    slow = LoadGenerator(f"{haproxy.frontend_url('web')}/?delay=9", connections=8, timeout=30).start(count=8)
    wait_for(lambda: fleet.backends["web-drain"].in_flight > 0, 10, "a slow request on web-drain")
    fleet.begin_termination("web-drain")  # Terminating, still serving, drains for deregistrationDelaySeconds
    before = {**ready, "web-drain": "DRAIN", "web-held": "MAINT"}
    wait_for(lambda: statuses(haproxy, "web", ips) == before, 20, "web-drain draining, web-held in maintenance")

    load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=200).start(duration=90)
    try:
        wait_for(lambda: load.snapshot().ok >= 100, 20, "traffic flowing")
        assert load.snapshot().failed == 0, load.snapshot().failures
        signalled = time.monotonic()
        new_worker = haproxy.reload()  # returns once the new worker answers: it has no poolkeeper server
        answering = time.monotonic()
        restored = wait_for(lambda: (now := statuses(haproxy, "web", ips)) and
                            {p: now[p] for p in ready} == ready and now, 10, "serving members back", interval=0.02)
        restored_at = time.monotonic()
        assert haproxy.worker_pid() == new_worker
        print(f"\nreload -> servers restored: {(restored_at - answering) * 1e3:.0f} ms after the new worker "
              f"answered, {(restored_at - signalled) * 1e3:.0f} ms after SIGUSR2")
        assert restored_at - answering < 5.0
        # drain state kept: the draining member does not come back in rotation, the held one stays in MAINT
        assert restored["web-held"] == "MAINT", restored
        assert restored["web-drain"] in ("GONE", "DRAIN"), restored
        at_restore = load.snapshot()
        wait_for(lambda: load.snapshot().ok >= at_restore.ok + 100, 20, "traffic after the restore")
        settled = load.snapshot()
        errors_settled = backend_errors(haproxy.admin_endpoint, "web")  # the window's 503s count as econ here
        wait_for(lambda: load.snapshot().ok >= settled.ok + 600, 30, "3 s of traffic after the reload settled")
    finally:
        report = load.stop()
        finished = slow.wait(30)
    assert finished.ok == 8, finished.failures  # the old worker finished what it had, web-drain's included
    print(f"requests failed while the new worker had no server: {settled.failed} of {settled.total} "
          f"(the new worker's backend counters: {errors_settled})")
    assert report.failed == settled.failed, report.failures
    assert backend_errors(haproxy.admin_endpoint, "web") == errors_settled  # the new worker's counters
    for server, row in haproxy_stats(haproxy, "web").items():
        assert {k: int(row[k] or 0) for k in ERROR_COUNTERS} == NO_ERRORS, server
    after = statuses(haproxy, "web", ips)
    assert after["web-held"] == "MAINT" and after["web-drain"] in ("GONE", "DRAIN"), after
    served = {body.split(":")[0] for body in report.served_by}
    assert ips["web-held"] not in served
    assert len(haproxy_servers(haproxy, "web")) in (4, 5)
    wait_for(lambda: "Reloaded" in lb_events(core, lb), 10, "Reloaded Event on the LoadBalancer")


def operator_fds(operator: OperatorProcess) -> int:
    return len(list(Path(f"/proc/{operator.pid}/fd").iterdir()))


def test_hung_runtime_api_is_reported_and_other_load_balancers_keep_converging(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, lbs: Callable[..., tuple[HAProxyProcess, str]]) -> None:
    backends = ("a", "b", "c", "d")  # as many pools as the operator has workers, all on the hung HAProxy
    hung, hung_lb = lbs(backends)
    other, other_lb = lbs(("web",))
    stuck = workloads("stuck")
    fine = workloads("fine")
    for backend in backends:
        create(custom, namespace, "targetpools", pod_pool(backend, app="stuck", port=stuck.port,
                                                           backend=ha_backend(hung_lb, backend), delay=5))
    create(custom, namespace, "targetpools", pod_pool("web", app="fine", port=fine.port,
                                                       backend=ha_backend(other_lb, "web"), delay=5))
    stuck.add("stuck-0")
    for i in range(2):
        fine.add(f"fine-{i}")
    wait_for(lambda: all(len(haproxy_servers(hung, b)) == 1 for b in backends), 30, "the hung LB's pools synced")
    wait_for(lambda: len(haproxy_servers(other, "web")) == 2, 30, "the other pool synced")

    def applied(pod: str) -> float:
        """Seconds from adding `pod` (created and made ready) to its server in the other HAProxy."""
        count = len(haproxy_servers(other, "web")) + 1
        started = time.monotonic()
        fine.add(pod)
        wait_for(lambda: len(haproxy_servers(other, "web")) == count, 20, f"{pod} in the other HAProxy",
                 interval=0.02)
        return time.monotonic() - started

    baseline = applied("fine-2")
    load = LoadGenerator(other.frontend_url("web"), connections=2, rate=100).start(duration=90)
    fds_before = operator_fds(running_operator)
    try:
        hung.pause()
        paused = time.monotonic()
        stuck.add("stuck-1")  # every pool of the hung HAProxy has work to do, and cannot do it
        for backend in backends:
            synced = wait_for(lambda b=backend: (c := condition(get(custom, namespace, "targetpools", b),  # type: ignore[misc]
                                                                "Synced")) and c.get("reason") == "BackendUnreachable"
                              and c, 20, f"pool {backend} BackendUnreachable", interval=0.05)
            assert synced["status"] == "False"
        detected = time.monotonic() - paused
        wait_for(lambda: lb_condition(custom, hung_lb, "Reachable").get("reason") == "RuntimeAPIUnreachable", 10,
                 "LoadBalancer not Reachable")
        assert lb_condition(custom, hung_lb, "Reachable")["status"] == "False"
        wait_for(lambda: "BackendUnreachable" in [r for r, _ in events_for(core, namespace, "a")], 10,
                 "BackendUnreachable Event")
        latencies = []
        for i in range(3, 13):  # while the first HAProxy stays hung (~8 s), the other pool follows its pods
            progress = load.snapshot().ok
            wait_for(lambda p=progress: load.snapshot().ok >= p + 50, 10, "traffic on the other HAProxy")  # type: ignore[misc]
            latencies.append(applied(f"fine-{i}"))
        hung_for = time.monotonic() - paused
        fds_during = operator_fds(running_operator)
        print(f"\nhang -> all 4 pools BackendUnreachable: {detected:.1f} s; other pool's pod -> server latency "
              f"during the {hung_for:.0f} s hang: max {max(latencies):.2f} s, median "
              f"{sorted(latencies)[len(latencies) // 2]:.2f} s (before: {baseline:.2f} s); "
              f"operator fds {fds_before} -> {fds_during}")
        assert detected < 10.0
        assert max(latencies) < 2.0 + 2 * baseline, (latencies, baseline)
        assert len(haproxy_servers(other, "web")) == 13
        assert fds_during - fds_before < 10  # no connection piling up towards the hung HAProxy
    finally:
        hung.resume()
        report = load.stop()
    assert report.failed == 0 and report.ok > 100, report.failures
    assert backend_errors(other.admin_endpoint, "web") == NO_ERRORS
    # after SIGCONT everything converges, the change made during the hang included
    wait_for(lambda: lb_condition(custom, hung_lb, "Reachable").get("status") == "True", 20, "Reachable again")
    wait_for(lambda: all(len(haproxy_servers(hung, b)) == 2 for b in backends), 20, "stuck-1 in every backend")
    for backend in backends:
        wait_for(lambda b=backend: condition(get(custom, namespace, "targetpools", b),  # type: ignore[misc]
                                             "Synced").get("status") == "True", 20, f"pool {backend} Synced")
