"""ELBv2 rules (core.elbv2), the spec parsing, and the adapter's mapping of plans onto target
registration. The adapter runs here against an in-memory target group because the emulator
(moto) deregisters at once and has no draining state; tests/integration/test_elbv2.py runs the
same adapter against moto's server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from poolkeeper.backends.elbv2 import ELBv2Backend, OwnedTargets
from poolkeeper.core.elbv2 import (
    NOT_REGISTERED,
    Target,
    TargetHealth,
    ec2_instance_id,
    instance_id_refusal,
    member_of,
    ownership_refusal,
)
from poolkeeper.core.model import AddMember, Admin, InstanceState, Phase, Placement, RemoveMember, SetAdmin
from poolkeeper.core.poolspec import backend_refusal, parse_load_balancer, parse_pool
from poolkeeper.sources.convert import node_state

ARN = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef"


class TargetGroup:
    """An in-memory target group: targets by (id, port) -> state; records every call."""

    def __init__(self) -> None:
        self.state: dict[tuple[str, int], str] = {}
        self.log: list[str] = []

    async def health(self, arn: str, targets: Sequence[Target]) -> dict[tuple[str, int], TargetHealth]:
        return {(t.id, t.port): TargetHealth(s) if (s := self.state.get((t.id, t.port)))
                else TargetHealth("unavailable", NOT_REGISTERED) for t in targets}

    async def register(self, arn: str, targets: Sequence[Target]) -> None:
        self.log.append(f"register {len(targets)}")
        for t in targets:
            self.state[(t.id, t.port)] = "initial"

    async def deregister(self, arn: str, targets: Sequence[Target]) -> None:
        self.log.append(f"deregister {len(targets)}")
        for t in targets:
            self.state[(t.id, t.port)] = "draining"


def backend(group: TargetGroup, persisted: list[Any]) -> ELBv2Backend:
    async def persist(rows: list[dict[str, Any]]) -> None:
        group.log.append(f"persist {len(rows)}")
        persisted.append(rows)
    return ELBv2Backend(group, ARN, OwnedTargets.from_status([], persist))  # type: ignore[arg-type]


def test_health_maps_onto_member_states() -> None:
    target = Target("pk-a", "10.0.0.1", 80)
    assert member_of(target, TargetHealth("healthy")).admin is Admin.READY
    assert member_of(target, TargetHealth("healthy")).health == "UP"
    initial = member_of(target, TargetHealth("initial"))
    assert (initial.admin, initial.health, initial.sessions) == (Admin.DRAIN, "initial", 0)
    draining = member_of(target, TargetHealth("draining", "Target.DeregistrationInProgress"))
    assert (draining.admin, draining.sessions) == (Admin.DRAIN, 1)  # not over until the group says so
    assert not TargetHealth("unused", NOT_REGISTERED).registered
    assert TargetHealth("unused", "Target.NotInUse").registered


@pytest.mark.parametrize(("tags", "refused"), [
    ({}, False), ({"team": "web"}, False), ({"elbv2.k8s.aws/cluster": "prod"}, True),
    ({"poolkeeper.dev/owner": "other"}, True),
])
def test_target_groups_of_other_controllers_are_refused(tags: dict[str, str], refused: bool) -> None:
    assert (ownership_refusal(ARN, tags) is not None) is refused
    assert ownership_refusal(ARN, {"poolkeeper.dev/owner": "east"}, cluster_id="east") is None


async def test_owned_before_registered_then_drained_by_the_group_and_forgotten() -> None:
    group, persisted = TargetGroup(), []
    pool = backend(group, persisted)
    assert await pool.read_members() == {}
    results = await pool.apply([AddMember("pk-a", "10.0.0.1", 80), SetAdmin("pk-a", Admin.DRAIN),
                                AddMember("pk-b", "10.0.0.2", 80), SetAdmin("pk-b", Admin.DRAIN)])
    assert all(r.ok for r in results)
    assert group.log == ["persist 2", "register 2"]  # one batch, written down first
    group.state[("10.0.0.1", 80)] = "healthy"
    members = await pool.read_members()
    assert members["pk-a"].admin is Admin.READY and members["pk-b"].health == "initial"
    # out of rotation: the healthy target is deregistered and the group drains it
    await pool.apply([SetAdmin("pk-a", Admin.DRAIN)])
    assert group.state[("10.0.0.1", 80)] == "draining"
    assert (await pool.read_members())["pk-a"].sessions == 1
    waiting = await pool.apply([RemoveMember("pk-a", "drained")])
    assert not waiting[0].ok and "connections" in waiting[0].message  # the pool waits, no error
    del group.state[("10.0.0.1", 80)]  # the group finished draining
    assert set(await pool.read_members()) == {"pk-b"}
    assert persisted[-1] == [{"targetGroupARN": ARN, "name": "pk-b", "id": "10.0.0.2", "port": 80}]


async def test_a_target_just_registered_but_not_listed_yet_stays_ours() -> None:
    group, persisted = TargetGroup(), []
    pool = backend(group, persisted)
    await pool.apply([AddMember("pk-a", "10.0.0.1", 80)])
    group.state.clear()  # DescribeTargetHealth lags behind RegisterTargets (eventual consistency)
    assert (await pool.read_members())["pk-a"].health == "initial"
    pool.owned.clock = lambda: 1e12  # long after: it really is gone
    assert await pool.read_members() == {}
    assert persisted[-1] == []


async def test_only_own_targets_are_touched() -> None:
    group, persisted = TargetGroup(), []
    group.state[("10.0.0.9", 80)] = "healthy"  # registered by someone else
    pool = backend(group, persisted)
    results = await pool.apply([AddMember("pk-x", "10.0.0.9", 80), RemoveMember("pk-y", "gone", force=True)])
    assert not results[0].ok and "poolkeeper did not register it" in results[0].message
    assert results[1].ok
    assert group.state == {("10.0.0.9", 80): "healthy"} and "deregister" not in " ".join(group.log)
    assert persisted == []


def test_a_client_without_the_aws_extra_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import sys

    from poolkeeper.aws import AWSError
    from poolkeeper.aws.elbv2_client import ELBv2Client

    monkeypatch.setitem(sys.modules, "aiobotocore.session", None)  # import fails as if not installed
    with pytest.raises(AWSError) as raised:
        asyncio.run(ELBv2Client("us-east-1").target_group(ARN))
    assert raised.value.reason == "AWSSupportNotInstalled"


async def test_a_held_member_stays_owned_but_out_of_the_group() -> None:
    group, persisted = TargetGroup(), []
    pool = backend(group, persisted)
    await pool.apply([AddMember("pk-a", "10.0.0.1", 80), SetAdmin("pk-a", Admin.MAINT)])
    assert group.state == {} and len(persisted[-1]) == 1
    assert (await pool.read_members())["pk-a"].admin is Admin.MAINT
    await pool.apply([SetAdmin("pk-a", Admin.DRAIN)])  # released: registered, health checks begin
    assert group.state == {("10.0.0.1", 80): "initial"}


@pytest.mark.parametrize(("provider_id", "ec2_id"), [
    ("aws:///us-east-1a/i-0123456789abcdef0", "i-0123456789abcdef0"), ("aws:///i-01234567", "i-01234567"),
    ("gce://project/zone/vm", ""), ("aws:///us-east-1a/not-an-id", ""), ("", ""),
])
def test_ec2_instance_ids_come_from_aws_provider_ids(provider_id: str, ec2_id: str) -> None:
    assert ec2_instance_id(provider_id) == ec2_id
    node = node_state({"metadata": {"name": "n", "uid": "u"}, "spec": {"providerID": provider_id},
                       "status": {"conditions": [{"type": "Ready", "status": "True"}],
                                  "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}})
    assert node.ec2_id == ec2_id
    assert (instance_id_refusal("Node", ec2_id) is None) is bool(ec2_id)
    assert "is no EC2 instance" in (instance_id_refusal("Pod", "") or "")


async def test_instance_targets_are_registered_by_instance_id_and_read_back_by_address() -> None:
    group, persisted = TargetGroup(), []

    async def persist(rows: list[dict[str, Any]]) -> None:
        persisted.append(rows)
    pool = ELBv2Backend(group, ARN, OwnedTargets.from_status([], persist), "instance")  # type: ignore[arg-type]
    vm = InstanceState("Instance", "ns", "vm", "uid", "10.0.0.5", {}, Phase.UP, "", ec2_id="i-0123456789abcdef0")
    await pool.apply([AddMember("pk-vm", "10.0.0.5", 80, vm)])
    assert group.state == {("i-0123456789abcdef0", 80): "initial"}
    assert persisted[-1][0]["address"] == "10.0.0.5"
    restarted = ELBv2Backend(group, ARN, OwnedTargets.from_status(persisted[-1], persist), "instance")  # type: ignore[arg-type]
    assert (await restarted.read_members())["pk-vm"].address == "10.0.0.5"  # the planner sees no address change


def test_elbv2_specs_parse_and_tenancy_uses_the_target_group_list() -> None:
    lb = parse_load_balancer({"metadata": {"name": "aws"}, "spec": {"type": "ELBv2", "elbv2": {
        "region": "us-east-1", "endpointURL": "http://127.0.0.1:5000",
        "credentialsSecretRef": {"namespace": "ops", "name": "aws"},
        "targetGroups": [{"arn": ARN, "allowedNamespaces": {"from": "Selector",
                                                            "selector": {"matchLabels": {"team": "web"}}}}]}}})
    assert (lb.region, lb.endpoint_url, lb.credentials_secret) == ("us-east-1", "http://127.0.0.1:5000",
                                                                   ("ops", "aws"))
    assert backend_refusal(lb, ARN, "web", {"team": "web"}) is None
    assert "spec.elbv2.targetGroups" in (backend_refusal(lb, ARN, "shop", {"team": "shop"}) or "")
    assert "does not list target group" in (backend_refusal(lb, ARN + "0", "web", {"team": "web"}) or "")
    pool = parse_pool({"metadata": {"name": "web", "namespace": "web"}, "spec": {
        "source": {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}}, "port": 8080,
        "backend": {"type": "ELBv2", "elbv2": {"loadBalancerRef": {"name": "aws"}, "targetGroupARN": ARN}}}})
    assert (pool.load_balancer, pool.backend, pool.target_type, pool.checks_health) == ("aws", ARN, "ip", True)
    assert Placement.from_status(pool.placement.to_status()) == pool.placement
