"""Fixtures for tests on a real node: containerd, runc, kubelet, kube-proxy and kube-scheduler beside
the control plane, real pods from images built here, the operator deployed by its own manifests.

One node per machine (it owns the bridge and kube-proxy's iptables chains), shared by every test in
this folder. If any part cannot start, the fixture FAILS with the reason; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from poolkeeper_dev import Cluster
from poolkeeper_dev.deploy import Deployed, deploy_operator
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.node import NODE_IP
from support.kube import api_client_for, namespace_name, wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane with a real node for the session (reuses POOLKEEPER_TEST_NODE_CLUSTER if set)."""
    reuse = os.environ.get("POOLKEEPER_TEST_NODE_CLUSTER")
    root = Path(reuse) if reuse else tmp_path_factory.mktemp("nodecluster")
    try:
        started = Cluster(root).up(node=True)
    except Exception as exc:
        pytest.fail(f"the local cluster with a node could not start: {exc}", pytrace=False)
    yield started
    if not reuse:
        started.down()


@pytest.fixture(scope="session")
def node_api(node_cluster: Cluster) -> Iterator[client.ApiClient]:
    with api_client_for(node_cluster.kubeconfig) as api:
        yield api


@pytest.fixture(scope="session")
def deployed_operator(node_cluster: Cluster) -> Deployed:
    """`make image` then `kubectl apply -k manifests/`: the operator as users run it, from its image."""
    try:
        return deploy_operator(node_cluster, REPO)
    except Exception as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture()
def node_namespace(node_api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    core = client.CoreV1Api(node_api)
    name = namespace_name("n", request.node.name, 28)
    core.create_namespace(body={"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name), 30, "the default ServiceAccount")
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name=name)


@pytest.fixture()
def honest_haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    """HAProxy with `retries 0` and no redispatch, its runtime API and frontend on the node's bridge."""
    proc = HAProxyProcess(tmp_path / "haproxy", backends=["web", "nodes"], listen_host=NODE_IP)
    try:
        proc.start()
    except RuntimeError as exc:
        pytest.fail(f"HAProxy could not start: {exc}", pytrace=False)
    yield proc
    proc.stop()
