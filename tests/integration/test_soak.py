"""A soak: the operator SIGKILLed 20 times at random moments while pods churn under traffic.

What must hold after every crash and at the end: no request fails (HAProxy with `retries 0` and no
redispatch, and its own error counters agree), HAProxy holds exactly the pods that should serve,
and a LifecycleHandler heard every transition of every pod at least once, in order, each with one
stable id (at-least-once: a repeat carries the id of the first delivery).
"""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.rollout import NO_ERRORS, backend_errors
from poolkeeper_dev.traffic import LoadGenerator
from support.kube import condition, create, get, pod_pool, wait_for
from support.pools import LOOPBACK_TARGETS, Workloads, ha_backend, haproxy_servers, load_balancer, members
from support.receiver import Receiver

KILLS = 20
POOL_SIZE = 4
STATE_EVENTS = ("up", "draining", "down")


@pytest.fixture()
def soak_lb(custom: client.CustomObjectsApi, tmp_path: Path) -> Iterator[tuple[HAProxyProcess, str]]:
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web",))
    proc.start()
    name = f"soak-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, name, proc.admin_endpoint, ["web"], allowedTargetCIDRs=LOOPBACK_TARGETS)
    yield proc, name
    custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", name=name)
    proc.stop()


def _first_deliveries(receiver: Receiver, path: str) -> dict[str, list[dict[str, Any]]]:
    """subject -> its events in first-delivery order, one per id (repeats must carry the same id)."""
    seen: dict[str, dict[str, Any]] = {}
    for got in receiver.on(path):
        seen.setdefault(got.event_id, {"id": got.event_id, "type": got.headers["ce-type"].rsplit(".", 1)[1],
                                       "subject": got.headers["ce-subject"], "data": got.data})
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in seen.values():
        out[event["subject"]].append(event)
    return out


def test_twenty_sigkills_during_churn_lose_no_request_and_no_transition(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi,
        workloads: Workloads, soak_lb: tuple[HAProxyProcess, str], receiver: Receiver) -> None:
    haproxy, lb = soak_lb
    rng = random.Random(20261202)  # reproducible "random moments"
    fleet = workloads("web")
    live = [f"w-{i}" for i in range(POOL_SIZE)]
    for name in live:
        fleet.add(name)
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=ha_backend(lb, "web"), delay=10))
    path = f"/ok/{namespace}/soak"
    create(custom, namespace, "lifecyclehandlers", {
        "kind": "LifecycleHandler", "metadata": {"name": "soak"},
        "spec": {"poolRef": {"name": "web"}, "events": list(STATE_EVENTS),
                 "function": {"type": "HTTP", "http": {"url": receiver.url(path)}}}})
    wait_for(lambda: sum(m["state"] == "Active" for m in members(custom, namespace, "web").values()) == POOL_SIZE,
             30, f"{POOL_SIZE} active members")
    wait_for(lambda: sum(len(events) for events in _first_deliveries(receiver, path).values()) == POOL_SIZE,
             30, "the handler told of the first pods")
    leaving: list[str] = []  # Terminating pods: they serve until the operator took their server out

    def reap() -> bool:
        """A terminating pod's process exits only once its server left HAProxy (a preStop would wait)."""
        in_haproxy = {address.split(":")[0] for address in haproxy_servers(haproxy, "web").values()}
        for name in list(leaving):
            if fleet.ips[name] not in in_haproxy:
                fleet.finish_termination(name)
                leaving.remove(name)
        return not leaving

    load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=100).start(duration=600)
    started = time.monotonic()
    try:
        wait_for(lambda: load.snapshot().ok >= 20, 10, "traffic flowing")
        for kill in range(KILLS):
            new = f"n-{kill}"
            fleet.add(new)
            old = live.pop(0)
            live.append(new)
            fleet.begin_termination(old)
            leaving.append(old)
            time.sleep(rng.uniform(0.0, 1.0))
            running_operator.kill()
            reap()
            time.sleep(rng.uniform(0.0, 0.5))
            running_operator.start(wait_ready=rng.random() < 0.7)  # some kills land during startup
            reap()
        running_operator.wait_ready()
        wait_for(reap, 60, "every terminating pod drained and removed")
        want = sorted(fleet.ips[name] for name in live)
        wait_for(lambda: sorted(a.split(":")[0] for a in haproxy_servers(haproxy, "web").values()) == want
                 and sum(m["state"] == "Active" for m in members(custom, namespace, "web").values()) == POOL_SIZE,
                 30, "HAProxy holds exactly the live pods, all Active")
    finally:
        report = load.stop()
    soak_seconds = time.monotonic() - started
    print(f"soak: {KILLS} SIGKILLs in {soak_seconds:.0f} s, {report.ok} requests served, {report.failed} failed")
    assert report.failed == 0, report.failures
    assert report.ok > 50 * soak_seconds, (report.ok, soak_seconds)
    assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
    pool = get(custom, namespace, "targetpools", "web")
    assert condition(pool, "Ready")["status"] == "True" and pool["status"]["active"] == POOL_SIZE
    assert {a.split(":")[0] for a in haproxy_servers(haproxy, "web").values()} == {fleet.ips[n] for n in live}

    gone = [f"w-{i}" for i in range(POOL_SIZE)] + [f"n-{i}" for i in range(KILLS - POOL_SIZE)]

    def every_transition_heard() -> bool:
        heard = _first_deliveries(receiver, path)
        return all([e["type"] for e in heard.get(f"Pod/{namespace}/{name}", [])] == list(STATE_EVENTS)
                   for name in gone) and all(
            [e["type"] for e in heard.get(f"Pod/{namespace}/{name}", [])] == ["up"] for name in live)

    try:
        wait_for(every_transition_heard, 30, "every transition delivered")
    finally:
        heard = _first_deliveries(receiver, path)
        print({subject: [e["type"] for e in events] for subject, events in sorted(heard.items())})
    for name in gone:
        events = heard[f"Pod/{namespace}/{name}"]
        # in order, each a step from the state before: nothing skipped, nothing invented
        assert [(e["data"]["from"], e["data"]["to"]) for e in events] == [
            ("none", "up"), ("up", "draining"), ("draining", "down")], events
