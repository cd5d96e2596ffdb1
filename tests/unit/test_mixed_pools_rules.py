"""Mixed pools (several sources, weights) and shared backends (--cluster-id): the pure parts."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolkeeper.backends.haproxy import HAProxyPool
from poolkeeper.core.addresses import LB_ALLOWANCE, AddressPolicy, parse_cidrs
from poolkeeper.core.model import ActualMember, AddMember, Admin, InstanceState, Phase, SetAdmin, SetWeight
from poolkeeper.core.naming import CLUSTER_ID, alternate_name, cluster_prefix, instance_part, member_name, pool_prefix
from poolkeeper.core.planner import desired_members, plan_pool, simulate
from poolkeeper.core.poolspec import InvalidSpec, PoolSpec, parse_pool
from poolkeeper.lifecycle.outbox_records import Scope, check_announced

LOOPBACK = AddressPolicy(parse_cidrs(["127.0.0.0/8"]), LB_ALLOWANCE)
HAPROXY = {"type": "HAProxy", "haproxy": {"loadBalancerRef": {"name": "edge"}, "backend": "web"}}
SLICES = {"type": "EndpointSlice", "endpointSlice": {"serviceName": "web"}}


def body(backend: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "web", "uid": "u"},
            "spec": {"port": 80, "backend": backend or HAPROXY, **spec}}


def mixed(pods: int | None = None, vms: int | None = None) -> list[dict[str, Any]]:
    def weight(w: int | None) -> dict[str, int]:
        return {} if w is None else {"weight": w}
    return [{"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}, **weight(pods)},
            {"kind": "Instance", "selector": {"matchLabels": {"group": "vms"}}, **weight(vms)}]


def inst(name: str, kind: str = "Pod", labels: dict[str, str] | None = None, n: int = 1) -> InstanceState:
    return InstanceState(kind, "ns", name, f"uid-{name}", f"127.0.0.{n}", labels or {"app": "web"}, Phase.UP, "")


def test_sources_parse_with_weights_and_haproxy_default() -> None:
    spec = parse_pool(body(sources=mixed(pods=10)))
    assert [(s.kind, s.weight) for s in spec.sources] == [("Pod", 10), ("Instance", 1)]  # unset: HAProxy's 1
    assert spec.kinds == ("Pod", "Instance")
    assert spec.selects("Instance", {"group": "vms"}) and not spec.selects("Pod", {"group": "vms"})
    single = parse_pool(body(source={"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}}))
    assert [(s.kind, s.weight) for s in single.sources] == [("Pod", 1)]


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "exactly one of spec.source and spec.sources"),
    ({"source": {"kind": "Pod", "selector": {}}, "sources": mixed()}, "exactly one"),
    ({"sources": []}, "at least one source"),
    ({"sources": mixed(pods=257)}, "spec.sources[0].weight 257 is not an integer from 0 to 256"),
    ({"sources": mixed(vms=-1)}, "spec.sources[1].weight"),
    ({"sources": [{"kind": "Service", "selector": {}}]}, "spec.sources[0].kind 'Service'"),
])
def test_bad_sources_are_refused_with_the_field_named(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=re.escape(message)):
        parse_pool(body(**spec))


def test_weights_are_refused_for_endpointslices_but_sources_are_not() -> None:
    with pytest.raises(InvalidSpec, match="EndpointSlice and ELBv2 targets have no weights"):
        parse_pool(body(SLICES, sources=mixed(pods=1)))
    spec = parse_pool(body(SLICES, sources=mixed()))
    assert [s.weight for s in spec.sources] == [None, None]


def test_members_come_from_every_source_with_its_weight() -> None:
    spec = parse_pool(body(sources=mixed(pods=3, vms=7)))
    instances = [inst("p1", n=1), inst("vm1", "Instance", {"group": "vms"}, 2),
                 inst("stray", "Instance", {"app": "web"}, 3)]  # an Instance with the Pods' labels: not selected
    desired, _ = desired_members(namespace="ns", pool="web", sources=spec.sources, port=80, instances=instances,
                                 policy=LOOPBACK)
    assert sorted((m.instance.name, m.weight) for m in desired.values()) == [("p1", 3), ("vm1", 7)]


def test_first_source_wins_an_instance_two_select() -> None:
    spec = parse_pool(body(sources=[{"kind": "Pod", "selector": {}, "weight": 5},
                                    {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}, "weight": 9}]))
    desired, _ = desired_members(namespace="ns", pool="web", sources=spec.sources, port=80,
                                 instances=[inst("p1")], policy=LOOPBACK)
    assert [m.weight for m in desired.values()] == [5]


def plan(spec: PoolSpec, actual: dict[str, ActualMember]) -> tuple[Any, ...]:
    desired, _ = desired_members(namespace="ns", pool="web", sources=spec.sources, port=80,
                                 instances=[inst("p1")], policy=LOOPBACK)
    return plan_pool(desired=desired, actual=actual, draining_since={}, now=0.0, deregistration_delay=30,
                     health_checks=False).actions


def test_a_weight_change_is_one_set_weight_in_place_and_idempotent() -> None:
    first = plan(parse_pool(body(sources=mixed(pods=200))), {})
    name = member_name("ns", "web", "uid-p1")
    assert first == (AddMember(name, "127.0.0.1", 80, None, 200), SetAdmin(name, Admin.READY))
    actual = simulate({}, first)
    actual = simulate(actual, [SetAdmin(name, Admin.READY)])
    assert actual[name].weight == 200 and not plan(parse_pool(body(sources=mixed(pods=200))), actual)
    shifted = plan(parse_pool(body(sources=mixed(pods=50))), actual)
    assert shifted == (SetWeight(name, 50),)  # no remove, no add: the server and its sessions stay
    assert not plan(parse_pool(body(sources=mixed(pods=50))), simulate(actual, shifted))
    # a weight dropped from the spec goes back to HAProxy's default, still in place
    assert plan(parse_pool(body(sources=mixed())), simulate(actual, shifted)) == (SetWeight(name, 1),)


def test_endpointslice_members_get_no_weight_actions() -> None:
    spec = parse_pool(body(SLICES, sources=mixed()))
    name = member_name("ns", "web", "uid-p1")
    actual = {name: ActualMember(name, "127.0.0.1", 80, Admin.READY, "", None, None)}
    assert plan(spec, actual) == ()


class _NoClient:
    endpoint = "unused"


def commands(action: Any, prefix: str = "") -> list[str]:
    pool = HAProxyPool(_NoClient(), "web", prefix or pool_prefix("ns", "web"), None)  # type: ignore[arg-type]
    return pool._commands(action)


def test_haproxy_commands_for_weights() -> None:
    name = member_name("ns", "web", "uid-p1")
    assert commands(SetWeight(name, 0)) == [f"set server web/{name} weight 0"]
    assert commands(AddMember(name, "127.0.0.1", 80, None, 256))[0].startswith(
        f"add server web/{name} 127.0.0.1:80 weight 256 ")
    with pytest.raises(ValueError, match="out of HAProxy's range"):
        commands(SetWeight(name, 300))


# ----- --cluster-id
def test_default_cluster_id_keeps_todays_names() -> None:
    assert cluster_prefix("") == "pk-"
    assert pool_prefix("ns", "web", "") == pool_prefix("ns", "web")
    assert member_name("ns", "web", "u", "v", cluster_id="") == member_name("ns", "web", "u", "v")
    assert parse_pool(body(sources=mixed())).prefix == pool_prefix("ns", "web")


@pytest.mark.parametrize("cluster_id", ["a", "eu-west-1", "0123456789abcdef"])
def test_cluster_names_fit_haproxy_and_keep_their_instance_part(cluster_id: str) -> None:
    name = member_name("ns", "web", "uid-1", "check:2:2:3", cluster_id=cluster_id)
    assert name.startswith(f"pk.{cluster_id}.") and len(alternate_name(name)) <= 64
    assert instance_part(alternate_name(name)) == member_name("ns", "web", "uid-1", cluster_id=cluster_id)
    spec = parse_pool(body(sources=mixed()), cluster_id)
    assert spec.prefix == pool_prefix("ns", "web", cluster_id) and spec.legacy_prefix == ""


@pytest.mark.parametrize("cluster_id", ["A", "-a", "a-", "a.b", "a_b", "x" * 17])
def test_bad_cluster_ids_are_refused(cluster_id: str) -> None:
    with pytest.raises(ValueError, match="cluster id"):
        cluster_prefix(cluster_id)


def test_operators_never_own_each_others_servers() -> None:
    """The same pool namespace/name in three clusters: each one's HAProxyPool owns only its own names."""
    ids = ["", "a", "a-b", "ab"]
    pools = {c: HAProxyPool(_NoClient(), "web", pool_prefix("ns", "web", c), None,  # type: ignore[arg-type]
                            legacy_prefix=parse_pool(body(sources=mixed()), c).legacy_prefix) for c in ids}
    names = {c: member_name("ns", "web", "uid-1", cluster_id=c) for c in ids}
    for owner, pool in pools.items():
        assert [c for c, name in names.items() if pool.owns(name) or pool.owns(alternate_name(name))] == [owner]
        assert not pool.owns("static")
    with pytest.raises(ValueError, match="does not belong to this pool"):
        commands(SetWeight(names["a"], 1))  # the default operator refuses to touch cluster a's server


