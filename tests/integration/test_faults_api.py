"""The API server (and etcd) killed and restarted under traffic, on a control plane of this module's own:
nothing leaves HAProxy while the API is away, the operator reconnects and converges, handlers hear
each transition under one id. Also: a rotated token is reloaded on 401, and readiness gate patches
are held to the pod UID they were computed for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from poolkeeper.controller.readiness import ReadinessGates, gate_type
from poolkeeper.core.model import InstanceState, MemberReport, MemberState, Phase
from poolkeeper.kube.api import KubeApi, resource_path
from poolkeeper.kube.credentials import SERVICE_ACCOUNT_DIR_ENV, load_credentials
from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.pki import ensure_pki
from poolkeeper_dev.rollout import NO_ERRORS, backend_errors
from poolkeeper_dev.standin_kubelet import FakeKubelet
from poolkeeper_dev.traffic import LoadGenerator
from poolkeeper_dev.workload import Workload
from support.kube import api_client_for, condition, control_plane, create, get, namespace_name, pod_pool, wait_for
from support.pools import (
    LOOPBACK_TARGETS,
    ha_backend,
    haproxy_servers,
    haproxy_stats,
    load_balancer,
    rotation,
)
from support.receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
OUTAGE = 8.0  # seconds the component stays down


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane these tests may kill: never the session's."""
    with control_plane(tmp_path_factory.mktemp("faults-cluster")) as own:
        yield own


@pytest.fixture(scope="module")
def own_api(own_cluster: Cluster) -> Iterator[client.ApiClient]:
    with api_client_for(own_cluster.kubeconfig) as api:
        yield api


