"""Mixed pools and shared backends through a real HAProxy with real traffic (issue 11, section 3).

- One pool takes Pods and Instances (VMs) into one backend, each source with a weight; the
  service moves from the VMs to the Pods by shifting weight in steps, in place.
- Two operators on two API servers, with different --cluster-id, share one backend that also
  has a server from the HAProxy config: each adds and removes only its own servers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from poolkeeper.agent import report_heartbeat
from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.rollout import NO_ERRORS, ErrorWatch
from poolkeeper_dev.traffic import HTTPBackend, LoadGenerator, start_backend
from support.kube import api_client_for, control_plane, create, delete, events_for, get, started, wait_for
from support.pools import LOOPBACK_TARGETS, Workloads, ha_backend, load_balancer, members, servers_state

REPO = Path(__file__).resolve().parents[2]
STEPS = ((256, 0), (192, 64), (128, 128), (64, 192), (0, 256))  # (VM weight, Pod weight)
TOLERANCE = 0.08  # of all requests in a window; roundrobin follows weights far more closely


def servers(haproxy: HAProxyProcess, backend: str) -> dict[str, tuple[str, str, str]]:
    """Every server of the backend, ours and the config's: name -> (address, admin state, weight)."""
    out = {}
    for line in servers_state(haproxy, backend)[2:]:
        parts = line.split()
        if len(parts) > 7:
            out[parts[3]] = (parts[4], parts[6], parts[7])
    return out


def vm(custom: client.CustomObjectsApi, kubeconfig: Path, namespace: str, name: str, address: str) -> None:
    """An Instance that is up (a heartbeat said running) at `address`."""
    create(custom, namespace, "instances", {"kind": "Instance", "metadata": {"name": name, "labels": {"group": "vms"}},
                                            "spec": {"address": address}})
    report_heartbeat(name, namespace=namespace, state="running", kubeconfig=str(kubeconfig))


def active(custom: client.CustomObjectsApi, namespace: str, pool: str) -> int:
    return sum(1 for m in members(custom, namespace, pool).values() if m["state"] == "Active")


def sources(vm_weight: int, pod_weight: int) -> list[dict[str, Any]]:
    return [{"kind": "Instance", "selector": {"matchLabels": {"group": "vms"}}, "weight": vm_weight},
            {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}, "weight": pod_weight}]


SLICE_BACKEND = {"type": "EndpointSlice", "endpointSlice": {"serviceName": "web"}}
HA_BACKEND = {"type": "HAProxy", "haproxy": {"loadBalancerRef": {"name": "edge"}, "backend": "web"}}
POD_SOURCE = {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}}
EC2 = {"region": "us-east-1", "tags": {"app": "web"}, "queueURL": "https://sqs.us-east-1.amazonaws.com/1/q"}
EC2_SOURCE = {"kind": "EC2", "ec2": EC2}


@pytest.mark.parametrize(("spec", "message"), [
    ({"source": POD_SOURCE, "sources": [POD_SOURCE], "backend": HA_BACKEND},
     "set exactly one of spec.source (one source) and spec.sources"),
    ({"backend": HA_BACKEND}, "set exactly one of spec.source (one source) and spec.sources"),
    ({"sources": [{**POD_SOURCE, "weight": 2}], "backend": SLICE_BACKEND},
     "spec.sources[].weight needs an HAProxy backend: EndpointSlice and ELBv2 targets have no weights"),
    ({"sources": [{**POD_SOURCE, "weight": 257}], "backend": HA_BACKEND}, "less than or equal to 256"),
    ({"sources": [{"kind": "Instance"}], "backend": HA_BACKEND},
     "spec.sources[].selector is required when kind is Pod or Instance"),
    ({"sources": [], "backend": HA_BACKEND}, "should have at least 1 items"),
    ({"sources": [POD_SOURCE, EC2_SOURCE, {**EC2_SOURCE, "weight": 3}], "backend": HA_BACKEND},
     "a pool takes at most one EC2 source"),
    ({"sources": [POD_SOURCE, {**EC2_SOURCE, "selector": {}}], "backend": HA_BACKEND},
     "an EC2 source selects instances with spec.sources[].ec2.tags"),
    ({"sources": [{**POD_SOURCE, "ec2": EC2}], "backend": HA_BACKEND}, "spec.sources[].ec2 is only for kind EC2"),
    ({"sources": [POD_SOURCE, {"kind": "EC2"}], "backend": HA_BACKEND}, "an EC2 source selects instances with"),
    ({"sources": [POD_SOURCE, {**EC2_SOURCE, "ec2": {**EC2, "tags": {}}}], "backend": HA_BACKEND},
     "should have at least 1 properties"),
], ids=["both", "neither", "weight-endpointslice", "weight-range", "selector", "empty", "two-ec2", "ec2-selector",
        "pod-with-ec2", "ec2-without-ec2", "ec2-no-tags"])