def test_outbox_records_accept_the_clusters_member_names() -> None:
    instance = {"kind": "Pod", "namespace": "ns", "name": "p1", "uid": "uid-1"}
    mine = member_name("ns", "web", "uid-1", cluster_id="a")
    entry = {"instance": instance, "seq": 1, "state": "up", "member": mine}
    assert check_announced("uid-1", entry, Scope("h", "ns", "web", cluster_id="a")) is None
    assert check_announced("uid-1", entry, Scope("h", "ns", "web")) is not None


def test_status_rows_show_the_weight_where_there_is_one() -> None:
    from poolkeeper.controller.report import member_row

    spec = parse_pool(body(sources=mixed(pods=40)))
    desired, _ = desired_members(namespace="ns", pool="web", sources=spec.sources, port=80,
                                 instances=[inst("p1")], policy=LOOPBACK)
    name = member_name("ns", "web", "uid-p1")
    actual = {name: ActualMember(name, "127.0.0.1", 80, Admin.READY, "", 0, 40)}
    report = plan_pool(desired=desired, actual=actual, draining_since={}, now=0.0, deregistration_delay=30,
                       health_checks=False).members[0]
    assert report.weight == 40 and member_row(report, "now", {})["weight"] == 40
    gone = plan_pool(desired={}, actual=actual, draining_since={}, now=0.0, deregistration_delay=30,
                     health_checks=False).members[0]
    assert gone.weight == 40  # a draining leftover still shows what it has
    assert "weight" not in member_row(replace(report, weight=None), "now", {})  # EndpointSlices: no weights