@pytest.fixture(scope="module")
def own_kubelet(own_cluster: Cluster) -> Iterator[FakeKubelet]:
    stand_in = FakeKubelet(str(own_cluster.kubeconfig))
    stand_in.ensure_node()
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def own_operator(own_cluster: Cluster, own_kubelet: FakeKubelet,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(own_cluster.kubeconfig, tmp_path_factory.mktemp("faults-operator"),
                           extra_args=("--http-allowed-cidrs", "127.0.0.0/8"))
    try:
        proc.start()
    except RuntimeError as exc:
        pytest.fail(f"the operator could not start: {exc}", pytrace=False)
    yield proc
    proc.stop()


@pytest.fixture()
def own_namespace(own_api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    name = namespace_name("f", request.node.name)
    core = client.CoreV1Api(own_api)
    core.create_namespace(body={"metadata": {"name": name}})
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name=name)


def one_id_per_transition(receiver: Receiver, path: str) -> dict[tuple[str, str], set[str]]:
    """(subject, event type) -> the ids it was delivered under: at-least-once means one id, maybe resent."""
    ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for item in receiver.on(path):
        ids[(item.headers.get("ce-subject", ""), item.headers.get("ce-type", ""))].add(item.event_id)
    return ids


def watch_log(log: Path, offset: int, says: str) -> dict[str, int]:
    """Watch path -> how many of the operator's "watch of PATH ..." lines from `offset` on say `says`."""
    counts: dict[str, int] = defaultdict(int)
    with log.open("rb") as handle:
        handle.seek(offset)
        for line in handle.read().decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                message = str(json.loads(line).get("message", ""))
                if message.startswith("watch of ") and says in message:
                    counts[message.split()[2]] += 1
    return dict(counts)


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_control_plane_outage_under_traffic_removes_nothing_and_converges(
        component: str, own_cluster: Cluster, own_api: client.ApiClient, own_kubelet: FakeKubelet,
        own_operator: OperatorProcess, own_namespace: str, receiver: Receiver, tmp_path: Path) -> None:
    custom = client.CustomObjectsApi(own_api)
    ns = own_namespace
    haproxy = HAProxyProcess(tmp_path / "haproxy", backends=("web",))
    haproxy.start()
    lb = f"lb-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, lb, haproxy.admin_endpoint, ["web"], allowedTargetCIDRs=LOOPBACK_TARGETS)
    fleet = Workload(own_kubelet, ns, "web")
    load: LoadGenerator | None = None
    try:
        hook = f"/faults/{ns}"
        create(custom, ns, "lifecyclehandlers", {"kind": "LifecycleHandler", "metadata": {"name": "rec"}, "spec": {
            "poolRef": {"name": "web"}, "events": ["up", "registered", "draining", "down", "deregistered"],
            "function": {"type": "HTTP", "http": {"url": receiver.url(hook)}}}})
        create(custom, ns, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                   backend=ha_backend(lb, "web"), delay=5))
        wait_for(lambda: condition(get(custom, ns, "lifecyclehandlers", "rec"), "Ready").get("status") == "True",
                 20, "the handler Ready")
        for i in range(4):
            fleet.add(f"web-{i}")
        wait_for(lambda: len(haproxy_servers(haproxy, "web")) == 4, 30, "4 servers")
        wait_for(lambda: len(one_id_per_transition(receiver, hook)) >= 8, 30, "up + registered of 4 pods")
        before = rotation(haproxy, "web")
        assert len(before) == 4 and all(admin == "0" for _, admin, _ in before.values()), before
        stats_before = haproxy_stats(haproxy, "web")
        load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=200).start(duration=180)
        wait_for(lambda: load.snapshot().ok > 50, 10, "traffic flowing")

        log_mark = own_operator.log_path.stat().st_size
        own_cluster.kill_component(component)
        down_at, polls = time.monotonic(), 0
        while time.monotonic() - down_at < OUTAGE:
            assert rotation(haproxy, "web") == before, f"HAProxy changed while {component} was away"
            polls += 1
            time.sleep(0.2)
        restarting = time.monotonic()
        own_cluster.restart_component(component)
        back_at = time.monotonic()
        # A change made once the API is back is applied: a new pod joins; nothing else moved meanwhile.
        fleet.add("web-new")
        wait_for(lambda: len(haproxy_servers(haproxy, "web")) == 5, 60, "the new pod applied after the outage")
        recovered = time.monotonic() - back_at
        after = rotation(haproxy, "web")
        assert {k: v for k, v in after.items() if k in before} == before
        wait_for(lambda: sum(1 for (subject, _) in one_id_per_transition(receiver, hook)
                             if subject.endswith("/web-new")) >= 2, 30, "up + registered of the new pod")
        report = load.stop()
        load = None
        print(f"\n{component} down {OUTAGE:.0f}s ({polls} HAProxy polls, unchanged); restarted in "
              f"{back_at - restarting:.1f}s, API ready -> change applied in {recovered:.2f}s; "
              f"{report.ok} requests ok, {report.failed} failed")
        assert report.ok > 500 and report.failed == 0, report.failures
        assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
        stats_after = haproxy_stats(haproxy, "web")
        for name in stats_before:  # never removed and re-added (the counters would have reset)
            assert int(stats_after[name]["stot"]) > int(stats_before[name]["stot"]), name
        ids = one_id_per_transition(receiver, hook)
        assert all(len(found) == 1 for found in ids.values()), {k: v for k, v in ids.items() if len(v) > 1}
        retries = watch_log(own_operator.log_path, log_mark, "retrying in")
        relists = watch_log(own_operator.log_path, log_mark, "410 Gone")
        print(f"watch retries per informer: {retries}; relists after 410 Gone: {relists}")
        assert all(count <= 12 for count in retries.values()), retries  # backoff, not a busy loop
        if component == "kube-apiserver":  # (with etcd away the API server keeps the watches open)
            assert len(retries) == 7, retries  # every kind's watch broke and was retried
        assert own_operator.proc is not None and own_operator.proc.poll() is None
        assert own_operator.ready_once()
    finally:
        if load is not None:
            load.stop()
        fleet.stop_all()
        custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers",
                                            name=lb)
        haproxy.stop()


def _refused(server: str, token: str, ca: Path) -> bool:
    """Whether the API server answers 401 to this token now (its token cache may hold it a few seconds)."""
    request = urllib.request.Request(f"{server}/api", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=5):
            return False
    except urllib.error.HTTPError as exc:
        return exc.code == 401


