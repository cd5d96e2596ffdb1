"""EC2 as a source, the pure part: spec, states, records, EventBridge messages, tenancy; and when a
feed lets its pool act (never before the first listing)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from poolkeeper.aws import client as aws
from poolkeeper.core.ec2 import (
    LAUNCHING,
    TERMINATING,
    Ec2Source,
    LifecycleAction,
    instance_record,
    lifecycle_result,
    parse_lifecycle,
    parse_message,
    phase_of,
    with_state,
)
from poolkeeper.core.elbv2 import instance_id_refusal
from poolkeeper.core.model import Phase
from poolkeeper.core.poolspec import InvalidSpec, PoolSpec, parse_pool
from poolkeeper.core.tenancy import ec2_source_refusal, parse_ec2_source_namespaces
from poolkeeper.sources.ec2 import Ec2Feeds

SOURCE = Ec2Source(region="us-east-1", queue_url="https://sqs/q", tags=(("app", "web"),))


def pool(ec2: dict[str, Any], namespace: str = "team", name: str = "web") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "uid": f"u-{name}"}, "spec": {
        "source": {"kind": "EC2", "ec2": ec2}, "port": 80,
        "backend": {"type": "HAProxy", "haproxy": {"loadBalancerRef": {"name": "lb"}, "backend": "web"}}}}


def raw(instance_id: str = "i-1", state: str = "running", ip: str | None = "10.0.0.5",
        tags: dict[str, str] | None = None) -> dict[str, Any]:
    return {"InstanceId": instance_id, "State": {"Name": state}, "PrivateIpAddress": ip,
            "Tags": [{"Key": k, "Value": v} for k, v in (tags or {"app": "web"}).items()]}


@pytest.mark.parametrize(("state", "phase"), [
    ("pending", Phase.DOWN), ("running", Phase.UP), ("stopping", Phase.DRAINING),
    ("shutting-down", Phase.DRAINING), ("stopped", Phase.DOWN), ("terminated", Phase.DOWN), ("weird", Phase.DOWN)])
def test_states_map_onto_phases(state: str, phase: Phase) -> None:
    assert phase_of(state)[0] is phase


def test_pool_spec_takes_the_tags_as_its_selector() -> None:
    spec = parse_pool(pool({"region": "eu-west-1", "queueURL": "https://sqs/q", "tags": {"app": "web", "tier": "1"},
                            "credentialsSecretRef": {"name": "aws"}, "addressTag": "addr"}))
    assert isinstance(spec, PoolSpec) and spec.kinds == ("EC2",) and spec.ec2 is not None
    assert spec.ec2.credentials_secret == "aws" and spec.ec2.address_tag == "addr" and spec.ec2.region == "eu-west-1"
    assert spec.selects("EC2", {"app": "web", "tier": "1", "Name": "x"})
    assert not spec.selects("EC2", {"app": "web"})
    filters = spec.ec2.describe_filters()
    assert {"Name": "tag:tier", "Values": ["1"]} in filters
    assert {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped",
                                                      "shutting-down"]} in filters


def test_pool_spec_without_tags_is_invalid() -> None:
    with pytest.raises(InvalidSpec, match="at least one tag"):
        parse_pool(pool({"region": "us-east-1", "queueURL": "https://sqs/q", "tags": {}}))


def test_instance_record_uses_the_private_ip_or_the_address_tag() -> None:
    record = instance_record(raw(), "team", SOURCE)
    assert (record.kind, record.namespace, record.name, record.uid) == ("EC2", "team", "i-1", "i-1")
    assert record.address == "10.0.0.5" and record.phase is Phase.UP and record.labels == {"app": "web"}
    tagged = Ec2Source(region="us-east-1", queue_url="q", tags=(("app", "web"),), address_tag="addr")
    assert instance_record(raw(tags={"app": "web", "addr": "192.0.2.7"}), "team", tagged).address == "192.0.2.7"
    missing = instance_record(raw(), "team", tagged)
    assert missing.address is None and missing.phase is Phase.DOWN and "no tag addr" in missing.reason
    assert instance_record(raw(state="pending", ip=None), "team", SOURCE).phase is Phase.DOWN
    assert instance_record(raw(), "team", SOURCE, state="stopping").phase is Phase.DRAINING


def test_with_state_keeps_the_instance_and_changes_the_phase() -> None:
    record = instance_record(raw(), "team", SOURCE)
    stopping = with_state(record, "stopping")
    assert stopping.phase is Phase.DRAINING and stopping.reason == "instance stopping"
    assert stopping.address == record.address and stopping.labels == record.labels


def test_an_ec2_record_carries_its_instance_id_for_elbv2_instance_targets() -> None:
    record = instance_record(raw(instance_id="i-0abc"), "team", SOURCE)
    assert record.ec2_id == "i-0abc" and with_state(record, "stopping").ec2_id == "i-0abc"
    assert instance_id_refusal(record.kind, record.ec2_id) is None  # registered by id, not refused


def event(**over: Any) -> str:
    body = {"version": "0", "detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2",
            "time": "2026-12-02T10:00:05Z", "detail": {"instance-id": "i-1", "state": "stopping"}}
    body.update(over)
    return json.dumps(body)


def test_parse_message_reads_eventbridge_state_changes_only() -> None:
    change = parse_message(event())
    assert change is not None and (change.instance_id, change.state) == ("i-1", "stopping")
    assert change.time == pytest.approx(1796205605.0)
    assert parse_message(event(time="later")).time == 0.0  # type: ignore[union-attr]
    assert parse_message("not json") is None
    assert parse_message("[1]") is None
    assert parse_message(event(source="aws.autoscaling")) is None
    assert parse_message(event(**{"detail-type": "EC2 Spot Instance Interruption Warning"})) is None
    assert parse_message(event(detail={"instance-id": "i-1", "state": "exploded"})) is None
    assert parse_message(event(detail={"state": "running"})) is None
    assert parse_message(json.dumps({"Event": "autoscaling:TEST_NOTIFICATION"})) is None


def test_operator_identity_and_endpoints_only_for_listed_namespaces() -> None:
    nobody = parse_ec2_source_namespaces(None)
    why = ec2_source_refusal("team", {}, own_credentials=False, endpoint_url="", policy=nobody)
    assert why is not None and "credentialsSecretRef" in why and "(unset)" in why
    assert ec2_source_refusal("team", {}, own_credentials=True, endpoint_url="", policy=nobody) is None
    why = ec2_source_refusal("team", {}, own_credentials=True, endpoint_url="http://10.0.0.1", policy=nobody)
    assert why is not None and "endpointURL" in why
    listed = parse_ec2_source_namespaces("infra")
    assert ec2_source_refusal("infra", {}, own_credentials=False, endpoint_url="http://x", policy=listed) is None
    labelled = parse_ec2_source_namespaces("aws=yes")
    assert ec2_source_refusal("a", {"aws": "yes"}, own_credentials=False, endpoint_url="", policy=labelled) is None
    assert ec2_source_refusal("a", {"aws": "no"}, own_credentials=False, endpoint_url="", policy=labelled)
    everyone = parse_ec2_source_namespaces("*")
    assert ec2_source_refusal("a", None, own_credentials=False, endpoint_url="http://x", policy=everyone) is None
    with pytest.raises(ValueError):
        parse_ec2_source_namespaces("Not_A_Namespace")


async def test_a_pool_waits_for_its_first_listing_and_hears_problems() -> None:
    changed: list[tuple[str, str]] = []

    async def no_secret(namespace: str, name: str) -> None:
        return None
    feeds = Ec2Feeds(apply=lambda state, gone: None, read_secret=no_secret, changed=changed.append)
    spec = parse_pool(pool({"region": "us-east-1", "queueURL": "https://sqs/q", "tags": {"app": "web"},
                            "credentialsSecretRef": {"name": "aws"}}))
    assert isinstance(spec, PoolSpec)
    feeds.sync([spec])
    try:
        assert feeds.block(spec) == ("EC2SourceNotListed", "listing the instances tagged {'app': 'web'} in us-east-1")
        for _ in range(50):
            if changed:
                break
            await asyncio.sleep(0.01)
        reason, message = feeds.block(spec) or ("", "")
        assert changed == [("team", "web")]
        assert reason == "EC2CredentialsNotFound" and "Secret team/aws not found" in message
        feeds.sync([])  # the pool is gone: so is its feed
        assert not feeds.feeds
    finally:
        await feeds.close()


def test_without_the_aws_extra_pools_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aws, "available", lambda: False)
    spec = parse_pool(pool({"region": "us-east-1", "queueURL": "https://sqs/q", "tags": {"app": "web"}}))
    assert isinstance(spec, PoolSpec)
    feeds = Ec2Feeds(apply=lambda state, gone: None, read_secret=lambda n, m: asyncio.sleep(0), changed=print)
    assert feeds.block(spec) == aws.NOT_INSTALLED
    assert aws.NOT_INSTALLED[0] == "AWSSupportNotInstalled"


def hook_body(transition: str = "autoscaling:EC2_INSTANCE_LAUNCHING", **over: Any) -> dict[str, Any]:
    body = {"Service": "AWS Auto Scaling", "LifecycleTransition": transition, "AutoScalingGroupName": "g",
            "LifecycleHookName": "h", "EC2InstanceId": "i-1", "LifecycleActionToken": "t"}
    body.update(over)
    return body


def test_parse_lifecycle_reads_direct_and_eventbridge_hook_messages() -> None:
    direct = parse_lifecycle(json.dumps(hook_body()))
    assert direct == LifecycleAction(LAUNCHING, "g", "h", "i-1", "t")
    bridged = parse_lifecycle(json.dumps({"source": "aws.autoscaling",
                                          "detail-type": "EC2 Instance-terminate Lifecycle Action",
                                          "detail": hook_body("autoscaling:EC2_INSTANCE_TERMINATING")}))
    assert bridged is not None and bridged.transition == TERMINATING
    assert parse_lifecycle(json.dumps({"Event": "autoscaling:TEST_NOTIFICATION"})) is None
    assert parse_lifecycle(json.dumps(hook_body(LifecycleActionToken=""))) is None
    assert parse_lifecycle(json.dumps(hook_body("autoscaling:EC2_INSTANCE_LAUNCH"))) is None
    assert parse_lifecycle("{") is None and parse_lifecycle(event()) is None


@pytest.mark.parametrize(("transition", "member", "result"), [
    (LAUNCHING, None, None), (LAUNCHING, "Registering", None), (LAUNCHING, "Active", "CONTINUE"),
    (LAUNCHING, "Held", "ABANDON"), (TERMINATING, "Active", None), (TERMINATING, "Draining", None),
    (TERMINATING, "Held", None), (TERMINATING, None, "CONTINUE")])
def test_lifecycle_result(transition: str, member: str | None, result: str | None) -> None:
    assert lifecycle_result(transition, member) == result


async def test_each_feed_is_fenced_by_its_own_pool() -> None:
    """With shards, a replica may hold one EC2 pool's shard and not another's: each feed's AWS
    calls (aws.fence) ask about its own pool."""
    held = {("team", "web")}

    async def no_secret(namespace: str, name: str) -> None:
        return None
    feeds = Ec2Feeds(apply=lambda state, gone: None, read_secret=no_secret, changed=lambda key: None,
                     may_act=lambda key: key in held)
    source = {"region": "us-east-1", "queueURL": "https://sqs/q", "tags": {"app": "web"}}
    specs = [parse_pool(pool(source, name=name)) for name in ("web", "api")]
    assert all(isinstance(s, PoolSpec) for s in specs)
    feeds.sync(s for s in specs if isinstance(s, PoolSpec))
    try:
        fences = {key: feed.may_act for key, (feed, _) in feeds.feeds.items()}
        assert set(fences) == {("team", "web"), ("team", "api")}
        assert all(f is not None for f in fences.values())
        assert [key for key, f in fences.items() if f is not None and f()] == [("team", "web")]
        held.clear()  # the shard is lost: the same feed stops acting at once
        assert not any(f is not None and f() for f in fences.values())
    finally:
        await feeds.close()
