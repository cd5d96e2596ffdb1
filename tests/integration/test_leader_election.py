"""Two replicas with --leader-elect: one leads (holds the Lease, reconciles), the other stands by
and takes over when the leader dies, or is paused: never two acting at once."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request
import uuid
from pathlib import Path

from kubernetes import client

from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess, ensure_system_namespace
from support.kube import condition, create, get, pod_pool, wait_for
from support.pools import LOOPBACK_TARGETS, Workloads, ha_backend, haproxy_servers, load_balancer, rotation
from support.receiver import Receiver


def answers(proc: OperatorProcess, probe: str) -> str | None:
    """The body of the operator's /healthz or /readyz when it answers 200, else None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/{probe}", timeout=1) as resp:
            return resp.read().decode() if resp.status == 200 else None
    except OSError:
        return None


def test_one_leader_and_a_standby_that_takes_over(
        cluster: Cluster, namespace: str, tmp_path: Path, api_client: client.ApiClient,
        without_session_operator: OperatorProcess) -> None:
    # The replicas only watch this (empty) namespace, so they leave the other tests' pools alone.
    args = ("--leader-elect", "--leader-elect-namespace", namespace, "--namespace", namespace)
    first = OperatorProcess(cluster.kubeconfig, tmp_path / "a", extra_args=args).start()
    second = OperatorProcess(cluster.kubeconfig, tmp_path / "b", extra_args=args).start(wait_ready=False)
    coordination = client.CoordinationV1Api(api_client)
    try:
        lease = wait_for(lambda: coordination.read_namespaced_lease(name="poolkeeper", namespace=namespace), 10,
                         "the Lease")
        holder = lease.spec.holder_identity
        assert holder.endswith(f"-{first.proc.pid}")  # type: ignore[union-attr]
        wait_for(lambda: answers(second, "healthz"), 20, "the standby answers /healthz")
        # Standing by is a replica's job: Ready (so the Deployment is Available), not acting.
        wait_for(lambda: answers(second, "readyz") == "standing by", 20, "the standby is ready")
        assert answers(first, "readyz") == "leading"
        assert "poolkeeper_leader 0.0" in second.metrics()
        assert "poolkeeper_leader 1.0" in first.metrics()
        first.kill()
        killed = time.monotonic()
        wait_for(lambda: answers(second, "readyz") == "leading", 40, "the standby takes over once the Lease expires")
        print(f"\nleader SIGKILLed: the standby led {time.monotonic() - killed:.1f}s later")
        assert "poolkeeper_leader 1.0" in second.metrics()
        lease = coordination.read_namespaced_lease(name="poolkeeper", namespace=namespace)
        assert lease.spec.holder_identity.endswith(f"-{second.proc.pid}")  # type: ignore[union-attr]
        assert lease.spec.lease_transitions >= 1
    finally:
        first.stop()
        second.stop()


def lease_holder(coordination: client.CoordinationV1Api, namespace: str) -> str:
    return str(coordination.read_namespaced_lease(name="poolkeeper", namespace=namespace).spec.holder_identity)