def test_a_rotated_service_account_token_is_reloaded_on_401(
        own_cluster: Cluster, own_namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = own_namespace
    run = own_cluster.kubectl_run
    run("create", "serviceaccount", "rotor", "-n", ns)
    run("create", "rolebinding", "rotor-view", "--clusterrole=view", f"--serviceaccount={ns}:rotor", "-n", ns)
    for secret in ("bound-1", "bound-2"):
        run("create", "secret", "generic", secret, "-n", ns)

    def token(secret: str) -> str:
        return run("create", "token", "rotor", "-n", ns, "--bound-object-kind=Secret",
                   f"--bound-object-name={secret}", "--duration=1h").stdout.strip()

    folder = tmp_path / "serviceaccount"  # as the kubelet projects it: token, ca.crt, namespace
    folder.mkdir()
    ca = ensure_pki(own_cluster.root / "pki").ca_cert
    (folder / "ca.crt").write_bytes(ca.read_bytes())
    (folder / "namespace").write_text(ns)
    first = token("bound-1")
    (folder / "token").write_text(first)
    port = own_cluster.state["apiserver_port"]
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv(SERVICE_ACCOUNT_DIR_ENV, str(folder))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    pods = resource_path("v1", "pods", ns)

    async def rotate() -> None:
        api = KubeApi(load_credentials(), reload=load_credentials)
        watcher = KubeApi(load_credentials(), reload=load_credentials)
        try:
            assert (await api.get(pods))["kind"] == "PodList"
            await asyncio.to_thread(run, "delete", "secret", "bound-1", "-n", ns)  # the first token is void ...
            await asyncio.to_thread(wait_for, lambda: _refused(own_cluster.server, first, ca), 30,
                                    "the API server to refuse the first token")
            (folder / "token").write_text(await asyncio.to_thread(token, "bound-2"))  # ... the kubelet wrote anew
            assert (await api.get(pods))["kind"] == "PodList"  # a request: 401, reload, retried
            limits = aiohttp.ClientTimeout(total=10)
            async with watcher.stream(pods, {"watch": "1", "timeoutSeconds": "1"}, limits) as resp:
                assert resp.status == 200  # a watch: 401, reload, reopened
            assert api.reloads == 1 and watcher.reloads == 1
        finally:
            await api.close()
            await watcher.close()

    asyncio.run(rotate())


def test_readiness_gate_patches_are_for_the_pod_uid_they_were_computed_for(
        own_cluster: Cluster, own_api: client.ApiClient, own_kubelet: FakeKubelet, own_namespace: str) -> None:
    ns, gate = own_namespace, gate_type("web")
    core = client.CoreV1Api(own_api)

    def make_pod() -> str:
        own_kubelet.create_pod(ns, "p", {"app": "web"}, gates=(gate,))
        return str(core.read_namespaced_pod("p", ns).metadata.uid)

    def gate_condition() -> Any:
        pod = core.read_namespaced_pod("p", ns)
        return next((c for c in pod.status.conditions or [] if c.type == gate), None)

    old_uid = make_pod()
    own_kubelet.finish_termination(ns, "p")
    wait_for(lambda: not core.list_namespaced_pod(ns).items, 10, "the old pod gone")
    new_uid = make_pod()
    assert new_uid != old_uid
    report = MemberReport("pk-1", f"Pod/{ns}/p", "127.0.0.1", 80, MemberState.ACTIVE, "", "")

    def state(uid: str, shown: str | None) -> InstanceState:
        return InstanceState("Pod", ns, "p", uid, "127.0.0.1", {"app": "web"}, Phase.UP, "",
                             {gate: shown} if shown else {})

    async def sync(uid: str, shown: str | None) -> int:
        api = KubeApi(load_credentials(str(own_cluster.kubeconfig)))
        gates = ReadinessGates(api)
        try:
            await gates.sync("web", [state(uid, shown)], {report.instance: report})
        finally:
            await api.close()
        return gates.writes

    # A reconcile that still saw the old pod: its Registered=True must not land on the new pod.
    assert asyncio.run(sync(old_uid, "False")) == 0
    assert gate_condition() is None
    assert asyncio.run(sync(new_uid, "False")) == 1
    written = gate_condition()
    assert written is not None and written.status == "True" and written.reason == "Registered"
    # The same status again (a restarted operator seeing True): nothing written, the transition time kept.
    assert asyncio.run(sync(new_uid, "True")) == 0
    assert gate_condition().last_transition_time == written.last_transition_time