def test_schema_refuses_bad_sources_with_a_human_message(
        namespace: str, custom: client.CustomObjectsApi, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiException) as refused:
        create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "bad"},
                                                  "spec": {"port": 80, **spec}})
    assert refused.value.status == 422 and message in str(refused.value.body), refused.value.body


def test_schema_accepts_sources_and_weights_where_they_apply(namespace: str, custom: client.CustomObjectsApi) -> None:
    create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "weighted"}, "spec": {
        "port": 80, "sources": [{**POD_SOURCE, "weight": 0}, {"kind": "Node", "weight": 256}],
        "backend": HA_BACKEND}})
    create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "slices"}, "spec": {
        "port": 80, "sources": [POD_SOURCE, {"kind": "Instance", "selector": {}}], "backend": SLICE_BACKEND}})
    assert get(custom, namespace, "targetpools", "weighted")["spec"]["sources"][1] == {"kind": "Node", "weight": 256}
    create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "vms-to-pods"}, "spec": {
        "port": 80, "sources": [{**EC2_SOURCE, "weight": 192}, {**POD_SOURCE, "weight": 64}], "backend": HA_BACKEND}})
    assert get(custom, namespace, "targetpools", "vms-to-pods")["spec"]["sources"][0] == {**EC2_SOURCE, "weight": 192}


@pytest.fixture()
def haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web",))
    proc.start()
    yield proc
    proc.stop()


