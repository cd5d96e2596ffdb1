"""Pods whose readiness flaps fast behind a health-checked HAProxy pool (retries 0, no redispatch).

A pod that turns unready but still exists keeps its server (out of rotation, in DRAIN, its health
checks going on) for the pool's deregistration delay, so when it turns Ready again it is back in
rotation at once instead of waiting for a first health check. Before that, fast flaps left every
server "awaiting its first check" and the backend empty while Ready pods existed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from kubernetes import client

from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.rollout import NO_ERRORS, ErrorWatch, backend_errors
from poolkeeper_dev.traffic import LoadGenerator
from poolkeeper_dev.workload import Workload
from support.kube import create, pod_pool, wait_for
from support.pools import Workloads, ha_backend, haproxy_servers, members

PODS = 4
PERIOD = 2.0  # each pod: Ready for PERIOD - UNREADY s, then unready for UNREADY s, over and over
UNREADY = 1.0
FLAPPING = 20.0  # seconds of flapping under traffic
# A pod counts as "Ready" for the empty-backend check once its Ready write has been acknowledged
# this long ago: the operator's event -> HAProxy path takes milliseconds (README, Performance).
SETTLE = 0.3
# The CRD's default checks (every 2 s, rise 2, fall 3): a server added afresh waits up to 2 s.
CHECKS = {"intervalSeconds": 2, "rise": 2, "fall": 3}


@dataclass
class Flapper:
    """Flips pods' readiness on a staggered schedule: pod i is unready during [i*PERIOD/PODS, +UNREADY) of
    every PERIOD, so half of them are unready at any moment (never all) and a flip happens every
    PERIOD/(2*PODS) s. Keeps, per pod, the intervals in which it was Ready (from acknowledged writes)."""

    fleet: Workload
    pods: list[str]
    ready_since: dict[str, float | None] = field(default_factory=dict)
    ready_spans: list[tuple[str, float, float]] = field(default_factory=list)
    flips: int = 0

    def run(self, seconds: float) -> None:
        now = time.monotonic()
        self.ready_since = dict.fromkeys(self.pods, now)  # all Ready and Active before it starts
        start, ready = now, dict.fromkeys(self.pods, True)
        while (elapsed := time.monotonic() - start) < seconds:
            for i, pod in enumerate(self.pods):
                phase = (elapsed - i * PERIOD / len(self.pods)) % PERIOD
                want = not (elapsed >= i * PERIOD / len(self.pods) and phase < UNREADY)
                if want != ready[pod]:
                    self._flip(pod, want)
                    ready[pod] = want
            time.sleep(0.01)
        for pod in self.pods:  # end with every pod Ready
            if not ready[pod]:
                self._flip(pod, True)

    def _flip(self, pod: str, ready: bool) -> None:
        if ready:
            self.fleet.kubelet.set_ready(self.fleet.namespace, pod, self.fleet.ips[pod])
            self.ready_since[pod] = time.monotonic()  # Ready from the moment the API server acknowledged it
        else:
            since = self.ready_since[pod]
            self.ready_since[pod] = None  # unready from the moment the write is sent
            self.fleet.unready(pod)
            if since is not None:
                self.ready_spans.append((pod, since, time.monotonic()))
        self.flips += 1

    def settled_ready_at(self, when: float) -> list[str]:
        """Pods that had been Ready for SETTLE s at `when` (and were still Ready then)."""
        spans = [*self.ready_spans, *((p, s, float("inf")) for p, s in self.ready_since.items() if s is not None)]
        return sorted({pod for pod, since, until in spans if since + SETTLE <= when < until})


@pytest.mark.parametrize("initial", ["Up", "Checking"])
def test_fast_flapping_pods_never_empty_a_health_checked_backend(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, edge: tuple[HAProxyProcess, str], initial: str) -> None:
    haproxy, lb_name = edge
    fleet = workloads("web")
    pods = [f"web-{i}" for i in range(PODS)]
    for pod in pods:
        fleet.add(pod)
    checks = {**CHECKS, "initialState": initial}
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port, delay=30,
                                                       backend=ha_backend(lb_name, "web", healthCheck=checks)))
    wait_for(lambda: sum(m["state"] == "Active" for m in members(custom, namespace, "web").values()) == PODS,
             30, f"{PODS} members Active (first health checks passed)")
    servers_before = set(haproxy_servers(haproxy, "web"))
    assert len(servers_before) == PODS

    flapper = Flapper(fleet, pods)
    watch = ErrorWatch(haproxy.admin_endpoint, "web", interval=0.02).start()
    load = LoadGenerator(haproxy.frontend_url("web"), connections=8, rate=200).start(duration=FLAPPING + 30)
    try:
        flapper.run(FLAPPING)
        time.sleep(1.0)  # the last flips back to Ready take effect
    finally:
        report = load.stop()
        watch.stop()
    empty_while_ready = [(round(t, 3), ready) for t in watch.empty_at if (ready := flapper.settled_ready_at(t))]
    errors = backend_errors(haproxy.admin_endpoint, "web")
    summary = (f"{flapper.flips} flips; requests {report.ok} ok, {report.failed} failed {report.failures[:3]}; "
               f"HAProxy {errors}; {len(empty_while_ready)} of {watch.samples} samples with no server in rotation "
               f"while a pod had been Ready {SETTLE} s: {empty_while_ready[:5]}")
    print(summary)
    assert flapper.flips >= FLAPPING * PODS / PERIOD * 2 * 0.8, summary  # several flips per second
    assert watch.samples > FLAPPING / 0.1, summary
    assert not empty_while_ready, summary  # never an empty backend while some pod had been Ready SETTLE s
    assert report.total > FLAPPING * 200 * 0.8, summary
    assert report.failed == 0, summary
    assert errors == NO_ERRORS, summary
    assert watch.errors() == NO_ERRORS, summary  # per server too, sampled all along
    served = {body.split(":")[0] for body in report.served_by}
    assert served == {fleet.ips[p] for p in pods}, served  # every pod took traffic between its flaps
    # the servers were kept (with their check state) all along: never removed and added again
    assert set(haproxy_servers(haproxy, "web")) == servers_before
    wait_for(lambda: sum(m["state"] == "Active" for m in members(custom, namespace, "web").values()) == PODS,
             10, f"{PODS} members Active again")


def test_unready_past_the_delay_or_terminating_is_removed(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, edge: tuple[HAProxyProcess, str]) -> None:
    haproxy, lb_name = edge
    fleet = workloads("web")
    for pod in ("stays", "lingers", "leaves"):
        fleet.add(pod)
    delay = 6

    def addresses() -> set[str]:
        return {a.split(":")[0] for a in haproxy_servers(haproxy, "web").values()}

    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port, delay=delay,
                                                       backend=ha_backend(lb_name, "web", healthCheck=CHECKS)))
    wait_for(lambda: sum(m["state"] == "Active" for m in members(custom, namespace, "web").values()) == 3,
             30, "3 members Active")
    load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=100).start(duration=60)
    try:
        fleet.unready("lingers")
        fleet.unready("leaves")
        unready_at = time.monotonic()
        row = wait_for(lambda: (m := members(custom, namespace, "web").get(f"Pod/{namespace}/lingers"))
                       and m["state"] == "Draining" and m, 10, "kept as Draining")
        assert row["reason"].startswith(f"pod not ready: out of rotation, its server and health checks kept for up "
                                        f"to {delay} s"), row
        fleet.begin_termination("leaves")  # unready and terminating: no reason to keep it
        wait_for(lambda: fleet.ips["leaves"] not in addresses(), 3,
                 "the terminating pod's server removed at once (no sessions)")
        assert fleet.ips["lingers"] in addresses()
        assert time.monotonic() - unready_at < delay, "checked within the delay"
        wait_for(lambda: fleet.ips["lingers"] not in addresses(), delay + 5,
                 "the unready pod's server removed after the delay")
        assert time.monotonic() - unready_at >= delay - 0.5
        # the status follows the backend: written after the removal, not before it
        wait_for(lambda: f"Pod/{namespace}/lingers" not in members(custom, namespace, "web"), 5,
                 "the removed member gone from status")
    finally:
        report = load.stop()
    assert report.failed == 0 and report.ok > 100, report
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
    assert {body.split(":")[0] for body in report.served_by} >= {fleet.ips["stays"]}