def test_status_names_every_source_kind_once_for_the_source_column() -> None:
    from poolkeeper.controller.report import PoolReport, pool_status
    from poolkeeper.core.conditions import Condition

    def source_of(spec: PoolSpec | None) -> str:
        report = PoolReport([], Condition("Synced", True, "Synced", ""))
        return str(pool_status(body(), spec, report, "now")["source"])

    two_pod_sources = [*mixed(), {"kind": "Pod", "selector": {"matchLabels": {"app": "api"}}}]
    assert source_of(parse_pool(body(sources=two_pod_sources))) == "Pod,Instance"
    assert source_of(parse_pool(body(source={"kind": "Node"}))) == "Node"
    assert source_of(None) == ""  # an invalid spec has no sources to name


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.one_of(st.just(""), st.from_regex(CLUSTER_ID, fullmatch=True)), min_size=2, max_size=2,
                    unique=True),
       pools=st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8)), min_size=1,
                      max_size=2),
       uid=st.text(max_size=8))
def test_no_cluster_owns_another_clusters_names(ids: list[str], pools: list[tuple[str, str]], uid: str) -> None:
    """Whatever the ids and pool names: a name made under one id never carries another id's prefix."""
    mine, other = ids
    for ns, pool in pools:
        name = member_name(ns, pool, uid, "check:2:2:3", cluster_id=mine)
        assert name.startswith(cluster_prefix(mine)) and not name.startswith(cluster_prefix(other))
        assert instance_part(alternate_name(name)) == member_name(ns, pool, uid, cluster_id=mine)