def test_a_paused_leader_never_acts_after_the_standby_took_over(
        cluster: Cluster, namespace: str, tmp_path: Path, api_client: client.ApiClient,
        custom: client.CustomObjectsApi, workloads: Workloads, receiver: Receiver,
        without_session_operator: OperatorProcess) -> None:
    """SIGSTOP the leader for longer than the Lease: the standby takes over and acts; on SIGCONT the
    old leader must see from its monotonic clock that its renew deadline passed, and do nothing (no
    HAProxy change, no status, no Event, no handler delivery) before it stops, with work waiting."""
    coordination = client.CoordinationV1Api(api_client)
    core = client.CoreV1Api(api_client)
    haproxy = HAProxyProcess(tmp_path / "haproxy", backends=("web",))
    haproxy.start()
    lb = f"lb-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, lb, haproxy.admin_endpoint, ["web"], allowedTargetCIDRs=LOOPBACK_TARGETS)
    ensure_system_namespace(cluster)  # the handler's outbox lives there
    args = ("--leader-elect", "--leader-elect-namespace", namespace, "--namespace", namespace,
            "--http-allowed-cidrs", "127.0.0.0/8")  # the receiver is on loopback
    old = OperatorProcess(cluster.kubeconfig, tmp_path / "old", extra_args=args).start()
    standby = OperatorProcess(cluster.kubeconfig, tmp_path / "standby", extra_args=args).start(wait_ready=False)
    fresh = OperatorProcess(cluster.kubeconfig, tmp_path / "fresh", extra_args=args)
    fleet = workloads("web")
    hook = f"/lease/{namespace}"
    try:
        create(custom, namespace, "lifecyclehandlers", {"kind": "LifecycleHandler", "metadata": {"name": "rec"},
                                                        "spec": {"poolRef": {"name": "web"}, "events": ["draining"],
                                                                 "function": {"type": "HTTP",
                                                                              "http": {"url": receiver.url(hook)}}}})
        create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                           backend=ha_backend(lb, "web"), delay=30))
        wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "rec"), "Ready").get("status")
                 == "True", 20, "the handler Ready")
        for i in range(3):
            fleet.add(f"web-{i}")
        wait_for(lambda: len(haproxy_servers(haproxy, "web")) == 3, 30, "the leader registers 3 servers")
        assert lease_holder(coordination, namespace).endswith(f"-{old.pid}")
        wait_for(lambda: answers(standby, "readyz") == "standing by", 20, "the standby is ready")

        os.killpg(old.pid, signal.SIGSTOP)  # paused: no renewals, no reconciles, its sockets stay open
        paused_at = time.monotonic()
        wait_for(lambda: answers(standby, "readyz") == "leading", 40, "the standby takes over")
        takeover = time.monotonic() - paused_at
        assert lease_holder(coordination, namespace).endswith(f"-{standby.pid}")
        fleet.add("web-3")  # the new leader acts
        wait_for(lambda: len(haproxy_servers(haproxy, "web")) == 4, 20, "the new leader registers web-3")

        standby.kill()  # nobody acts now; work piles up that a leader would do at once
        fleet.begin_termination("web-0")
        time.sleep(1.0)  # (let the new leader's last writes, if any, land before the snapshot)
        servers = rotation(haproxy, "web")
        pool_version = get(custom, namespace, "targetpools", "web")["metadata"]["resourceVersion"]
        events = len(core.list_namespaced_event(namespace).items)

        os.killpg(old.pid, signal.SIGCONT)
        resumed_at, polls = time.monotonic(), 0
        assert old.proc is not None
        while old.proc.poll() is None or time.monotonic() - resumed_at < 3.0:
            assert rotation(haproxy, "web") == servers, "the paused leader changed HAProxy after waking"
            assert get(custom, namespace, "targetpools", "web")["metadata"]["resourceVersion"] == pool_version
            assert len(core.list_namespaced_event(namespace).items) == events
            assert receiver.on(hook) == [], "the paused leader delivered a handler event after waking"
            assert time.monotonic() - resumed_at < 30, "the old leader did not stop"
            polls += 1
            time.sleep(0.1)
        stopped = time.monotonic() - resumed_at
        assert "lost the Lease" in old.log_path.read_text()

        fresh.start(wait_ready=False)  # the work was real: a leader drains web-0 once it holds the Lease
        started = time.monotonic()
        leaving = fleet.ips["web-0"]  # drained, or (its deregistration delay over by now) removed
        wait_for(lambda: not any(address == leaving and admin == "0"
                                 for address, admin, _ in rotation(haproxy, "web").values()), 60,
                 "a fresh leader takes web-0 out of rotation")
        print(f"\npaused leader: standby took over {takeover:.1f}s after SIGSTOP; old leader stopped "
              f"{stopped:.1f}s after SIGCONT without a write ({polls} polls); a fresh replica led and acted "
              f"{time.monotonic() - started:.1f}s after start")
    finally:
        for proc in (old, standby, fresh):
            if proc.proc is not None and proc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.proc.pid, signal.SIGCONT)
            proc.stop()
        custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers",
                                            name=lb)
        haproxy.stop()
