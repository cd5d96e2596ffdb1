"""EC2 instances as a pool source, against moto's server mode (AWS stand-in on loopback) and a real
HAProxy with real traffic.

moto gives instances private IPs of a VPC we cannot reach, so each instance carries a tag
`poolkeeper.dev/address` with the loopback address of the HTTP server standing in for it, and the
pools use `addressTag` (a documented field, e.g. for instances reached through a NAT): what the
test proves is everything from tags and events to HAProxy, not the private-IP lookup itself.
moto does not route EventBridge events: the test sends them to the queue in EventBridge's shape.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from test_lifecycle import handler, http
from test_mixed_pools import TOLERANCE, servers

from poolkeeper.core.ec2 import Ec2Source
from poolkeeper.sources.ec2 import Ec2Feed
from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.ports import free_port
from poolkeeper_dev.rollout import NO_ERRORS, ErrorWatch, backend_errors
from poolkeeper_dev.traffic import HTTPBackend, LoadGenerator, start_backend
from support.aws import CREDENTIALS, REGION, ec2_state_change, lifecycle_message, moto_server, record_lifecycle_actions
from support.aws import client as aws_client
from support.kube import condition, create, delete, events_for, get, started, wait_for
from support.pools import LOOPBACK_TARGETS, Workloads, ha_backend, haproxy_servers, load_balancer, members
from support.receiver import Receiver

ALLOW_LABEL = "poolkeeper.dev/ec2-sources"
ADDRESS_TAG = "poolkeeper.dev/address"
_hosts = itertools.count(1)


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture()
def ec2_operator(operator: OperatorProcess, cluster: Cluster, handlers_dir: Path,
                 tmp_path: Path) -> Iterator[OperatorProcess]:
    """An operator that lends AWS endpoints to namespaces labelled ALLOW_LABEL=allowed. The session's
    operator (which allows none) is stopped meanwhile, or it would refuse the pools and drain them."""
    operator.kill()
    proc = OperatorProcess(cluster.kubeconfig, tmp_path / "ec2-operator", handlers_dir=handlers_dir,
                           extra_args=("--http-allowed-cidrs", "127.0.0.0/8",
                                       "--ec2-source-namespaces", f"{ALLOW_LABEL}=allowed",
                                       "--lifecycle-heartbeat-seconds", "1"))
    yield started(proc)
    proc.stop()


@pytest.fixture()
def haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web",))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture()
def lb_name(custom: client.CustomObjectsApi, haproxy: HAProxyProcess) -> Iterator[str]:
    name = f"ec2-{uuid.uuid4().hex[:6]}"
    load_balancer(custom, name, haproxy.admin_endpoint, ["web"], allowedTargetCIDRs=LOOPBACK_TARGETS)
    yield name
    custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", name=name)


def allow_ec2(core: client.CoreV1Api, namespace: str) -> None:
    core.patch_namespace(name=namespace, body={"metadata": {"labels": {ALLOW_LABEL: "allowed"}}})


def credentials_secret(core: client.CoreV1Api, namespace: str, name: str = "aws") -> None:
    core.create_namespaced_secret(namespace=namespace, body={"metadata": {"name": name}, "data": {
        k: base64.b64encode(v.encode()).decode() for k, v in CREDENTIALS.items()}})


def ec2_pool(name: str, ec2: dict[str, Any], backend: dict[str, Any], port: int) -> dict[str, Any]:
    return {"kind": "TargetPool", "metadata": {"name": name}, "spec": {
        "source": {"kind": "EC2", "ec2": {"region": REGION, **ec2}}, "port": port, "backend": backend,
        "deregistrationDelaySeconds": 30}}


def launch(ec2: Any, tags: dict[str, str]) -> str:
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    reply = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.micro",
                              TagSpecifications=[{"ResourceType": "instance", "Tags": tag_list}])
    return str(reply["Instances"][0]["InstanceId"])


def queue_depth(sqs: Any, url: str, *which: str) -> int:
    """Messages in the queue (by default: visible or in flight)."""
    names = list(which or ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"))
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(attrs[name]) for name in names)


def test_ec2_instances_follow_state_change_events_through_haproxy(
        ec2_operator: OperatorProcess, moto: str, namespace: str, core: client.CoreV1Api,
        custom: client.CustomObjectsApi, haproxy: HAProxyProcess, lb_name: str, receiver: Receiver) -> None:
    ec2, sqs = aws_client("ec2", moto), aws_client("sqs", moto)
    queue = sqs.create_queue(QueueName=f"ec2-events-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    app, port, subnet = f"web-{uuid.uuid4().hex[:5]}", free_port(), 200 + next(_hosts) % 50
    servers: dict[str, HTTPBackend] = {}

    def instance(n: int, **extra: str) -> str:
        address = f"127.{subnet}.0.{n}"
        servers[address] = start_backend(address, port)
        return launch(ec2, {"app": app, ADDRESS_TAG: address, **extra})

    try:
        first, second = instance(1), instance(2)
        launch(ec2, {"app": "someone-else", ADDRESS_TAG: f"127.{subnet}.0.9"})  # not selected
        allow_ec2(core, namespace)
        credentials_secret(core, namespace)
        create(custom, namespace, "lifecyclehandlers", handler("tell", "web", http(receiver.url(f"/ok-{app}")),
                                                               events=["up", "draining", "down"]))
        create(custom, namespace, "targetpools", ec2_pool("web", {
            "endpointURL": moto, "credentialsSecretRef": {"name": "aws"}, "tags": {"app": app}, "queueURL": queue,
            "addressTag": ADDRESS_TAG}, ha_backend(lb_name, "web"), port))

        def heard(instance_id: str) -> list[str]:
            """The `to` of every CloudEvent the handler got for the instance, in order."""
            return [e.data["to"] for e in receiver.on(f"/ok-{app}")
                    if e.data["instance"]["name"] == instance_id]

        def active() -> set[str]:
            return {k for k, m in members(custom, namespace, "web").items() if m["state"] == "Active"}

        wait_for(lambda: active() == {f"EC2/{namespace}/{first}", f"EC2/{namespace}/{second}"}, 30,
                 "the two listed instances Active")
        load = LoadGenerator(haproxy.frontend_url("web"), connections=4, rate=200).start(duration=120)
        try:
            wait_for(lambda: load.snapshot().ok >= 50, 10, "traffic flowing")
            # a launch: known from its events alone (pending, then running), described for its tags
            third = instance(3)
            sqs.send_message(QueueUrl=queue, MessageBody=ec2_state_change(third, "pending"))
            sqs.send_message(QueueUrl=queue, MessageBody=ec2_state_change(third, "running"))
            wait_for(lambda: f"EC2/{namespace}/{third}" in active(), 30, "the launched instance Active")
            # a stop: draining (out of rotation at once, as HAProxy counts no session left), then down
            # once stopped; its server stops only after that
            ec2.stop_instances(InstanceIds=[first])  # the emulator agrees with the events it does not send
            sqs.send_message(QueueUrl=queue, MessageBody=ec2_state_change(first, "stopping"))
            wait_for(lambda: "draining" in heard(first), 20, "stopping instance draining")
            sqs.send_message(QueueUrl=queue, MessageBody=ec2_state_change(first, "stopped"))
            wait_for(lambda: f"EC2/{namespace}/{first}" not in members(custom, namespace, "web"), 40,
                     "stopped instance removed")
            servers.pop(f"127.{subnet}.0.1").stop()
            # a termination straight away
            ec2.terminate_instances(InstanceIds=[second])
            sqs.send_message(QueueUrl=queue, MessageBody=ec2_state_change(second, "shutting-down"))
            sqs.send_message(QueueUrl=queue, MessageBody=ec2_state_change(second, "terminated"))
            wait_for(lambda: set(members(custom, namespace, "web")) == {f"EC2/{namespace}/{third}"}, 40,
                     "terminated instance removed")
        finally:
            report = load.stop()
        assert report.total >= 100, report  # on a quiet machine the whole sequence takes about a second
        assert report.failed == 0, report.failures
        assert backend_errors(haproxy.admin_endpoint, "web") == NO_ERRORS
        assert set(haproxy_servers(haproxy, "web").values()) == {f"127.{subnet}.0.3:{port}"}
        wait_for(lambda: queue_depth(sqs, queue) == 0, 20, "every message deleted once applied")
        # handlers hear EC2 transitions as they hear Pod ones, the instance (its tags) in `data`
        wait_for(lambda: heard(second)[-1:] == ["down"], 20, "the terminated instance's down event")
        assert heard(first) == ["up", "draining", "down"]
        assert heard(second) == ["up", "draining", "down"]
        assert heard(third) == ["up"]
        first_event = receiver.on(f"/ok-{app}")[0]
        assert first_event.headers.get("ce-type", "").endswith(".up")
        assert first_event.headers.get("ce-subject", "").startswith(f"EC2/{namespace}/i-")
        sample = first_event.data
        assert sample["instance"]["kind"] == "EC2"
        assert sample["instance"]["labels"]["app"] == app
        assert sample["instance"]["address"].startswith(f"127.{subnet}.0.")
        reasons = [r for r, _ in events_for(core, namespace, "web")]
        assert "Registered" in reasons and "Deregistered" in reasons
        # a restart that cannot list (its Secret is gone meanwhile): the pool acts on nothing until it
        # has listed, so the member never leaves rotation; once it can, it is in sync again
        load = LoadGenerator(haproxy.frontend_url("web"), connections=2, rate=100).start(duration=90)
        try:
            wait_for(lambda: load.snapshot().ok >= 20, 10, "traffic flowing before the restart")
            ec2_operator.kill()
            core.delete_namespaced_secret(name="aws", namespace=namespace)
            ec2_operator.start()
            wait_for(lambda: condition(get(custom, namespace, "targetpools", "web"), "Synced").get("reason")
                     == "EC2CredentialsNotFound", 30, "the missing Secret said")
            served = load.snapshot().ok
            wait_for(lambda: load.snapshot().ok >= served + 200, 20, "still serving while not listed")
            credentials_secret(core, namespace)
            wait_for(lambda: condition(get(custom, namespace, "targetpools", "web"), "Synced").get("reason")
                     == "Synced", 30, "synced again once it could list")
        finally:
            report = load.stop()
        assert report.failed == 0, report.failures
        assert set(haproxy_servers(haproxy, "web").values()) == {f"127.{subnet}.0.3:{port}"}
    finally:
        for server in servers.values():
            server.stop()


def test_ec2_sources_need_own_credentials_unless_the_admin_allows_the_namespace(
        ec2_operator: OperatorProcess, moto: str, namespace: str, core: client.CoreV1Api,
        custom: client.CustomObjectsApi, haproxy: HAProxyProcess, lb_name: str) -> None:
    queue = aws_client("sqs", moto).create_queue(QueueName=f"ec2-refused-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    backend = ha_backend(lb_name, "web")
    # a namespace the admin did not list: neither the operator's identity nor another endpoint
    create(custom, namespace, "targetpools", ec2_pool("mine", {"tags": {"app": "x"}, "queueURL": queue},
                                                      backend, 8080))
    credentials_secret(core, namespace)
    create(custom, namespace, "targetpools", ec2_pool("elsewhere", {
        "tags": {"app": "y"}, "queueURL": queue, "credentialsSecretRef": {"name": "aws"}, "endpointURL": moto},
        ha_backend(lb_name, "web"), 8080))
    for pool, says in (("mine", "credentialsSecretRef"), ("elsewhere", "endpointURL")):
        synced = wait_for(lambda p=pool: (c := condition(get(custom, namespace, "targetpools", p), "Synced"))  # type: ignore[misc]
                          .get("status") == "False" and c, 20, f"{pool} refused")
        assert synced["reason"] == "EC2SourceNotAllowed" and says in synced["message"], synced
        assert "--ec2-source-namespaces" in synced["message"]
        wait_for(lambda p=pool: any(r == "EC2SourceNotAllowed" for r, _ in events_for(core, namespace, p)),  # type: ignore[misc]
                 10, f"{pool} EC2SourceNotAllowed Event")
    # once allowed, a Secret that is not there is said so (and nothing is acted on)
    for pool in ("mine", "elsewhere"):
        custom.delete_namespaced_custom_object(group="poolkeeper.dev", version="v1alpha1", namespace=namespace,
                                               plural="targetpools", name=pool)
    allow_ec2(core, namespace)
    create(custom, namespace, "targetpools", ec2_pool("nosecret", {
        "tags": {"app": "z"}, "queueURL": queue, "credentialsSecretRef": {"name": "missing"}, "endpointURL": moto},
        ha_backend(lb_name, "web"), 8080))
    synced = wait_for(lambda: (c := condition(get(custom, namespace, "targetpools", "nosecret"), "Synced"))
                      .get("reason") == "EC2CredentialsNotFound" and c, 20, "missing Secret reported")
    assert synced["status"] == "False" and f"Secret {namespace}/missing not found" in synced["message"]
    assert haproxy_servers(haproxy, "web") == {}


async def test_feed_orders_events_and_relists_against_moto(moto: str) -> None:
    """The SQS consumer alone, on the emulator: a late (older) event is dropped, a terminated
    instance leaves, and the re-list (the safety net) catches a change no event told."""
    ec2, sqs = aws_client("ec2", moto), aws_client("sqs", moto)
    queue = sqs.create_queue(QueueName=f"ec2-feed-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    app = f"feed-{uuid.uuid4().hex[:5]}"
    one, two = launch(ec2, {"app": app}), launch(ec2, {"app": app})
    applied: list[tuple[str, str, bool]] = []
    reported: list[tuple[str, str] | None] = []  # the feed's problem each time it asked for a reconcile
    source = Ec2Source(region=REGION, queue_url=queue, tags=(("app", app),), endpoint_url=moto,
                       credentials_secret="aws")

    async def read_secret(namespace: str, name: str) -> dict[str, Any]:
        return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in CREDENTIALS.items()}}
    feed = Ec2Feed(("team", "feed"), source, apply=lambda s, gone: applied.append((s.name, s.phase.value, gone)),
                   read_secret=read_secret, changed=lambda key: reported.append(feed.problem), relist_seconds=3,
                   wait_seconds=1)
    task = asyncio.create_task(feed.run())

    async def until(what: tuple[str, str, bool]) -> None:
        for _ in range(200):
            if what in applied:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{what} never applied: {applied}")
    try:
        await until((one, "up", False))
        await until((two, "up", False))
        assert feed.listed and feed.problem is None
        # a termination, and an older event delivered after a newer one (the re-list may run in
        # between: it agrees with the events, as the emulator has the instance terminated too)
        await asyncio.to_thread(ec2.terminate_instances, InstanceIds=[two])
        now = datetime.now(UTC)
        for state, at in (("shutting-down", now), ("running", now - timedelta(seconds=30)),
                          ("terminated", now + timedelta(seconds=1))):
            await asyncio.to_thread(sqs.send_message, QueueUrl=queue, MessageBody=ec2_state_change(two, state, at))
        await until((two, "down", True))
        assert (two, "up", False) not in applied[applied.index((two, "up", False)) + 1:]
        # no event for this one: the re-list finds it stopped
        await asyncio.to_thread(ec2.stop_instances, InstanceIds=[one])
        await until((one, "down", False))
        # an instance DescribeInstances does not know (yet): its message stays for a later attempt
        await asyncio.to_thread(sqs.send_message, QueueUrl=queue,
                                MessageBody=ec2_state_change("i-0123456789abcdef0", "running"))
        for _ in range(200):
            if (await asyncio.to_thread(queue_depth, sqs, queue, "ApproximateNumberOfMessagesNotVisible")) == 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the event for an unknown instance was not kept")
        three = launch(ec2, {"app": app})  # ... and the feed goes on with the next messages, no error
        await asyncio.to_thread(sqs.send_message, QueueUrl=queue, MessageBody=ec2_state_change(three, "running"))
        await until((three, "up", False))
        assert reported == [None] and "i-0123456789abcdef0" not in feed.known
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_auto_scaling_hooks_wait_for_registration_and_draining(
        ec2_operator: OperatorProcess, moto: str, namespace: str, core: client.CoreV1Api,
        custom: client.CustomObjectsApi, haproxy: HAProxyProcess, lb_name: str, receiver: Receiver) -> None:
    calls = record_lifecycle_actions()
    ec2, sqs, asg = aws_client("ec2", moto), aws_client("sqs", moto), aws_client("autoscaling", moto)
    queue = sqs.create_queue(QueueName=f"asg-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    app, port, subnet = f"asg-{uuid.uuid4().hex[:5]}", free_port(), 200 + next(_hosts) % 50
    group = f"group-{app}"
    launch_token, terminate_token = str(uuid.uuid4()), str(uuid.uuid4())  # AWS's are UUIDs too
    ec2.create_launch_template(LaunchTemplateName=group, LaunchTemplateData={"ImageId": "ami-12c6146b",
                                                                             "InstanceType": "t3.micro"})
    asg.create_auto_scaling_group(AutoScalingGroupName=group, MinSize=0, MaxSize=3, DesiredCapacity=0,
                                  LaunchTemplate={"LaunchTemplateName": group}, AvailabilityZones=["us-east-1a"],
                                  Tags=[{"Key": "app", "Value": app, "PropagateAtLaunch": True}])
    for transition in ("LAUNCHING", "TERMINATING"):
        asg.put_lifecycle_hook(AutoScalingGroupName=group, LifecycleHookName=transition.lower(),
                               LifecycleTransition=f"autoscaling:EC2_INSTANCE_{transition}", HeartbeatTimeout=30)
    allow_ec2(core, namespace)
    credentials_secret(core, namespace)
    create(custom, namespace, "targetpools", ec2_pool("web", {
        "endpointURL": moto, "credentialsSecretRef": {"name": "aws"}, "tags": {"app": app}, "queueURL": queue,
        "addressTag": ADDRESS_TAG}, ha_backend(lb_name, "web"), port))
    wait_for(lambda: condition(get(custom, namespace, "targetpools", "web"), "Ready").get("reason") == "NoMembers",
             30, "pool listed, no members")
    asg.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=1)  # scale out
    instance_id = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])[
        "AutoScalingGroups"][0]["Instances"][0]["InstanceId"]
    address = f"127.{subnet}.0.1"
    server = start_backend(address, port)
    try:
        ec2.create_tags(Resources=[instance_id], Tags=[{"Key": ADDRESS_TAG, "Value": address}])
        sqs.send_message(QueueUrl=queue, MessageBody=lifecycle_message(group, "launching", "LAUNCHING",
                                                                       instance_id, launch_token))
        ref = f"EC2/{namespace}/{instance_id}"
        done = wait_for(lambda: [c for c in calls if c.get("LifecycleActionToken") == launch_token], 30,
                        "the launch hook completed")
        assert members(custom, namespace, "web")[ref]["state"] == "Active"  # registered before it went on
        assert done == [{"Action": "CompleteLifecycleAction", "AutoScalingGroupName": group,
                         "LifecycleHookName": "launching", "LifecycleActionToken": launch_token,
                         "InstanceId": instance_id, "LifecycleActionResult": "CONTINUE"}]
        assert haproxy_servers(haproxy, "web") != {}
        # scale in: drained from the pool, a blocking draining handler (4 s) runs, heartbeats meanwhile
        create(custom, namespace, "lifecyclehandlers", handler(
            "slow", "web", http(receiver.url(f"/slow-{instance_id}")), events=["draining"], blocking=True,
            timeoutSeconds=20))
        wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "slow"), "Ready").get("status")
                 == "True", 20, "handler ready")
        sqs.send_message(QueueUrl=queue, MessageBody=lifecycle_message(group, "terminating", "TERMINATING",
                                                                       instance_id, terminate_token))
        ended = wait_for(lambda: [c for c in calls if c.get("LifecycleActionToken") == terminate_token
                                  and c["Action"] == "CompleteLifecycleAction"], 40, "the termination hook completed")
        assert ended[0]["LifecycleActionResult"] == "CONTINUE"
        assert ref not in members(custom, namespace, "web") and haproxy_servers(haproxy, "web") == {}
        assert any(c["Action"] == "RecordLifecycleActionHeartbeat" and
                   c["LifecycleActionToken"] == terminate_token for c in calls)
        assert [r.data["to"] for r in receiver.on(f"/slow-{instance_id}")] == ["draining"]
        wait_for(lambda: queue_depth(sqs, queue) == 0, 20, "hook messages deleted once completed")
        said = [m for r, m in events_for(core, namespace, "web") if r == "LifecycleActionCompleted"]
        assert len(said) == 2 and all(m.endswith(": CONTINUE") and instance_id in m for m in said)
        assert any(r == "LifecycleActionWaiting" for r, _ in events_for(core, namespace, "web"))

        # a blocking `up` handler that abandons: the launch is abandoned too
        create(custom, namespace, "lifecyclehandlers", handler(
            "veto", "web", http(receiver.url("/always-500")), events=["up"], blocking=True, onFailure="Abandon",
            retry={"maxAttempts": 1}))
        wait_for(lambda: condition(get(custom, namespace, "lifecyclehandlers", "veto"), "Ready").get("status")
                 == "True", 20, "veto ready")
        asg.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=2)
        vetoed = next(i["InstanceId"] for i in asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])[
            "AutoScalingGroups"][0]["Instances"] if i["InstanceId"] != instance_id)
        ec2.create_tags(Resources=[vetoed], Tags=[{"Key": ADDRESS_TAG, "Value": f"127.{subnet}.0.2"}])
        abandon_token = str(uuid.uuid4())
        sqs.send_message(QueueUrl=queue, MessageBody=lifecycle_message(group, "launching", "LAUNCHING",
                                                                       vetoed, abandon_token))
        abandoned = wait_for(lambda: [c for c in calls if c.get("LifecycleActionToken") == abandon_token], 30,
                             "the vetoed launch completed")
        assert [c["LifecycleActionResult"] for c in abandoned] == ["ABANDON"]
        assert members(custom, namespace, "web")[f"EC2/{namespace}/{vetoed}"]["state"] == "Held"
        assert any(r == "LifecycleActionCompleted" and m.endswith(": ABANDON")
                   for r, m in events_for(core, namespace, "web"))
    finally:
        server.stop()


def test_pods_and_ec2_instances_in_one_backend_weight_moves_from_ec2_to_pods_without_a_failed_request(
        ec2_operator: OperatorProcess, moto: str, namespace: str, core: client.CoreV1Api,
        custom: client.CustomObjectsApi, haproxy: HAProxyProcess, lb_name: str, workloads: Workloads) -> None:
    """The issue's own example: a service moves from EC2 instances to Pods in one HAProxy backend by
    shifting the sources' weights, then the instances are terminated; every step under traffic."""
    ec2, sqs = aws_client("ec2", moto), aws_client("sqs", moto)
    queue = sqs.create_queue(QueueName=f"mixed-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    app, subnet = f"vms-{uuid.uuid4().hex[:5]}", 200 + next(_hosts) % 50
    fleet = workloads("web")
    pods = {fleet.add(f"web-{i}") for i in range(2)}
    vms: dict[str, HTTPBackend] = {}
    for n in (1, 2):
        backend = start_backend(f"127.{subnet}.0.{n}", fleet.port)  # the pool's one port, as on the pods
        vms[launch(ec2, {"app": app, ADDRESS_TAG: backend.address})] = backend

    def sources(ec2_weight: int, pod_weight: int) -> list[dict[str, Any]]:
        return [{"kind": "EC2", "weight": ec2_weight, "ec2": {
                    "region": REGION, "endpointURL": moto, "credentialsSecretRef": {"name": "aws"},
                    "tags": {"app": app}, "queueURL": queue, "addressTag": ADDRESS_TAG}},
                {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}, "weight": pod_weight}]

    def weights() -> dict[str, str]:
        """HAProxy's weight of each server, by address."""
        return {address: weight for address, _, weight in servers(haproxy, "web").values()}
    try:
        allow_ec2(core, namespace)
        credentials_secret(core, namespace)
        create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": "web"}, "spec": {
            "sources": sources(256, 0), "port": fleet.port, "backend": ha_backend(lb_name, "web"),
            "deregistrationDelaySeconds": 30}})
        refs = {*(f"EC2/{namespace}/{i}" for i in vms), *(f"Pod/{namespace}/web-{i}" for i in range(2))}
        wait_for(lambda: {r for r, m in members(custom, namespace, "web").items() if m["state"] == "Active"} == refs,
                 30, "2 EC2 instances and 2 pods Active")
        vm_servers = {b.address for b in vms.values()}
        assert set(weights()) == vm_servers | pods
        names = set(servers(haproxy, "web"))
        load = LoadGenerator(haproxy.frontend_url("web"), connections=8, rate=300).start(duration=120)
        watch = ErrorWatch(haproxy.admin_endpoint, "web").start()
        shares = []
        try:
            for ec2_weight, pod_weight in ((256, 0), (128, 128), (0, 256)):
                custom.patch_namespaced_custom_object(
                    group="poolkeeper.dev", version="v1alpha1", namespace=namespace, plural="targetpools",
                    name="web", body={"spec": {"sources": sources(ec2_weight, pod_weight)}})
                want = {**dict.fromkeys(vm_servers, str(ec2_weight)), **dict.fromkeys(pods, str(pod_weight))}
                wait_for(lambda w=want: weights() == w, 20, f"weights {ec2_weight}/{pod_weight} in HAProxy")  # type: ignore[misc]
                before = load.snapshot()
                wait_for(lambda b=before: load.snapshot().ok - b.ok >= 300, 30, "a window of traffic")  # type: ignore[misc]
                window = load.snapshot().served_by - before.served_by
                vm_share = sum(window[f"{n}:{fleet.port}"] for n in vm_servers) / sum(window.values())
                shares.append((ec2_weight, pod_weight, round(vm_share, 3)))
                assert abs(vm_share - ec2_weight / (ec2_weight + pod_weight)) <= TOLERANCE, shares
                assert set(servers(haproxy, "web")) == names  # weights change in place: no server re-added
            # the move is done: the instances are terminated (their events), drained and removed
            for instance_id in vms:
                for state in ("shutting-down", "terminated"):
                    sqs.send_message(QueueUrl=queue, MessageBody=ec2_state_change(instance_id, state))
            wait_for(lambda: set(weights()) == pods, 40, "the EC2 instances' servers removed")
            before = load.snapshot()
            wait_for(lambda: load.snapshot().ok - before.ok >= 100, 10, "traffic after the instances left")
        finally:
            report = load.stop()
            errors = watch.stop().errors()
        assert report.failed == 0, report.failures
        assert errors == NO_ERRORS, errors
        assert report.total >= 3 * 300, report
        assert {r: m.get("weight") for r, m in members(custom, namespace, "web").items()} == {
            f"Pod/{namespace}/web-{i}": 256 for i in range(2)}
        wait_for(lambda: queue_depth(sqs, queue) == 0, 20, "every message deleted once applied")
    finally:
        for backend in vms.values():
            backend.stop()