# ----- an EC2 source among others (issue 11: Pods and EC2 instances in one backend)
def ec2_source(weight: int | None = None, **ec2: Any) -> dict[str, Any]:
    return {"kind": "EC2", "ec2": {"region": "us-east-1", "queueURL": "https://sqs/q", "tags": {"app": "web"}, **ec2},
            **({} if weight is None else {"weight": weight})}


def test_an_ec2_source_is_one_of_several_with_its_own_weight() -> None:
    pods = {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}, "weight": 64}
    spec = parse_pool(body(sources=[pods, ec2_source(192, credentialsSecretRef={"name": "aws"})]))
    assert isinstance(spec, PoolSpec)
    assert [(s.kind, s.weight) for s in spec.sources] == [("Pod", 64), ("EC2", 192)]
    assert spec.kinds == ("Pod", "EC2")
    assert spec.ec2 is not None and spec.ec2.credentials_secret == "aws" and spec.ec2.tag_map == {"app": "web"}
    assert spec.ec2_source is not None and spec.ec2_source.where == "spec.sources[1]"
    assert spec.selects("EC2", {"app": "web", "Name": "vm"}) and spec.selects("Pod", {"app": "web"})
    assert not spec.selects("EC2", {"app": "api"})
    # the EC2 instances take the EC2 source's weight, the pods the Pod source's, in one backend
    ec2 = replace(inst("i-0abc", kind="EC2", n=9), ec2_id="i-0abc")
    desired, _ = desired_members(namespace="ns", pool="web", sources=spec.sources, port=80,
                                 instances=[inst("p1", n=2), ec2], policy=LOOPBACK, held=frozenset(), variant="")
    assert sorted((m.instance.kind, m.weight) for m in desired.values()) == [("EC2", 192), ("Pod", 64)]
    # a pool without an EC2 source has none, whatever else it takes
    assert parse_pool(body(sources=mixed())).ec2 is None


def test_an_ec2_source_alone_still_works_as_spec_source() -> None:
    spec = parse_pool(body(source=ec2_source()))
    assert spec.ec2 is not None and spec.ec2_source is not None and spec.ec2_source.where == "spec.source"
    assert [(s.kind, s.weight) for s in spec.sources] == [("EC2", 1)]


@pytest.mark.parametrize(("sources", "message"), [
    ([ec2_source(), ec2_source(tags={"app": "api"})], "at most one EC2 source"),
    ([{"kind": "Pod", "selector": {}}, ec2_source(tags={})], "spec.sources[1].ec2.tags must select instances"),
])
def test_ec2_sources_that_cannot_work_are_refused_with_the_field_named(sources: list[Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=re.escape(message)):
        parse_pool(body(sources=sources))


def test_ec2_weights_need_haproxy_as_every_weight_does() -> None:
    elbv2 = {"type": "ELBv2", "elbv2": {"loadBalancerRef": {"name": "aws"}, "targetGroupARN": "arn:tg"}}
    with pytest.raises(InvalidSpec, match="needs an HAProxy backend"):
        parse_pool(body(elbv2, sources=[{"kind": "Pod", "selector": {}}, ec2_source(5)]))
    spec = parse_pool(body(elbv2, sources=[{"kind": "Pod", "selector": {}}, ec2_source()]))
    assert spec.ec2 is not None and [s.weight for s in spec.sources] == [None, None]


def test_the_ec2_tenancy_message_names_the_source_where_it_is() -> None:
    from poolkeeper.core.tenancy import ec2_source_refusal, parse_ec2_source_namespaces

    why = ec2_source_refusal("ns", {}, own_credentials=False, endpoint_url="", where="spec.sources[1]",
                             policy=parse_ec2_source_namespaces(None))
    assert why is not None and "spec.sources[1].ec2.credentialsSecretRef" in why


def test_the_crd_takes_an_ec2_source_alike_in_source_and_in_sources() -> None:
    """The CRD cannot share a schema between two places ($ref is not allowed): the copy must not drift."""
    import yaml

    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "manifests" / "crds" / "targetpools.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    item, single = spec["sources"]["items"], spec["source"]
    assert item["properties"]["ec2"] == single["properties"]["ec2"]
    assert "EC2" in item["properties"]["kind"]["enum"] and "EC2" in single["properties"]["kind"]["enum"]
