"""Two replicas with --leader-elect: one leads (holds the Lease, reconciles), the other stands by
and takes over when the leader dies."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from kubernetes import client

from poolkeeper_dev import Cluster
from poolkeeper_dev.operator_process import OperatorProcess
from support.kube import wait_for


def answers(proc: OperatorProcess, probe: str) -> str | None:
    """The body of the operator's /healthz or /readyz when it answers 200, else None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/{probe}", timeout=1) as resp:
            return resp.read().decode() if resp.status == 200 else None
    except OSError:
        return None


def test_one_leader_and_a_standby_that_takes_over(
        cluster: Cluster, namespace: str, tmp_path: Path, api_client: client.ApiClient) -> None:
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
        wait_for(lambda: answers(second, "readyz") == "leading", 40, "the standby takes over once the Lease expires")
        assert "poolkeeper_leader 1.0" in second.metrics()
        lease = coordination.read_namespaced_lease(name="poolkeeper", namespace=namespace)
        assert lease.spec.holder_identity.endswith(f"-{second.proc.pid}")  # type: ignore[union-attr]
        assert lease.spec.lease_transitions >= 1
    finally:
        first.stop()
        second.stop()