def test_weight_shift_moves_a_service_from_vms_to_pods_without_a_failed_request(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        cluster: Cluster, workloads: Workloads, haproxy: HAProxyProcess) -> None:
    lb = f"mixed-{namespace[-6:]}"
    load_balancer(custom, lb, haproxy.admin_endpoint, ["web"], allowedTargetCIDRs=LOOPBACK_TARGETS)
    fleet = workloads("web")
    pods = {fleet.add(f"web-{i}") for i in range(2)}
    vms: list[HTTPBackend] = []
    try:
        for i in range(2):
            vms.append(start_backend(f"127.250.{i}.1", fleet.port))  # the pool's one port, as on the pods
            vm(custom, cluster.kubeconfig, namespace, f"vm-{i}", vms[-1].address)
        create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "web"}, "spec": {
            "sources": sources(*STEPS[0]), "port": fleet.port, "backend": ha_backend(lb, "web"),
            "deregistrationDelaySeconds": 30}})
        wait_for(lambda: active(custom, namespace, "web") == 4, 30, "2 VMs and 2 pods active")
        # the Source column names every kind of spec.sources (a printer column shows one value of a list)
        row = cluster.kubectl_run("get", "tp", "web", "-n", namespace, "--no-headers").stdout.split()
        assert row[1:3] == ["Instance,Pod", "HAProxy"], row
        names = set(servers(haproxy, "web"))
        assert len(names) == 4
        vm_names = {v.name for v in vms}
        pod_names = {f"{ip}:{fleet.port}" for ip in pods}
        load = LoadGenerator(haproxy.frontend_url("web"), connections=8, rate=400).start(duration=120)
        watch = ErrorWatch(haproxy.admin_endpoint, "web").start()
        shares = []
        try:
            for vm_weight, pod_weight in STEPS:
                spec = get(custom, namespace, "targetpools", "web")["spec"]
                if spec["sources"] != sources(vm_weight, pod_weight):
                    custom.patch_namespaced_custom_object(
                        group="poolkeeper.dev", version="v1alpha1", namespace=namespace, plural="targetpools",
                        name="web", body={"spec": {"sources": sources(vm_weight, pod_weight)}})
                want = {str(vm_weight)} | {str(pod_weight)}
                wait_for(lambda w=want: {s[2] for s in servers(haproxy, "web").values()} == w,  # type: ignore[misc]
                         20, f"weights {vm_weight}/{pod_weight} in HAProxy")
                before = load.snapshot()
                wait_for(lambda b=before: load.snapshot().ok - b.ok >= 400, 30, "a window of traffic")  # type: ignore[misc]
                served = load.snapshot().served_by - before.served_by
                window = Counter({k: v for k, v in served.items()})
                total = sum(window.values())
                vm_share = sum(window[n] for n in vm_names) / total
                assert sum(window[n] for n in vm_names | pod_names) == total  # nothing else serves
                expected = vm_weight / (vm_weight + pod_weight)
                shares.append((vm_weight, pod_weight, round(vm_share, 3)))
                assert abs(vm_share - expected) <= TOLERANCE, shares
                assert set(servers(haproxy, "web")) == names  # weights change in place: no server re-added
        finally:
            report = load.stop()
            errors = watch.stop().errors()
        assert report.failed == 0, report.failures
        assert errors == NO_ERRORS, errors
        assert report.total >= 5 * 400, report
        final = {**{f"Instance/{namespace}/vm-{i}": 0 for i in range(2)},
                 **{f"Pod/{namespace}/web-{i}": 256 for i in range(2)}}
        wait_for(lambda: {r: m.get("weight") for r, m in members(custom, namespace, "web").items()} == final,
                 10, "status.members[].weight as in HAProxy")
        assert all(m["state"] == "Active" for m in members(custom, namespace, "web").values())
        wait_for(lambda: any(r == "WeightChanged" and f"Instance/{namespace}/vm-0 to 0" in m
                             for r, m in events_for(core, namespace, "web")), 10, "a WeightChanged Event")
    finally:
        for backend in vms:
            backend.stop()


