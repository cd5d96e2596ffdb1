"""Fixtures for tests that run the real operator against the real control plane."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.standin_kubelet import FakeKubelet
from poolkeeper_dev.workload import Workload
from support.kube import GROUP, VERSION, api_client_for, namespace_name, token_kubeconfig
from support.pools import LOOPBACK_TARGETS, Workloads, load_balancer
from support.receiver import Receiver

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def api_client(cluster: Cluster) -> Iterator[client.ApiClient]:
    with api_client_for(cluster.kubeconfig) as api:
        yield api


@pytest.fixture(scope="session")
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture(scope="session")
def custom(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture(scope="session")
def kubelet(cluster: Cluster) -> Iterator[FakeKubelet]:
    stand_in = FakeKubelet(str(cluster.kubeconfig))
    stand_in.ensure_node()
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """A CloudEvents receiver on loopback for the module's HTTP handlers (test_http_delivery has its own)."""
    rec = Receiver().start()
    yield rec
    rec.stop()


@pytest.fixture(scope="session")
def handlers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped handlers plus whatever a test writes, in a folder the operator reads."""
    folder = tmp_path_factory.mktemp("handlers")
    for source in (REPO / "handlers").glob("*.py"):
        shutil.copy(source, folder / source.name)
    return folder


def service_account_kubeconfig(cluster: Cluster, folder: Path) -> Path:
    """A kubeconfig for the operator's own ServiceAccount, bound by manifests/rbac.yaml.

    The operator in these tests runs with exactly the permissions it ships with, so a missing
    RBAC rule fails a test instead of a user's deployment.
    """
    for manifest in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
        cluster.kubectl_run("apply", "-f", str(REPO / "manifests" / manifest))
    return token_kubeconfig(cluster, folder, "poolkeeper", "poolkeeper-system")


@pytest.fixture(scope="session")
def operator(cluster: Cluster, handlers_dir: Path, tmp_path_factory: pytest.TempPathFactory,
             kubelet: FakeKubelet) -> Iterator[OperatorProcess]:
    logs = tmp_path_factory.mktemp("operator-logs")
    proc = OperatorProcess(service_account_kubeconfig(cluster, logs), logs, handlers_dir=handlers_dir,
                           # loopback receivers, and EndpointSlice pools of Instances and Nodes (test_sources),
                           # are allowed explicitly; test_tenant_addresses runs an operator without these.
                           extra_args=("--http-allowed-cidrs", "127.0.0.0/8", "--endpointslice-allow-external-sources"))
    try:
        proc.start()
    except RuntimeError as exc:
        pytest.fail(f"the operator could not start: {exc}", pytrace=False)
    yield proc
    proc.stop()


@pytest.fixture()
def running_operator(operator: OperatorProcess) -> OperatorProcess:
    """The session's operator, restarted first if an earlier test killed it."""
    if operator.proc is None or operator.proc.poll() is not None:
        operator.start()
    return operator


@pytest.fixture()
def without_session_operator(operator: OperatorProcess) -> OperatorProcess:
    """For tests that run their own operators on their namespace: the session's cluster-wide operator
    would act there too (and deliver to their receivers), so it is stopped; `running_operator`
    starts it again for the tests after."""
    operator.stop()
    return operator


@pytest.fixture()
def workloads(kubelet: FakeKubelet, namespace: str) -> Iterator[Workloads]:
    """Make pods backed by real HTTP servers in the test's namespace; their servers stop afterwards."""
    made: list[Workload] = []

    def make(app: str, gates: tuple[str, ...] = ()) -> Workload:
        made.append(Workload(kubelet, namespace, app, gates))
        return made[-1]

    yield make
    for workload in made:
        workload.stop_all()


@pytest.fixture()
def namespace(core: client.CoreV1Api, request: pytest.FixtureRequest) -> Iterator[str]:
    name = namespace_name("t", request.node.name)
    core.create_namespace(body={"metadata": {"name": name, "labels": {"poolkeeper.dev/test": "true"}}})
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name=name)


@pytest.fixture()
def edge(custom: client.CustomObjectsApi, tmp_path: Path) -> Iterator[tuple[HAProxyProcess, str]]:
    """A real HAProxy (retries 0, no redispatch) with backend `web`, and a LoadBalancer listing it."""
    name = f"edge-{uuid.uuid4().hex[:6]}"
    with HAProxyProcess(tmp_path / "haproxy", backends=("web",)) as proc:
        load_balancer(custom, name, proc.admin_endpoint, ["web"], allowedTargetCIDRs=LOOPBACK_TARGETS)
        yield proc, name
        custom.delete_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers", name=name)
