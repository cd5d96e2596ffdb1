"""Pure core pieces: selectors, instance conversion, heartbeats, slices, transitions, conditions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from poolkeeper.core import heartbeats
from poolkeeper.core.addresses import parse_cidrs, refusal
from poolkeeper.core.conditions import Condition, merge_conditions
from poolkeeper.core.model import DesiredMember, InstanceState, Phase
from poolkeeper.core.poolspec import InvalidSpec, backend_refusal, namespace_allowed, parse_load_balancer, parse_pool
from poolkeeper.core.selectors import LabelSelector, SelectorError
from poolkeeper.core.slices import layout
from poolkeeper.core.transitions import Announced, instance_transitions, member_states, member_transition
from poolkeeper.sources.convert import instance_state, node_state, pod_state


# ---------------------------------------------------------------- selectors
@pytest.mark.parametrize(("spec", "labels", "expected"), [
    ({"matchLabels": {"app": "web"}}, {"app": "web", "x": "1"}, True),
    ({"matchLabels": {"app": "web"}}, {"app": "api"}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}, {"tier": "b"}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {"tier": "a"}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {"tier": ""}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, {"tier": "x"}, False),
    ({}, {"anything": "1"}, True),
    (None, {}, True),
])
def test_selector_matching(spec: Any, labels: dict[str, str], expected: bool) -> None:
    assert LabelSelector.parse(spec).matches(labels) is expected


def test_selector_query_string() -> None:
    sel = LabelSelector.parse({"matchLabels": {"app": "web"}, "matchExpressions": [
        {"key": "t", "operator": "In", "values": ["b", "a"]}, {"key": "x", "operator": "DoesNotExist"},
        {"key": "y", "operator": "Exists"}, {"key": "z", "operator": "NotIn", "values": ["q"]}]})
    assert sel.to_query() == "app=web,t in (a,b),!x,y,z notin (q)"


def test_selector_errors() -> None:
    with pytest.raises(SelectorError):
        LabelSelector.parse({"matchExpressions": [{"key": "a", "operator": "Near"}]})
    with pytest.raises(SelectorError):
        LabelSelector.parse({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]})


# ---------------------------------------------------------------- addresses
def test_address_refusals() -> None:
    assert refusal("10.1.2.3", None) is None
    assert "cloud metadata" in str(refusal("169.254.169.254", None))
    assert "loopback" in str(refusal("127.0.0.1", None))
    assert "link-local" in str(refusal("fe80::1", parse_cidrs(["::/0"])))
    assert "outside" in str(refusal("10.1.2.3", parse_cidrs(["192.0.2.0/24"])))
    assert refusal("192.0.2.7", parse_cidrs(["192.0.2.0/24"])) is None
    assert "no address" in str(refusal(None, None))
    assert "not an IP" in str(refusal("example.com", None))
    with pytest.raises(ValueError, match="invalid CIDR"):
        parse_cidrs(["10.0.0.0/33"])


# ---------------------------------------------------------------- conversion
def pod(ready: str = "True", ip: str | None = "10.0.0.5", phase: str = "Running", deleting: bool = False,
        gates: tuple[str, ...] = (), containers_ready: str = "True", gate_status: str | None = None) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": ready}, {"type": "ContainersReady", "status": containers_ready}]
    if gate_status is not None:
        conditions.append({"type": gates[0], "status": gate_status})
    meta: dict[str, Any] = {"namespace": "ns", "name": "p", "uid": "u1", "labels": {"app": "web"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"readinessGates": [{"conditionType": g} for g in gates]},
            "status": {"phase": phase, "podIP": ip, "conditions": conditions}}


@pytest.mark.parametrize(("obj", "deleted", "phase"), [
    (pod(), False, Phase.UP),
    (pod(ready="False"), False, Phase.DOWN),
    (pod(ip=None), False, Phase.DOWN),
    (pod(phase="Succeeded"), False, Phase.DOWN),
    (pod(phase="Failed"), False, Phase.DOWN),
    (pod(deleting=True), False, Phase.DRAINING),
    (pod(deleting=True, ready="False"), False, Phase.DOWN),
    (pod(), True, Phase.DOWN),
    # with our readiness gate, ContainersReady stands in for Ready (which waits on the gate)
    (pod(ready="False", gates=("poolkeeper.dev/web",)), False, Phase.UP),
    (pod(ready="False", containers_ready="False", gates=("poolkeeper.dev/web",)), False, Phase.DOWN),
    # someone else's gate changes nothing
    (pod(ready="False", gates=("example.com/other",)), False, Phase.DOWN),
])
def test_pod_phases(obj: dict[str, Any], deleted: bool, phase: Phase) -> None:
    assert pod_state(obj, deleted=deleted).phase is phase


def test_pod_keeps_gate_status() -> None:
    state = pod_state(pod(gates=("poolkeeper.dev/web",), gate_status="False"))
    assert dict(state.gates) == {"poolkeeper.dev/web": "False"}
    assert state.ref == "Pod/ns/p" and state.address == "10.0.0.5"


def node(ready: str = "True", unschedulable: bool = False, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "n1", "uid": "nu", "labels": labels or {}},
            "spec": {"unschedulable": unschedulable},
            "status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                     {"type": "InternalIP", "address": "192.0.2.9"}],
                       "conditions": [{"type": "Ready", "status": ready}]}}


def test_node_phases() -> None:
    assert node_state(node()).phase is Phase.UP and node_state(node()).address == "192.0.2.9"
    assert node_state(node()).ref == "Node/n1"
    assert node_state(node(unschedulable=True)).phase is Phase.DRAINING
    assert node_state(node(ready="False")).phase is Phase.DOWN
    excluded = node(labels={"node.kubernetes.io/exclude-from-external-load-balancers": ""})
    assert node_state(excluded).phase is Phase.DOWN
    assert node_state(node(), deleted=True).phase is Phase.DOWN


@pytest.mark.parametrize(("state", "fresh", "phase"), [
    ("running", True, Phase.UP), ("running", False, Phase.DOWN), ("stopping", True, Phase.DRAINING),
    ("stopped", True, Phase.DOWN), ("terminated", True, Phase.DOWN), ("pending", True, Phase.DOWN),
])
def test_instance_phases(state: str, fresh: bool, phase: Phase) -> None:
    obj = {"metadata": {"namespace": "ns", "name": "vm", "uid": "v"}, "spec": {"address": "192.0.2.5"},
           "status": {"state": state}}
    assert instance_state(obj, heartbeat_fresh=fresh).phase is phase


# ---------------------------------------------------------------- heartbeats
def test_heartbeat_timed_by_own_clock() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    first = heartbeats.observe(None, "t1", 100.0, now, now - timedelta(seconds=4))
    assert first is not None and first.seen_at == pytest.approx(96.0)  # back-dated after a restart
    assert heartbeats.observe(first, "t1", 200.0, now, None) is first  # unchanged: no refresh
    second = heartbeats.observe(first, "t2", 150.0, now, now - timedelta(seconds=50))
    assert second is not None and second.seen_at == 150.0  # a change is timed by our clock
    assert heartbeats.expires_in(second, 10, 155.0) == pytest.approx(5.0)
    assert heartbeats.expires_in(second, 10, 161.0) < 0
    assert heartbeats.expires_in(None, 10, 1.0) == 0.0
    assert heartbeats.expires_in(second, None, 1.0) is None
    assert heartbeats.observe(first, None, 1.0, now, None) is None


# ---------------------------------------------------------------- pool specs
def pool_body(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"source": {"kind": "Pod", "selector": {"matchLabels": {"a": "b"}}}, "port": 80,
                            "backend": {"type": "HAProxy", "haproxy": {"loadBalancerRef": {"name": "lb"},
                                                                       "backend": "be"}}}
    base.update(spec)
    return {"metadata": {"namespace": "ns", "name": "p", "uid": "u", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": base}


def test_parse_pool_and_claims() -> None:
    spec = parse_pool(pool_body())
    assert (spec.load_balancer, spec.backend) == ("lb", "be")
    assert spec.health_check is None and spec.deregistration_delay == 30
    hc = parse_pool(pool_body(backend={"type": "HAProxy", "haproxy": {
        "loadBalancerRef": {"name": "lb"}, "backend": "be", "healthCheck": {"intervalSeconds": 1}}}))
    assert hc.health_check is not None and (hc.health_check.rise, hc.health_check.fall) == (2, 3)
    es = parse_pool(pool_body(backend={"type": "EndpointSlice", "endpointSlice": {"serviceName": "svc"}}))
    assert (es.backend_type, es.service) == ("EndpointSlice", "svc")
    with pytest.raises(InvalidSpec):
        parse_pool(pool_body(source={"kind": "Pod", "selector": {"matchExpressions": [{"key": "a", "operator": "X"}]}}))


def test_load_balancer_namespace_policy() -> None:
    lb = parse_load_balancer({"metadata": {"name": "lb"}, "spec": {"haproxy": {"endpoint": "unix:///x"},
                              "allowedNamespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}}})
    assert namespace_allowed(lb, {"team": "a"}) and not namespace_allowed(lb, {"team": "b"})
    assert not namespace_allowed(lb, None)
    everyone = parse_load_balancer({"metadata": {"name": "lb"}, "spec": {"haproxy": {"endpoint": "unix:///x"}}})
    assert namespace_allowed(everyone, None)


def test_load_balancer_backends_are_listed_per_namespace() -> None:
    """Only listed backends may be driven; a backend's own allowedNamespaces replaces the LB-wide default."""
    team_a = {"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}
    lb = parse_load_balancer({"metadata": {"name": "lb"}, "spec": {
        "haproxy": {"endpoint": "unix:///x",
                    "backends": [{"name": "be_web"}, {"name": "be_a", "allowedNamespaces": team_a}]},
        "allowedNamespaces": {"from": "All"}}})
    assert backend_refusal(lb, "be_web", "anyone", None) is None
    assert backend_refusal(lb, "be_a", "a", {"team": "a"}) is None
    why = backend_refusal(lb, "be_a", "b", {"team": "b"})
    assert why is not None and "namespace b" in why and "be_a" in why and "LoadBalancer lb" in why
    why = backend_refusal(lb, "be_other_app", "a", {"team": "a"})
    assert why is not None and "does not list backend be_other_app" in why
    unlisted = parse_load_balancer({"metadata": {"name": "old"}, "spec": {"haproxy": {"endpoint": "unix:///x"}}})
    why = backend_refusal(unlisted, "be_web", "a", {})
    assert unlisted.backends == () and why is not None and "lists no backends" in why
    narrow = parse_load_balancer({"metadata": {"name": "lb"}, "spec": {
        "haproxy": {"endpoint": "unix:///x", "backends": [{"name": "be"}]}, "allowedNamespaces": team_a}})
    assert backend_refusal(narrow, "be", "a", {"team": "a"}) is None
    assert backend_refusal(narrow, "be", "b", {"team": "b"}) is not None
    with pytest.raises(InvalidSpec):
        parse_load_balancer({"metadata": {"name": "lb"}, "spec": {
            "haproxy": {"endpoint": "unix:///x", "backends": [{"name": "be"}, {"name": "be"}]}}})


# ---------------------------------------------------------------- slices
def test_slice_layout_is_stable_and_bounded() -> None:
    def key(ep: dict[str, Any]) -> str:
        return str(ep["k"])

    wanted = {f"m{i:03}": {"k": f"m{i:03}"} for i in range(250)}
    fresh = layout({}, wanted, key, limit=100)
    assert [len(s) for s in fresh.new] == [100, 100, 50] and not fresh.existing
    current = {"s1": fresh.new[0], "s2": fresh.new[1], "s3": fresh.new[2]}
    assert not layout(current, wanted, key, limit=100).changed  # nothing to write
    del wanted["m005"]
    wanted["m999"] = {"k": "m999"}
    step = layout(current, wanted, key, limit=100)
    assert step.changed == {"s1"} and not step.new and not step.delete
    emptied = layout(current, {k: v for k, v in wanted.items() if k >= "m100"}, key, limit=100)
    assert emptied.delete == ["s1"]
    # 20 survivors spread over two slices are folded into one
    survivors = {k: v for k, v in wanted.items() if k in {"m010", "m011", "m150", "m151"}}
    folded = layout(current, survivors, key, limit=100)
    assert len(folded.existing) + len(folded.new) == 1 and len(folded.delete) == 2


# ---------------------------------------------------------------- transitions
def member(name: str, serving: bool = True, phase: Phase = Phase.UP) -> DesiredMember:
    inst = InstanceState("Pod", "ns", name, f"uid-{name}", "10.0.0.1", {}, phase, "r")
    return DesiredMember(f"m-{name}", inst, "10.0.0.1", 80, serving)


def test_transitions_in_order_and_coalesced() -> None:
    current = member_states({"a": member("a"), "b": member("b", serving=False, phase=Phase.DRAINING)})
    first = instance_transitions({}, current, {})
    assert [(t.instance.name, t.from_state, t.to_state, t.seq) for t in first] == [
        ("a", "none", "up", 1), ("b", "none", "draining", 1)]
    announced = {"uid-a": Announced("up", 1), "uid-b": Announced("draining", 1)}
    assert instance_transitions(announced, current, {}) == []
    gone = instance_transitions(announced, {}, {"uid-a": (member("a").instance, "m-a")})
    assert [(t.event_type, t.from_state, t.seq) for t in gone] == [("down", "up", 2)]  # b unknown: skipped
    # coalescing across a restart: announced up@3, now draining -> one event, seq 4
    again = instance_transitions({"uid-a": Announced("up", 3)},
                                 member_states({"a": member("a", serving=False)}), {})
    assert [(t.from_state, t.to_state, t.seq) for t in again] == [("up", "draining", 4)]
    reg = member_transition(Announced("up", 4), member("a").instance, "m-a", "registered", "in rotation")
    assert (reg.seq, reg.from_state, reg.to_state) == (5, "up", "up")


# ---------------------------------------------------------------- conditions
def test_conditions_keep_transition_time() -> None:
    first = merge_conditions(None, [Condition("Ready", True, "Ok", "m")], 3, "t1")
    assert first == [{"type": "Ready", "status": "True", "reason": "Ok", "message": "m",
                      "lastTransitionTime": "t1", "observedGeneration": 3}]
    same = merge_conditions(first, [Condition("Ready", True, "Ok", "other message")], 4, "t2")
    assert same[0]["lastTransitionTime"] == "t1"
    flipped = merge_conditions(first, [Condition("Ready", False, "Bad", "x")], 4, "t3")
    assert flipped[0]["lastTransitionTime"] == "t3" and flipped[0]["status"] == "False"
    assert merge_conditions(None, [Condition("X", None, "Unknown")], None, "t")[0]["status"] == "Unknown"


def test_in_cluster_server_comes_from_the_kubelet_environment() -> None:
    from poolkeeper.kube.credentials import in_cluster_server

    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "198.19.0.1", "KUBERNETES_SERVICE_PORT": "443"}) == \
        "https://198.19.0.1:443"
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}) == \
        "https://[fd00::1]:443"
    assert in_cluster_server({}) is None