# ----- two operators, two API servers, one backend
@pytest.fixture(scope="module")
def other_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A second control plane: the other cluster sharing the backend."""
    with control_plane(tmp_path_factory.mktemp("other-cluster"), "the second control plane") as other:
        yield other


@pytest.fixture(scope="module")
def other_operator(other_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(other_cluster.kubeconfig, tmp_path_factory.mktemp("other-operator"),
                           extra_args=("--cluster-id", "east-2"))
    yield started(proc, "the second operator")
    proc.stop()


@pytest.fixture()
def static(tmp_path: Path) -> Iterator[HTTPBackend]:
    backend = start_backend("127.251.0.1")
    yield backend
    backend.stop()


@pytest.fixture()
def shared_haproxy(tmp_path: Path, static: HTTPBackend) -> Iterator[HAProxyProcess]:
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web",), declared={"web": static.name})
    proc.start()
    yield proc
    proc.stop()


def test_two_clusters_share_one_backend_and_touch_only_their_own_servers(
        running_operator: OperatorProcess, other_operator: OperatorProcess, other_cluster: Cluster,
        namespace: str, custom: client.CustomObjectsApi, workloads: Workloads, shared_haproxy: HAProxyProcess,
        static: HTTPBackend) -> None:
    haproxy = shared_haproxy
    static_before = servers(haproxy, "web")["static"]
    lb = f"shared-{namespace[-6:]}"
    load_balancer(custom, lb, haproxy.admin_endpoint, ["web"], allowedTargetCIDRs=LOOPBACK_TARGETS)
    fleet = workloads("web")  # cluster 1 (default cluster id): pods
    for i in range(2):
        fleet.add(f"web-{i}")
    create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "web"}, "spec": {
        "source": {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}}, "port": fleet.port,
        "backend": ha_backend(lb, "web"), "deregistrationDelaySeconds": 30}})
    with api_client_for(other_cluster.kubeconfig) as api:  # cluster 2 (--cluster-id east-2): VMs
        other = client.CustomObjectsApi(api)
        other_ns = namespace  # the same namespace/name in both clusters: only the cluster id tells them apart
        client.CoreV1Api(api).create_namespace(body={"metadata": {"name": other_ns}})
        load_balancer(other, lb, haproxy.admin_endpoint, ["web"], allowedTargetCIDRs=LOOPBACK_TARGETS)
        vms = [start_backend(f"127.252.{i}.1", fleet.port) for i in range(2)]
        try:
            for i, backend in enumerate(vms):
                vm(other, other_cluster.kubeconfig, other_ns, f"vm-{i}", backend.address)
            create(other, other_ns, "targetpools", {"kind": "TargetPool", "metadata": {"name": "web"}, "spec": {
                "source": {"kind": "Instance", "selector": {"matchLabels": {"group": "vms"}}}, "port": fleet.port,
                "backend": ha_backend(lb, "web"), "deregistrationDelaySeconds": 30}})
            wait_for(lambda: active(custom, namespace, "web") == 2 and active(other, other_ns, "web") == 2,
                     30, "both clusters' members active")
            assert get(custom, namespace, "targetpools", "web")["status"]["clusterID"] == ""
            assert get(other, other_ns, "targetpools", "web")["status"]["clusterID"] == "east-2"

            def own(prefix: str) -> dict[str, tuple[str, str, str]]:
                return {n: s for n, s in servers(haproxy, "web").items() if n.startswith(prefix)}

            ours, theirs = own("pk-"), own("pk.east-2.")
            assert len(ours) == 2 and len(theirs) == 2
            assert set(servers(haproxy, "web")) == {*ours, *theirs, "static"}
            load = LoadGenerator(haproxy.frontend_url("web"), connections=8, rate=300).start(duration=120)
            watch = ErrorWatch(haproxy.admin_endpoint, "web").start()
            try:
                wait_for(lambda: load.snapshot().ok >= 100, 10, "traffic flowing")
                # cluster 1 scales in: a pod drains and goes; cluster 2's servers stay as they are
                fleet.begin_termination("web-0")
                wait_for(lambda: len(own("pk-")) == 1, 30, "cluster 1's pod drained and removed")
                fleet.finish_termination("web-0")
                assert own("pk.east-2.") == theirs
                # cluster 2 scales in: a VM stops; cluster 1's servers stay as they are
                ours = own("pk-")
                report_heartbeat("vm-0", namespace=other_ns, state="stopping", kubeconfig=str(other_cluster.kubeconfig))
                wait_for(lambda: len(own("pk.east-2.")) == 1, 30, "cluster 2's VM drained and removed")
                vms[0].stop()
                assert own("pk-") == ours
                # cluster 2's pool goes: its last server leaves, nothing else does
                delete(other, other_ns, "targetpools", "web")
                wait_for(lambda: not own("pk.east-2."), 30, "cluster 2's servers all removed")
                assert own("pk-") == ours
                wait_for(lambda: load.snapshot().ok >= 1000, 20, "traffic on the servers left")
            finally:
                report = load.stop()
                errors = watch.stop().errors()
            assert report.failed == 0, report.failures
            assert errors == NO_ERRORS, errors
            assert servers(haproxy, "web")["static"] == static_before  # the config's server: never touched
            assert report.served_by[static.name] > 0
        finally:
            for backend in vms:
                backend.stop()
