"""AWS writes are leader-fenced like API and HAProxy writes: checked on botocore's `before-send`,
so at the last moment before each attempt goes out. Real aiobotocore clients against a local
recording endpoint (answers in the AWS protocols, no emulator needed): what reaches it is what a
replica sent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
import pytest
from aiohttp import web
from test_lease import Clock, LeaseApi

from poolkeeper.aws import NOT_LEADING, AWSError, client
from poolkeeper.aws.elbv2_client import ELBv2Client
from poolkeeper.backends.elbv2 import ELBv2Backend, OwnedTargets
from poolkeeper.controller.loadbalancers import LoadBalancers
from poolkeeper.core.ec2 import LAUNCHING, TERMINATING, Ec2Source, LifecycleAction
from poolkeeper.core.elbv2 import Target
from poolkeeper.core.model import AddMember
from poolkeeper.kube.api import KubeApi
from poolkeeper.kube.events import EventRecorder
from poolkeeper.kube.lease import LeaderElector
from poolkeeper.kube.status import StatusWriter
from poolkeeper.sources.ec2 import Ec2Feed

ARN = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef"
THROTTLED = ("<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message>"
             "</Error><RequestId>r</RequestId></ErrorResponse>")


@dataclass
class Endpoint:
    """Answers every AWS call with an empty success (XML for the query protocol, JSON for SQS's) and
    records the operations; `throttle` answers Throttling to these operations and calls `on_throttle`."""

    url: str = ""
    seen: list[str] = field(default_factory=list)
    throttle: set[str] = field(default_factory=set)
    on_throttle: Callable[[], None] = lambda: None

    async def handle(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        if target:  # SQS's JSON protocol
            self.seen.append(target.rsplit(".", 1)[-1])
            return web.Response(text="{}", content_type="application/x-amz-json-1.0")
        action = (await request.post()).get("Action", "")
        assert isinstance(action, str)
        self.seen.append(action)
        if action in self.throttle:
            self.on_throttle()
            return web.Response(status=400, text=THROTTLED, content_type="text/xml")
        return web.Response(text=f"<{action}Response><{action}Result></{action}Result><ResponseMetadata>"
                                 f"<RequestId>r</RequestId></ResponseMetadata></{action}Response>",
                            content_type="text/xml")


@pytest.fixture()
async def endpoint() -> AsyncIterator[Endpoint]:
    found = Endpoint()
    app = web.Application()
    app.router.add_post("/", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}"
    yield found
    await runner.cleanup()


TARGET = Target("pk-1", "10.0.0.5", 80)


async def test_registrations_are_refused_once_the_replica_no_longer_leads_and_reads_go_on(endpoint: Endpoint) -> None:
    leading = True
    elb = ELBv2Client("us-east-1", endpoint.url, ("k", "s"), may_act=lambda: leading)
    try:
        await elb.register(ARN, [TARGET])
        assert endpoint.seen == ["RegisterTargets"]
        leading = False
        for call in (elb.register, elb.deregister):
            with pytest.raises(AWSError, match="no longer leads") as refused:
                await call(ARN, [TARGET])
            assert refused.value.reason == NOT_LEADING
        assert await elb.health(ARN, [TARGET]) == {}  # a read: still sent
        assert endpoint.seen == ["RegisterTargets", "DescribeTargetHealth"]
    finally:
        await elb.close()


async def test_a_lease_lost_while_backing_off_a_throttled_call_sends_no_retry(endpoint: Endpoint) -> None:
    """The leader's renew deadline passes while botocore backs off between attempts (a paused or
    partitioned leader): the next attempt is not sent, and nothing retries the refusal."""
    clock = Clock()
    elector = LeaderElector(LeaseApi(), namespace="ns", name="poolkeeper", identity="a",  # type: ignore[arg-type]
                            duration=15.0, renew_deadline=10.0, retry=2.0, clock=clock)
    assert await elector.try_acquire() and elector.is_leading()

    def paused() -> None:
        clock.now += 11.0  # past the renew deadline: another replica may lead by the time we wake
    endpoint.throttle, endpoint.on_throttle = {"RegisterTargets"}, paused
    elb = ELBv2Client("us-east-1", endpoint.url, ("k", "s"), may_act=elector.is_leading, attempts=5)
    try:
        started = time.monotonic()
        with pytest.raises(AWSError) as refused:
            await elb.register(ARN, [TARGET])
        assert refused.value.reason == NOT_LEADING
        assert endpoint.seen == ["RegisterTargets"]  # the one attempt before the deadline passed, no retry
        assert time.monotonic() - started < 5  # one backoff at most, not five attempts
    finally:
        await elb.close()


async def test_the_elbv2_backend_fails_its_reconcile_rather_than_the_member(endpoint: Endpoint) -> None:
    persisted: list[Any] = []

    async def persist(rows: list[dict[str, Any]]) -> None:
        persisted.append(rows)
    elb = ELBv2Client("us-east-1", endpoint.url, ("k", "s"), may_act=lambda: False)
    backend = ELBv2Backend(elb, ARN, OwnedTargets.from_status([], persist))
    try:
        with pytest.raises(AWSError) as refused:  # FATAL: not a per-member failure that reads as a refusal
            await backend.apply([AddMember("pk-1", "10.0.0.5", 80)])
        assert refused.value.reason == NOT_LEADING
        assert "RegisterTargets" not in endpoint.seen
    finally:
        await elb.close()


async def test_load_balancers_fence_their_elbv2_clients_with_the_api_fence(endpoint: Endpoint,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")  # the pod's identity (the default chain)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    api = KubeApi(kopf.ConnectionInfo(server="https://127.0.0.1:9", insecure=True), may_write=lambda: False)
    lbs = LoadBalancers(api, StatusWriter(api), EventRecorder(api), pools_using=lambda name: [], enqueue=print)
    try:
        await lbs.upsert({"metadata": {"name": "aws"}, "spec": {"type": "ELBv2", "elbv2": {
            "region": "us-east-1", "endpointURL": endpoint.url, "targetGroups": [{"arn": ARN}]}}})
        found = lbs.elbv2("aws")
        assert found is not None
        with pytest.raises(AWSError) as refused:
            await found[1].register(ARN, [TARGET])
        assert refused.value.reason == NOT_LEADING
        assert "DescribeTargetGroups" in endpoint.seen and "RegisterTargets" not in endpoint.seen
    finally:
        await lbs.close()
        await api.close()


def action(transition: str, token: str) -> LifecycleAction:
    return LifecycleAction(transition, "group", "hook", "i-1", f"{token:0>36}")  # AWS's are UUIDs


async def test_lifecycle_actions_and_queue_messages_are_fenced(endpoint: Endpoint,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    leading = False
    states = {"EC2/team/i-1": "Active"}
    posted: list[str] = []
    source = Ec2Source(region="us-east-1", queue_url=endpoint.url + "/q", tags=(("app", "web"),))
    feed = Ec2Feed(("team", "web"), source, apply=lambda state, gone: None, read_secret=lambda n, m: None,  # type: ignore[arg-type,return-value]
                   changed=lambda key: None, member_state=lambda key, ref: states.get(ref),
                   post=lambda key, reason, message, warning: posted.append(reason), heartbeat_seconds=0,
                   may_act=lambda: leading)
    feed.known["i-1"] = None  # type: ignore[assignment]  # one of the pool's instances
    feed.actions["launch"] = (action(LAUNCHING, "launch"), "receipt-1", 0.0)
    async with client.clients(("ec2", "sqs", "autoscaling"), "us-east-1", endpoint.url, None,
                              may_act=lambda: leading) as (ec2, sqs, asg):
        with pytest.raises(AWSError) as refused:  # the member is Active: CONTINUE is due, but not ours to send
            await feed._progress(sqs, asg)
        assert refused.value.reason == NOT_LEADING and "launch" in feed.actions
        with pytest.raises(AWSError):
            await feed._receive(ec2, sqs, 1)  # a receive would hide the messages from the next leader
        states["EC2/team/i-1"] = "Draining"  # a termination waits: a heartbeat is due, and fenced too
        feed.actions = {"end": (action(TERMINATING, "end"), "receipt-2", 0.0)}
        with pytest.raises(AWSError):
            await feed._progress(sqs, asg)
        assert endpoint.seen == [] and posted == []  # nothing sent, and no failure said for it
        leading = True
        await feed._progress(sqs, asg)
        del states["EC2/team/i-1"]  # drained and removed: the hook goes on
        await feed._progress(sqs, asg)
    assert endpoint.seen == ["RecordLifecycleActionHeartbeat", "CompleteLifecycleAction", "DeleteMessage"]
    assert posted == ["LifecycleActionCompleted"] and feed.actions == {}