def test_pods_and_ec2_instances_in_one_elbv2_target_group(
        ec2_operator: OperatorProcess, moto: str, namespace: str, core: client.CoreV1Api,
        custom: client.CustomObjectsApi, workloads: Workloads) -> None:
    """EC2 among the sources of an ELBv2 pool: an `ip` target group takes the instances' and the pods'
    addresses; an `instance` one takes the instances by id, and a pod is Held (it is no EC2 instance)."""
    ec2, sqs, elb = aws_client("ec2", moto), aws_client("sqs", moto), aws_client("elbv2", moto)
    app, subnet = f"elb-{uuid.uuid4().hex[:5]}", 200 + next(_hosts) % 50
    fleet = workloads("web")
    pod_ip = fleet.add("web-0")
    vm_address = f"127.{subnet}.0.1"
    vm = launch(ec2, {"app": app, ADDRESS_TAG: vm_address})
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    arns = {kind: elb.create_target_group(Name=f"{kind}-{uuid.uuid4().hex[:8]}", Protocol="HTTP", Port=80, VpcId=vpc,
                                          TargetType=kind)["TargetGroups"][0]["TargetGroupArn"]
            for kind in ("ip", "instance")}
    allow_ec2(core, namespace)
    credentials_secret(core, namespace)
    core.create_namespaced_secret(namespace=namespace, body={"metadata": {"name": "elb"}, "data": {
        k.lower(): base64.b64encode(v.encode()).decode() for k, v in CREDENTIALS.items()}})
    lb = f"elb-{uuid.uuid4().hex[:6]}"
    custom.create_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers", body={
        "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": lb},
        "spec": {"type": "ELBv2", "allowedTargetCIDRs": LOOPBACK_TARGETS, "elbv2": {
            "region": REGION, "endpointURL": moto, "credentialsSecretRef": {"namespace": namespace, "name": "elb"},
            "targetGroups": [{"arn": arn} for arn in arns.values()]}}})
    try:
        for kind, arn in arns.items():
            create(custom, namespace, "targetpools", {"kind": "TargetPool", "metadata": {"name": kind}, "spec": {
                "sources": [{"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}},
                            {"kind": "EC2", "ec2": {
                                "region": REGION, "endpointURL": moto, "credentialsSecretRef": {"name": "aws"},
                                "tags": {"app": app}, "addressTag": ADDRESS_TAG,
                                "queueURL": sqs.create_queue(QueueName=f"{kind}-{app}")["QueueUrl"]}}],
                "port": fleet.port, "deregistrationDelaySeconds": 5,
                "backend": {"type": "ELBv2", "elbv2": {"loadBalancerRef": {"name": lb}, "targetGroupARN": arn,
                                                       "targetType": kind}}}})

        def targets(arn: str) -> set[tuple[str, int]]:
            return {(d["Target"]["Id"], d["Target"]["Port"])
                    for d in elb.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]}
        pod, instance = f"Pod/{namespace}/web-0", f"EC2/{namespace}/{vm}"
        wait_for(lambda: {r: m["state"] for r, m in members(custom, namespace, "ip").items()}
                 == {pod: "Active", instance: "Active"}, 30, "the pod and the instance Active in the ip group")
        assert targets(arns["ip"]) == {(pod_ip, fleet.port), (vm_address, fleet.port)}
        wait_for(lambda: members(custom, namespace, "instance").get(instance, {}).get("state") == "Active", 30,
                 "the instance Active in the instance group")
        held = members(custom, namespace, "instance")[pod]
        assert held["state"] == "Held" and "Pod is no EC2 instance" in held["reason"], held
        assert targets(arns["instance"]) == {(vm, fleet.port)}
        for kind in arns:
            delete(custom, namespace, "targetpools", kind)
        wait_for(lambda: all(not targets(arn) for arn in arns.values()), 30, "deregistered with their pools")
    finally:
        custom.delete_cluster_custom_object(group="poolkeeper.dev", version="v1alpha1", plural="loadbalancers",
                                            name=lb)
