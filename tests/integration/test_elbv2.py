"""ELBv2 target groups as a backend, against moto's server mode (an emulator: it registers and
deregisters at once and reports every registered target healthy; see the README for what that
does not prove). Throttling comes from a small proxy in front of moto (tests/support/aws.py).

The operator is the real one, on the real API server; pods are the stand-in kubelet's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from poolkeeper.aws.elbv2_client import ELBv2Client
from poolkeeper_dev.operator_process import OperatorProcess
from support.aws import DUMMY_KEYS, REGION, MotoServer, ThrottlingProxy, emulator
from support.kube import condition, create, delete, get, pod_pool, wait_for
from support.pools import LOOPBACK_TARGETS, Workloads

pytestmark = pytest.mark.cluster
LBS = {"group": "poolkeeper.dev", "version": "v1alpha1", "plural": "loadbalancers"}
FOREIGN = ("127.1.2.3", 9000)  # a target the admin registered by hand: poolkeeper must never touch it


@pytest.fixture(scope="module")
def aws() -> Iterator[tuple[MotoServer, ThrottlingProxy]]:
    yield from emulator()


@pytest.fixture()
def elbv2(aws: tuple[MotoServer, ThrottlingProxy]) -> Any:
    """A boto3 client straight to moto (the test's own view, not through the proxy)."""
    return boto3.client("elbv2", endpoint_url=aws[0].url, region_name=REGION,
                        aws_access_key_id="admin", aws_secret_access_key="admin")


@pytest.fixture()
def lbs(custom: client.CustomObjectsApi) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        with contextlib.suppress(ApiException):
            custom.delete_cluster_custom_object(**LBS, name=name)


def target_group(aws: tuple[MotoServer, ThrottlingProxy], tags: dict[str, str] | None = None,
                 target_type: str = "ip") -> str:
    ec2 = boto3.client("ec2", endpoint_url=aws[0].url, region_name=REGION, aws_access_key_id="admin",
                       aws_secret_access_key="admin")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    elb = boto3.client("elbv2", endpoint_url=aws[0].url, region_name=REGION, aws_access_key_id="admin",
                       aws_secret_access_key="admin")
    extra = {"Tags": [{"Key": k, "Value": v} for k, v in tags.items()]} if tags else {}
    group = elb.create_target_group(Name=f"web-{uuid.uuid4().hex[:8]}", Protocol="HTTP", Port=80, VpcId=vpc,
                                    TargetType=target_type, **extra)
    arn: str = group["TargetGroups"][0]["TargetGroupArn"]
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": FOREIGN[0], "Port": FOREIGN[1]}])
    return arn


def credentials(core: client.CoreV1Api, namespace: str, key_id: str) -> dict[str, str]:
    data = {"aws_access_key_id": key_id, "aws_secret_access_key": DUMMY_KEYS["AWS_SECRET_ACCESS_KEY"]}
    core.create_namespaced_secret(namespace=namespace, body={"metadata": {"name": "aws"}, "data": {
        k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    return {"namespace": namespace, "name": "aws"}


def make_lb(custom: client.CustomObjectsApi, lbs: list[str], proxy: ThrottlingProxy, groups: list[dict[str, Any]],
            secret: dict[str, str]) -> str:
    name = f"aws-{uuid.uuid4().hex[:6]}"
    custom.create_cluster_custom_object(**LBS, body={
        "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": name},
        "spec": {"type": "ELBv2", "allowedTargetCIDRs": LOOPBACK_TARGETS,
                 "elbv2": {"region": REGION, "endpointURL": proxy.url, "credentialsSecretRef": secret,
                           "targetGroups": groups}}})
    lbs.append(name)
    return name


def elb_backend(lb: str, arn: str) -> dict[str, Any]:
    return {"type": "ELBv2", "elbv2": {"loadBalancerRef": {"name": lb}, "targetGroupARN": arn, "targetType": "ip"}}


def registered(elbv2: Any, arn: str) -> dict[tuple[str, int], str]:
    found = elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
    return {(d["Target"]["Id"], d["Target"]["Port"]): d["TargetHealth"]["State"] for d in found}


def synced(custom: client.CustomObjectsApi, namespace: str, pool: str, reason: str,
           timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (c := condition(get(custom, namespace, "targetpools", pool), "Synced")) and
                    c.get("reason") == reason and c, timeout, f"{namespace}/{pool} Synced reason {reason}")


def test_targets_follow_pods_health_and_gates_and_only_own_targets_leave(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, aws: tuple[MotoServer, ThrottlingProxy], elbv2: Any, lbs: list[str]) -> None:
    proxy = aws[1]
    arn = target_group(aws)
    lb = make_lb(custom, lbs, proxy, [{"arn": arn}], credentials(core, namespace, "pool-key"))
    wait_for(lambda: (c := condition(custom.get_cluster_custom_object(**LBS, name=lb), "Reachable")) and
             c.get("status") == "True", 20, "LoadBalancer Reachable")
    accepted = condition(custom.get_cluster_custom_object(**LBS, name=lb), "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("True", "TargetGroupsListed")
    gate = "poolkeeper.dev/web"
    fleet = workloads("web", gates=(gate,))
    ips = [fleet.add(f"web-{i}") for i in range(3)]
    create(custom, namespace, "targetpools", pod_pool("web", app="web", port=fleet.port,
                                                       backend=elb_backend(lb, arn), delay=5))

    def pool() -> dict[str, Any]:
        return get(custom, namespace, "targetpools", "web")

    wait_for(lambda: pool().get("status", {}).get("active") == 3, 30, "3 members Active")
    assert set(registered(elbv2, arn)) == {*((ip, fleet.port) for ip in ips), FOREIGN}
    status = pool()["status"]
    assert {(m["address"], m["state"], m["health"]) for m in status["members"]} == {
        (ip, "Active", "UP") for ip in ips}
    assert {(t["id"], t["port"]) for t in status["elbv2Targets"]} == {(ip, fleet.port) for ip in ips}
    assert condition(pool(), "Ready")["status"] == "True"
    assert status["placements"] == [{"type": "ELBv2", "loadBalancer": lb, "targetGroupARN": arn}]
    # one batched RegisterTargets for the three pods, signed with the Secret's key
    assert proxy.targets_per_call["RegisterTargets"][0] == 3
    assert "pool-key" in proxy.access_keys
    wait_for(lambda: custom.get_cluster_custom_object(**LBS, name=lb).get("status", {}).get("pools") == 1, 20,
             "the LoadBalancer counts its pool")

    def gate_true(pod: str) -> bool:
        obj = core.read_namespaced_pod(name=pod, namespace=namespace)
        return any(c.type == gate and c.status == "True" for c in obj.status.conditions or [])

    wait_for(lambda: all(gate_true(f"web-{i}") for i in range(3)), 20, "readiness gates True")

    # a pod that leaves: its target is deregistered; the admin's target stays
    fleet.begin_termination("web-0")
    wait_for(lambda: (ips[0], fleet.port) not in registered(elbv2, arn), 30, "web-0 deregistered")
    fleet.finish_termination("web-0")
    wait_for(lambda: pool()["status"].get("active") == 2 and len(pool()["status"]["elbv2Targets"]) == 2, 30,
             "2 members, 2 owned targets")
    assert FOREIGN in registered(elbv2, arn)

    # a pod at the address of a target poolkeeper did not register: refused, left alone
    elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": "127.1.2.4", "Port": fleet.port}])
    fleet.kubelet.create_pod(namespace, "intruder", {"app": "web"}, gates=(gate,), port=fleet.port)
    fleet.kubelet.set_ready(namespace, "intruder", "127.1.2.4")
    cond = synced(custom, namespace, "web", "BackendError")
    assert "poolkeeper did not register it" in cond["message"]
    assert ("127.1.2.4", fleet.port) not in {(t["id"], t["port"]) for t in pool()["status"]["elbv2Targets"]}
    fleet.kubelet.delete_pod(namespace, "intruder")
    fleet.kubelet.finish_termination(namespace, "intruder")
    synced(custom, namespace, "web", "Synced")
    assert ("127.1.2.4", fleet.port) in registered(elbv2, arn)

    # the pool goes: its own targets are deregistered, the others stay
    delete(custom, namespace, "targetpools", "web")
    wait_for(lambda: set(registered(elbv2, arn)) == {FOREIGN, ("127.1.2.4", fleet.port)}, 30,
             "only the targets poolkeeper did not register are left")
    wait_for(lambda: not custom.list_namespaced_custom_object("poolkeeper.dev", "v1alpha1", namespace,
                                                              "targetpools")["items"], 30, "pool gone")


def test_instance_targets_are_ec2_instance_ids(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        aws: tuple[MotoServer, ThrottlingProxy], elbv2: Any, lbs: list[str]) -> None:
    ec2 = boto3.client("ec2", endpoint_url=aws[0].url, region_name=REGION, aws_access_key_id="admin",
                       aws_secret_access_key="admin")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    vm = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    arn = target_group(aws, target_type="instance")
    lb = make_lb(custom, lbs, aws[1], [{"arn": arn}], credentials(core, namespace, "instance-key"))
    for name, address, spec in (("vm-1", "127.9.0.1", {"ec2InstanceID": vm}), ("vm-2", "127.9.0.2", {})):
        create(custom, namespace, "instances", {"kind": "Instance", "metadata": {"name": name, "labels": {"app": "vm"}},
                                                "spec": {"address": address, **spec}})
        custom.patch_namespaced_custom_object_status("poolkeeper.dev", "v1alpha1", namespace, "instances", name,
                                                     {"status": {"state": "running"}})
    backend = elb_backend(lb, arn)
    backend["elbv2"]["targetType"] = "instance"
    create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "vms"}, "spec": {
        "source": {"kind": "Instance", "selector": {"matchLabels": {"app": "vm"}}}, "port": 8080,
        "backend": backend, "deregistrationDelaySeconds": 5}})

    def members() -> dict[str, dict[str, Any]]:
        status = get(custom, namespace, "targetpools", "vms").get("status", {})
        return {m["instance"]: m for m in status.get("members") or []}

    wait_for(lambda: members().get(f"Instance/{namespace}/vm-1", {}).get("state") == "Active", 30, "vm-1 Active")
    assert (vm, 8080) in registered(elbv2, arn)
    held = members()[f"Instance/{namespace}/vm-2"]
    assert held["state"] == "Held" and "has no EC2 instance id (spec.ec2InstanceID)" in held["reason"]
    assert set(registered(elbv2, arn)) == {(vm, 8080), FOREIGN}
    delete(custom, namespace, "targetpools", "vms")
    wait_for(lambda: set(registered(elbv2, arn)) == {FOREIGN}, 30, "the instance deregistered with its pool")


def test_throttling_is_retried_with_backoff_and_reported_only_when_persistent(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, aws: tuple[MotoServer, ThrottlingProxy], elbv2: Any, lbs: list[str]) -> None:
    proxy = aws[1]
    arn = target_group(aws)
    lb = make_lb(custom, lbs, proxy, [{"arn": arn}], credentials(core, namespace, "throttle-key"))
    fleet = workloads("api")
    ips = [fleet.add(f"api-{i}") for i in range(2)]
    proxy.throttle("RegisterTargets", 2)  # fewer than the client's attempts: backoff, then success
    create(custom, namespace, "targetpools", pod_pool("api", app="api", port=fleet.port,
                                                       backend=elb_backend(lb, arn), delay=5))
    wait_for(lambda: get(custom, namespace, "targetpools", "api").get("status", {}).get("active") == 2, 40,
             "2 members Active despite throttling")
    assert proxy.throttled["RegisterTargets"] == 2
    assert {(ip, fleet.port) for ip in ips} <= set(registered(elbv2, arn))
    assert condition(get(custom, namespace, "targetpools", "api"), "Synced")["reason"] == "Synced"

    proxy.throttle("DescribeTargetHealth", 1000)  # persistent: every attempt of every reconcile
    fleet.add("api-2")  # a new pod makes the pool reconcile while the API throttles
    cond = synced(custom, namespace, "api", "Throttled", timeout=90)
    assert "Throttling" in cond["message"]
    proxy.throttle("DescribeTargetHealth", 0)  # the work queue's backoff retries; now it goes through
    wait_for(lambda: get(custom, namespace, "targetpools", "api").get("status", {}).get("active") == 3, 90,
             "the new pod registered once throttling stopped")
    assert condition(get(custom, namespace, "targetpools", "api"), "Synced")["reason"] == "Synced"
    delete(custom, namespace, "targetpools", "api")  # while the emulator runs: its finalizer deregisters
    wait_for(lambda: set(registered(elbv2, arn)) == {FOREIGN}, 30, "the pool's targets deregistered")


def test_refused_target_groups_are_never_touched(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, core: client.CoreV1Api,
        workloads: Workloads, aws: tuple[MotoServer, ThrottlingProxy], elbv2: Any, lbs: list[str]) -> None:
    proxy = aws[1]
    theirs = target_group(aws, tags={"elbv2.k8s.aws/cluster": "prod"})
    other_team = target_group(aws)
    unlisted = target_group(aws)
    instances = target_group(aws, target_type="instance")
    secret = credentials(core, namespace, "refusal-key")
    lb = make_lb(custom, lbs, proxy, [
        {"arn": theirs},
        {"arn": other_team, "allowedNamespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "x"}}}},
        {"arn": instances},
    ], secret)
    fleet = workloads("db")
    fleet.add("db-0")
    cases = {"theirs": (theirs, "TargetGroupNotOwned", "elbv2.k8s.aws/cluster"),
             "team": (other_team, "NotAllowed", "spec.elbv2.targetGroups"),
             "unlisted": (unlisted, "NotAllowed", "does not list target group"),
             "types": (instances, "TargetTypeMismatch", "has target type instance")}
    for pool, (arn, _, _) in cases.items():
        create(custom, namespace, "targetpools", pod_pool(pool, app="db", port=fleet.port,
                                                           backend=elb_backend(lb, arn)))
    for pool, (arn, reason, words) in cases.items():
        cond = synced(custom, namespace, pool, reason)
        assert words in cond["message"], cond
        assert set(registered(elbv2, arn)) == {FOREIGN}  # nothing registered, nothing deregistered


async def test_without_a_secret_the_default_credential_chain_signs(
        aws: tuple[MotoServer, ThrottlingProxy], monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentialsSecretRef: the pod's own identity (here the environment's keys) signs."""
    arn = target_group(aws)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "pod-identity-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    for name in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance metadata service
    client = ELBv2Client(REGION, aws[1].url)
    try:
        await client.check([arn])
    finally:
        await client.close()
    assert "pod-identity-key" in aws[1].access_keys


ARN = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef"


@pytest.mark.parametrize(("kind", "spec", "message"), [
    ("LoadBalancer", {"type": "ELBv2"}, "spec.elbv2 must be set when type is ELBv2, and only then"),
    ("LoadBalancer", {"type": "ELBv2", "elbv2": {"region": "us-east-1", "targetGroups": [{"arn": "web"}]}},
     "spec.elbv2.targetGroups[].arn must be a target group ARN"),
    ("LoadBalancer", {"type": "ELBv2", "elbv2": {"region": "us-east-1", "endpointURL": "ftp://x"}},
     "spec.elbv2.endpointURL must be an http:// or https:// URL"),
    ("TargetPool", {"type": "ELBv2"}, "spec.backend.elbv2 must be set when type is ELBv2, and only then"),
    ("TargetPool", {"type": "ELBv2", "elbv2": {"loadBalancerRef": {"name": "aws"}, "targetGroupARN": ARN,
                                               "targetType": "lambda"}}, 'Unsupported value: "lambda"'),
])
def test_invalid_elbv2_specs_are_rejected(namespace: str, custom: client.CustomObjectsApi, kind: str,
                                          spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiException) as refused:
        if kind == "LoadBalancer":
            custom.create_cluster_custom_object(**LBS, body={
                "apiVersion": "poolkeeper.dev/v1alpha1", "kind": kind, "metadata": {"name": "bad-elbv2"},
                "spec": spec})
        else:
            create(custom, namespace, "targetpools", pod_pool("bad", app="x", backend=spec))
    assert message in json.loads(refused.value.body)["message"], refused.value.body
