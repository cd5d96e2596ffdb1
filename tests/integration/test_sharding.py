"""Two replicas with --shards 4: the pools are split between them by their shards' Leases, each
pool reconciled by exactly one replica, traffic through HAProxy never fails; a killed replica's
shards are taken by the other within the lease duration, and a paused one writes nothing for the
shards it lost once it wakes (real API server, real HAProxy with `retries 0`, real HTTP servers)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from poolkeeper.core.claims import haproxy_claim
from poolkeeper.core.shards import pool_shard_key, shard_of
from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess, ensure_system_namespace
from poolkeeper_dev.rollout import NO_ERRORS, backend_errors
from poolkeeper_dev.traffic import LoadGenerator
from poolkeeper_dev.workload import Workload
from support.kube import GROUP, VERSION, condition, create, get, pod_pool, started, wait_for
from support.pools import LOOPBACK_TARGETS, Workloads, ha_backend, haproxy_servers, load_balancer, rotation
from support.receiver import Receiver

SHARDS = 4
LEASE_SECONDS = 15.0  # kube/lease.py's duration


def pools_in_every_shard(endpoint: str, namespace: str, per_shard: int) -> dict[str, int]:
    """Backend (and pool) names -> shard, `per_shard` in each shard, so both replicas have pools."""
    chosen: dict[str, int] = {}
    counts: Counter[int] = Counter()
    index = 0
    while len(chosen) < SHARDS * per_shard:
        name = f"b{index}"
        index += 1
        shard = shard_of(pool_shard_key(haproxy_claim(endpoint, name), namespace, name), SHARDS)
        if counts[shard] < per_shard:
            chosen[name], counts[shard] = shard, counts[shard] + 1
    return chosen


class Fleet:
    """A LoadBalancer over one HAProxy, and per shard pools of two pods each, in one namespace."""

    def __init__(self, tmp_path: Path, custom: client.CustomObjectsApi, namespace: str, workloads: Workloads,
                 per_shard: int = 2) -> None:
        workdir = tmp_path / "haproxy"
        self.shard_of = pools_in_every_shard(f"unix://{workdir / 'admin.sock'}", namespace, per_shard)
        self.haproxy = HAProxyProcess(workdir, backends=tuple(self.shard_of))
        self.custom, self.namespace = custom, namespace
        self.lb = f"shard-{uuid.uuid4().hex[:6]}"
        self.pods: dict[str, Workload] = {name: workloads(name) for name in self.shard_of}

    def start(self) -> None:
        self.haproxy.start()
        assert self.haproxy.admin_endpoint == f"unix://{self.haproxy.workdir / 'admin.sock'}"
        load_balancer(self.custom, self.lb, self.haproxy.admin_endpoint, list(self.shard_of),
                      allowedTargetCIDRs=LOOPBACK_TARGETS)
        for name, fleet in self.pods.items():
            create(self.custom, self.namespace, "targetpools",
                   pod_pool(name, app=name, port=fleet.port, backend=ha_backend(self.lb, name), delay=5))
            for i in range(2):
                fleet.add(f"{name}-{i}")
        for name in self.pods:
            wait_for(lambda n=name: len(haproxy_servers(self.haproxy, n)) == 2, 60, f"pool {name} in rotation")

    def stop(self) -> None:
        with contextlib.suppress(client.ApiException):
            self.custom.delete_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers",
                                                     name=self.lb)
        self.haproxy.stop()


@pytest.fixture()
def fleet(tmp_path: Path, custom: client.CustomObjectsApi, namespace: str, workloads: Workloads) -> Iterator[Fleet]:
    made = Fleet(tmp_path, custom, namespace, workloads)
    yield made
    made.stop()


def replicas(cluster: Cluster, tmp_path: Path, namespace: str, *names: str) -> list[OperatorProcess]:
    args = ("--shards", str(SHARDS), "--leader-elect-namespace", namespace, "--namespace", namespace,
            "--http-allowed-cidrs", "127.0.0.0/8", "--verbose")  # --verbose: "reconciled ns/pool" lines
    return [OperatorProcess(cluster.kubeconfig, tmp_path / name, extra_args=args) for name in names]


def holders(coordination: client.CoordinationV1Api, namespace: str) -> dict[int, str]:
    """Shard -> holder identity, from the shard Leases (what `kubectl get lease` shows)."""
    leases = coordination.list_namespaced_lease(namespace, label_selector="poolkeeper.dev/shard-of=poolkeeper").items
    return {int(lease.metadata.name.rsplit("-", 1)[1]): lease.spec.holder_identity or "" for lease in leases}


def held_by(coordination: client.CoordinationV1Api, namespace: str, proc: OperatorProcess) -> set[int]:
    return {s for s, who in holders(coordination, namespace).items() if who.endswith(f"-{proc.proc.pid}")}  # type: ignore[union-attr]


def shards_held(proc: OperatorProcess) -> int:
    found = re.search(r"^poolkeeper_shards_held (\S+)$", proc.metrics(), re.MULTILINE)
    return int(float(found.group(1))) if found else -1


def balanced(coordination: client.CoordinationV1Api, namespace: str, a: OperatorProcess, b: OperatorProcess) -> bool:
    mine, theirs = held_by(coordination, namespace, a), held_by(coordination, namespace, b)
    return (len(mine) == len(theirs) == SHARDS // 2 and shards_held(a) == shards_held(b) == SHARDS // 2)


def reconciled(proc: OperatorProcess, namespace: str, offset: int) -> set[str]:
    """The pools `proc` reconciled since `offset` in its log."""
    text = proc.log_path.read_text(errors="replace")[offset:]
    return set(re.findall(rf"reconciled {re.escape(namespace)}/([\w-]+) in ", text))


def log_size(proc: OperatorProcess) -> int:
    return len(proc.log_path.read_text(errors="replace"))


def test_two_replicas_split_the_pools_and_one_takes_over_when_the_other_dies(
        cluster: Cluster, namespace: str, tmp_path: Path, api_client: client.ApiClient,
        custom: client.CustomObjectsApi, fleet: Fleet, without_session_operator: OperatorProcess) -> None:
    coordination = client.CoordinationV1Api(api_client)
    a, b = replicas(cluster, tmp_path, namespace, "a", "b")
    loads: dict[str, LoadGenerator] = {}
    try:
        started(a, "replica a")
        started(b, "replica b")
        fleet.start()
        loads = {name: LoadGenerator(fleet.haproxy.frontend_url(name), connections=2, rate=25).start(duration=240)
                 for name in fleet.shard_of}
        wait_for(lambda: balanced(coordination, namespace, a, b), 60, "each replica holds 2 of the 4 shards")
        owner = {s: (a if s in held_by(coordination, namespace, a) else b) for s in range(SHARDS)}

        # Every pool changes: each is reconciled by exactly one replica, the holder of its shard.
        since = {p: log_size(p) for p in (a, b)}
        for name, pods in fleet.pods.items():
            pods.add(f"{name}-2")
        for name in fleet.pods:
            wait_for(lambda n=name: len(haproxy_servers(fleet.haproxy, n)) == 3, 30, f"{name}-2 in rotation")
        by_a, by_b = reconciled(a, namespace, since[a]), reconciled(b, namespace, since[b])
        assert by_a | by_b == set(fleet.shard_of)
        assert not by_a & by_b, f"pools reconciled by both replicas: {by_a & by_b}"
        for name, shard in fleet.shard_of.items():
            assert name in reconciled(owner[shard], namespace, since[owner[shard]]), (name, shard)

        # SIGKILL a: b holds every shard within the lease duration, and keeps a's pools in step.
        lost = held_by(coordination, namespace, a)
        a.kill()
        killed = time.monotonic()
        wait_for(lambda: shards_held(b) == SHARDS, LEASE_SECONDS + 10, "b holds every shard")
        takeover = time.monotonic() - killed
        assert held_by(coordination, namespace, b) == set(range(SHARDS))
        for name, shard in fleet.shard_of.items():
            if shard in lost:
                fleet.pods[name].add(f"{name}-3")
                wait_for(lambda n=name: len(haproxy_servers(fleet.haproxy, n)) == 4, 30,
                         f"b puts {name}-3 (a pool of a's) in rotation")
        for name in fleet.shard_of:
            assert condition(get(custom, namespace, "targetpools", name), "Ready").get("status") == "True", name
        time.sleep(1.0)
    finally:
        reports = {name: load.stop() for name, load in loads.items()}
        a.stop()
        b.stop()
    for name, report in reports.items():
        assert report.failed == 0, (name, report.failures)
        assert report.ok > 100, (name, report)
        assert backend_errors(fleet.haproxy.admin_endpoint, name) == NO_ERRORS, name
    print(f"\nSIGKILLed replica's shards {sorted(lost)} held by the other {takeover:.1f}s later; "
          f"{sum(r.ok for r in reports.values())} requests through {len(reports)} backends, 0 failed")


def test_a_paused_replica_writes_nothing_for_the_shards_it_lost(
        cluster: Cluster, namespace: str, tmp_path: Path, api_client: client.ApiClient,
        core: client.CoreV1Api, custom: client.CustomObjectsApi, fleet: Fleet, receiver: Receiver,
        without_session_operator: OperatorProcess) -> None:
    """SIGSTOP a past its lease: b takes its shards and acts; b is then killed with work waiting
    in a's old pools. On SIGCONT, a writes nothing (HAProxy, status, Events, handler deliveries)
    while the shards' Leases are b's; once they expire it takes them, reloads the handler's
    outbox and does the work."""
    coordination = client.CoordinationV1Api(api_client)
    ensure_system_namespace(cluster)  # the handler's outbox lives there
    a, b = replicas(cluster, tmp_path, namespace, "a", "b")
    try:
        started(a, "replica a")
        started(b, "replica b")
        fleet.start()
        wait_for(lambda: balanced(coordination, namespace, a, b), 60, "each replica holds 2 of the 4 shards")
        lost = held_by(coordination, namespace, a)
        pool = next(name for name, shard in fleet.shard_of.items() if shard in lost)
        hook = f"/shard/{namespace}"
        create(custom, namespace, "lifecyclehandlers", {
            "kind": "LifecycleHandler", "metadata": {"name": "rec"},
            "spec": {"poolRef": {"name": pool}, "events": ["draining"],
                     "function": {"type": "HTTP", "http": {"url": receiver.url(hook)}}}})
        wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "rec"), "Ready").get("status")
                 == "True", 20, "the handler Ready")

        os.killpg(a.pid, signal.SIGSTOP)  # no renewals, no reconciles; its sockets stay open
        paused = time.monotonic()
        wait_for(lambda: held_by(coordination, namespace, b) == set(range(SHARDS)), LEASE_SECONDS + 15,
                 "b takes the paused replica's shards")
        takeover = time.monotonic() - paused
        fleet.pods[pool].add(f"{pool}-2")  # b acts for a's old pool
        wait_for(lambda: len(haproxy_servers(fleet.haproxy, pool)) == 3, 30, "b registers the new pod")
        time.sleep(1.0)
        b.kill()  # nobody acts now; work piles up in a's old pool
        fleet.pods[pool].begin_termination(f"{pool}-0")
        time.sleep(1.0)
        servers = {name: rotation(fleet.haproxy, name) for name in fleet.shard_of}
        versions = {name: get(custom, namespace, "targetpools", name)["metadata"]["resourceVersion"]
                    for name in fleet.shard_of}
        events = len(core.list_namespaced_event(namespace).items)

        os.killpg(a.pid, signal.SIGCONT)
        resumed, polls = time.monotonic(), 0
        while time.monotonic() - resumed < LEASE_SECONDS - 5:  # b's Leases are not expired for a yet
            assert {name: rotation(fleet.haproxy, name) for name in fleet.shard_of} == servers
            assert {name: get(custom, namespace, "targetpools", name)["metadata"]["resourceVersion"]
                    for name in fleet.shard_of} == versions
            assert len(core.list_namespaced_event(namespace).items) == events
            assert receiver.on(hook) == [], "the paused replica delivered a handler event after waking"
            polls += 1
            time.sleep(0.1)
        assert shards_held(a) == 0
        assert "lost shard" in a.log_path.read_text()

        # b stays dead: its Leases expire for a, which takes them and does the work that waited.
        leaving = fleet.pods[pool].ips[f"{pool}-0"]
        wait_for(lambda: not any(address == leaving and admin == "0"
                                 for address, admin, _ in rotation(fleet.haproxy, pool).values()),
                 LEASE_SECONDS + 20, f"a drains {pool}-0 once it holds the shard again")
        wait_for(lambda: len(receiver.on(hook)) >= 1, 20, "the draining event delivered by a")
        assert shards_held(a) == SHARDS
        print(f"\npaused replica: its shards taken {takeover:.1f}s after SIGSTOP; after SIGCONT no write "
              f"for {LEASE_SECONDS - 5:.0f}s ({polls} polls), then it took the dead peer's shards and acted")
    finally:
        with contextlib.suppress(ProcessLookupError, AssertionError):
            os.killpg(a.pid, signal.SIGCONT)
        a.stop()
        b.stop()
