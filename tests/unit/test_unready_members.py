"""Unready pods keep their servers in a health-checked pool: every case of the rule, and its properties.

A pod that turns unready but is alive (exists, not terminating, still at its address) keeps its
server, drained with its health checks going on, for the pool's deregistration delay; Ready again,
it is back in rotation at once when its checks pass. Gone, terminating, or unready past the delay:
removed as before. A pool without health checks is unchanged. Handlers still hear `down`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from poolkeeper.core.addresses import LB_ALLOWANCE, AddressPolicy, parse_cidrs
from poolkeeper.core.model import (
    ActualMember,
    Admin,
    DesiredMember,
    InstanceState,
    MemberState,
    Phase,
    Plan,
    RemoveMember,
    SetAdmin,
)
from poolkeeper.core.naming import alternate_name, member_name
from poolkeeper.core.planner import (
    UNREADY_TOO_LONG,
    desired_members,
    plan_pool,
    simulate,
    unready_members,
)
from poolkeeper.core.poolspec import SourceSpec
from poolkeeper.core.selectors import LabelSelector
from poolkeeper.core.transitions import DOWN, UP, Announced, instance_transitions, member_states
from poolkeeper.sources.convert import pod_state

LOOPBACK = AddressPolicy(parse_cidrs(["127.0.0.0/8"]), LB_ALLOWANCE)
WEB = (SourceSpec("Pod", LabelSelector.parse({"matchLabels": {"app": "web"}})),)
DELAY = 30.0
NAME = member_name("ns", "web", "uid-a")


def pod(ready: bool = True, *, ip: str | None = "127.0.0.2", terminating: bool = False, phase: str = "Running",
        gated: bool = False, containers_ready: bool | None = None) -> dict[str, Any]:
    """A Pod object as the API server sends it."""
    conditions = [{"type": "Ready", "status": str(ready)}]
    if containers_ready is not None:
        conditions.append({"type": "ContainersReady", "status": str(containers_ready)})
    meta: dict[str, Any] = {"namespace": "ns", "name": "a", "uid": "uid-a", "labels": {"app": "web"}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec = {"readinessGates": [{"conditionType": "poolkeeper.dev/web"}]} if gated else {}
    status: dict[str, Any] = {"phase": phase, "conditions": conditions}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "spec": spec, "status": status}


def unready_of(*instances: InstanceState) -> dict[str, DesiredMember]:
    return unready_members(namespace="ns", pool="web", sources=WEB, port=80, instances=instances, policy=LOOPBACK)


def desired_of(*instances: InstanceState) -> dict[str, DesiredMember]:
    return desired_members(namespace="ns", pool="web", sources=WEB, port=80, instances=instances, policy=LOOPBACK)[0]


def plan(instance: InstanceState, actual: dict[str, ActualMember], *, since: float | None = None, now: float = 100.0,
         checks: bool = True, keep: frozenset[str] = frozenset()) -> Plan:
    """The plan for a pool holding one instance, as the controller makes it for an HAProxy pool."""
    return plan_pool(desired=desired_of(instance), actual=actual,
                     draining_since={} if since is None else {n: since for n in actual}, now=now,
                     deregistration_delay=DELAY, health_checks=checks, keep=keep, unready=unready_of(instance))


def server(admin: Admin = Admin.READY, health: str = "UP", sessions: int = 0, name: str = NAME,
           address: str = "127.0.0.2") -> dict[str, ActualMember]:
    return {name: ActualMember(name, address, 80, admin, health, sessions)}


READY = pod_state(pod())
UNREADY = pod_state(pod(ready=False))


# ----- which pods are "unready but alive"
def test_only_a_live_pod_that_is_merely_not_ready_is_unready() -> None:
    assert UNREADY.phase is Phase.DOWN and UNREADY.unready
    assert pod_state(pod(gated=True, containers_ready=False)).unready  # gated pods: ContainersReady decides
    assert not READY.unready and READY.phase is Phase.UP
    for gone in (pod_state(pod(ready=False), deleted=True), pod_state(pod(ready=False, terminating=True)),
                 pod_state(pod(ready=False, phase="Failed")), pod_state(pod(ready=False, phase="Succeeded")),
                 pod_state(pod(ready=False, ip=None))):
        assert gone.phase is Phase.DOWN and not gone.unready, gone


def test_unready_members_follow_the_pools_selector_namespace_and_address_policy() -> None:
    def unready(name: str, **changes: Any) -> InstanceState:
        return replace(UNREADY, name=name, uid=f"uid-{name}", **changes)

    kept = unready_of(unready("a"), unready("other-app", labels={"app": "api"}),
                      unready("other-ns", namespace="x"), unready("refused", address="169.254.169.254"),
                      replace(READY, name="ready", uid="uid-ready"),
                      replace(UNREADY, name="gone", uid="uid-gone", unready=False))
    assert list(kept) == [NAME]
    assert kept[NAME].address == "127.0.0.2" and kept[NAME].port == 80 and not kept[NAME].serving
    assert unready_members(namespace="ns", pool="web", sources=WEB, port=80, instances=[unready("a")],
                           policy=LOOPBACK, variant="check:2:2:3") == {
        member_name("ns", "web", "uid-a", "check:2:2:3"): replace(
            kept[NAME], name=member_name("ns", "web", "uid-a", "check:2:2:3"))}


def test_handlers_still_hear_down_and_up() -> None:
    """Keeping the server changes nothing for up / draining / down: the pod is no member while unready."""
    assert desired_of(UNREADY) == {}
    (down,) = instance_transitions({"uid-a": Announced(UP, 1)}, member_states(desired_of(UNREADY)),
                                   {"uid-a": (UNREADY, NAME)})
    assert (down.event_type, down.from_state, down.reason) == (DOWN, UP, "pod not ready")
    (up,) = instance_transitions({"uid-a": Announced(DOWN, 2)}, member_states(desired_of(READY)), {})
    assert (up.event_type, up.from_state) == (UP, DOWN)


# ----- the flap: unready within the delay, then Ready again
def test_a_flap_within_the_delay_keeps_the_server_and_returns_it_at_once() -> None:
    first = plan(UNREADY, server())
    assert first.actions == (SetAdmin(NAME, Admin.DRAIN),), "out of rotation, not removed"
    (row,) = first.members
    assert row.state is MemberState.DRAINING and row.instance == "Pod/ns/a" and row.health == "UP"
    assert row.reason.startswith("pod not ready: out of rotation") and "30 s" in row.reason
    assert first.draining_since == {NAME: 100.0}
    idle = server(Admin.DRAIN, sessions=0)
    later = plan(UNREADY, idle, since=100.0, now=129.9)
    assert later.actions == () and later.draining_since == {NAME: 100.0}, "no sessions left: still kept"
    back = plan(READY, idle, since=100.0, now=129.9)
    assert back.actions == (SetAdmin(NAME, Admin.READY),), "checks passing: straight back, no first check"
    assert back.draining_since == {}
    after = plan(READY, simulate(idle, back.actions), now=130.0)
    assert after.actions == () and after.members[0].state is MemberState.ACTIVE


def test_a_flap_with_failing_checks_waits_for_them_to_pass() -> None:
    failing = server(Admin.DRAIN, health="DOWN")
    assert plan(UNREADY, failing, since=100.0, now=110.0).actions == ()  # kept, though its checks fail
    back = plan(READY, failing, since=100.0, now=110.0)
    assert back.actions == ()
    assert back.members[0].state is MemberState.REGISTERING and "DOWN" in back.members[0].reason
    assert plan(READY, server(Admin.DRAIN, health="UP")).actions == (SetAdmin(NAME, Admin.READY),)


def test_a_server_still_waiting_for_its_first_check_is_kept_too() -> None:
    """A pod that flaps before its first check passed: the check goes on, the server is not re-added."""
    checking = server(Admin.DRAIN, health="CHECKING")
    assert plan(UNREADY, checking, since=100.0, now=120.0).actions == ()
    assert plan(READY, checking).actions == ()
    assert plan(READY, server(Admin.DRAIN, health="UP")).actions == (SetAdmin(NAME, Admin.READY),)


# ----- removal: past the delay, terminating, deleted
def test_unready_past_the_delay_is_removed() -> None:
    idle = server(Admin.DRAIN, sessions=0)
    assert plan(UNREADY, idle, since=100.0, now=130.0).actions == (RemoveMember(NAME, UNREADY_TOO_LONG, force=True),)
    busy = server(Admin.DRAIN, sessions=4)
    assert plan(UNREADY, busy, since=100.0, now=131.0).actions == (RemoveMember(NAME, UNREADY_TOO_LONG, force=True),)


def test_a_blocking_hook_still_holds_a_kept_server_past_the_delay() -> None:
    assert plan(UNREADY, server(Admin.DRAIN), since=100.0, now=200.0, keep=frozenset([NAME])).actions == ()


def test_terminating_and_deleted_pods_leave_as_before() -> None:
    """Drained, then removed once their sessions end (or at the delay), without waiting for it."""
    for gone in (pod_state(pod(ready=False, terminating=True)), pod_state(pod(ready=False), deleted=True),
                 pod_state(pod(ready=False, phase="Failed"))):
        assert plan(gone, server()).actions == (SetAdmin(NAME, Admin.DRAIN),)
        assert plan(gone, server(Admin.DRAIN, sessions=2), since=100.0, now=110.0).actions == ()
        assert plan(gone, server(Admin.DRAIN), since=100.0, now=101.0).actions == (
            RemoveMember(NAME, "no longer desired"),)
        report = plan(gone, server(Admin.DRAIN, sessions=2), since=100.0, now=110.0).members[0]
        assert report.reason == "instance left the pool; draining"


def test_a_terminating_ready_pod_drains_as_before() -> None:
    draining = pod_state(pod(terminating=True))
    assert draining.phase is Phase.DRAINING and not draining.unready
    assert plan(draining, server(Admin.DRAIN), since=100.0, now=101.0).actions == (RemoveMember(NAME, "drained"),)


def test_a_server_at_another_address_is_not_kept() -> None:
    """The pod's address changed while unready: its old server stands for nothing that can come back."""
    moved = server(Admin.DRAIN, address="127.0.0.9")
    assert plan(UNREADY, moved, since=100.0, now=101.0).actions == (RemoveMember(NAME, "no longer desired"),)


def test_a_server_under_the_members_other_name_is_kept() -> None:
    other = alternate_name(NAME)
    kept = plan(UNREADY, server(Admin.DRAIN, name=other), since=100.0, now=110.0)
    assert kept.actions == () and kept.members[0].state is MemberState.DRAINING
    assert plan(UNREADY, server(Admin.DRAIN, name=other), since=100.0, now=130.0).actions == (
        RemoveMember(other, UNREADY_TOO_LONG, force=True),)


def test_a_pool_without_health_checks_is_unchanged() -> None:
    """A server is back in one step there (no first check to wait for): nothing is kept."""
    for actual, since, now in ((server(health=""), None, 100.0), (server(Admin.DRAIN, "", 0), 100.0, 101.0),
                               (server(Admin.DRAIN, "", 3), 100.0, 110.0), (server(Admin.DRAIN, "", 3), 100.0, 130.0)):
        with_unready = plan(UNREADY, actual, since=since, now=now, checks=False)
        without = plan_pool(desired={}, actual=actual, draining_since={} if since is None else {NAME: since},
                            now=now, deregistration_delay=DELAY, health_checks=False)
        assert with_unready == without
    assert plan(UNREADY, server(Admin.DRAIN, "", 0), since=100.0, now=101.0, checks=False).actions == (
        RemoveMember(NAME, "no longer desired"),)


# ----- properties
@st.composite
def flaps(draw: st.DrawFn) -> tuple[list[InstanceState], dict[str, ActualMember], dict[str, float], float]:
    """Pods in every state (ready, unready, terminating, deleted), servers in every admin and health state."""
    states = [READY, UNREADY, pod_state(pod(ready=False, terminating=True)), pod_state(pod(terminating=True)),
              pod_state(pod(ready=False), deleted=True)]
    names = draw(st.lists(st.sampled_from("abcdef"), unique=True, max_size=6))
    instances = [replace(draw(st.sampled_from(states)), name=n, uid=f"uid-{n}") for n in names]
    actual, since = {}, {}
    for n in draw(st.lists(st.sampled_from("abcdef"), unique=True, max_size=6)):
        name = member_name("ns", "web", f"uid-{n}")
        actual[name] = ActualMember(name, "127.0.0.2", 80, draw(st.sampled_from(list(Admin))),
                                    draw(st.sampled_from(["UP", "DOWN", "CHECKING"])), draw(st.integers(0, 2)))
        if draw(st.booleans()):
            since[name] = draw(st.floats(0, 100))
    return instances, actual, since, draw(st.floats(100, 200))


def _plan_all(instances: list[InstanceState], actual: dict[str, ActualMember], since: dict[str, float],
              now: float) -> Plan:
    return plan_pool(desired=desired_of(*instances), actual=actual, draining_since=since, now=now,
                     deregistration_delay=DELAY, health_checks=True, unready=unready_of(*instances))


@settings(max_examples=300, deadline=None)
@given(flaps())
def test_kept_servers_stay_out_of_rotation_until_the_delay_then_go(scenario: Any) -> None:
    instances, actual, since, now = scenario
    kept = {n for n, m in unready_of(*instances).items() if n in actual}
    first = _plan_all(instances, actual, since, now)
    assert first == _plan_all(instances, actual, since, now)  # deterministic
    for action in first.actions:
        assert not (isinstance(action, SetAdmin) and action.name in kept and action.admin is Admin.READY)
        if isinstance(action, RemoveMember) and action.name in kept:
            assert now - since.get(action.name, now) >= DELAY and action.force
    for name in kept - {a.name for a in first.actions if isinstance(a, RemoveMember)}:
        assert first.draining_since[name] == since.get(name, now)  # the delay runs from the first unready plan
        assert [r.state for r in first.members if r.name == name] == [MemberState.DRAINING]
    # converges: applying the plan and planning again (sessions gone, checks passed) ends in no actions
    state = simulate(actual, first.actions)
    held_since = dict(first.draining_since)
    for _ in range(4):
        state = {n: replace(m, sessions=0, health="UP") for n, m in state.items()}
        step = _plan_all(instances, state, held_since, now)
        state, held_since = simulate(state, step.actions), dict(step.draining_since)
    assert _plan_all(instances, state, held_since, now).actions == ()
    serving = {n for n, m in desired_of(*instances).items() if m.serving}
    assert {n for n, m in state.items() if m.admin is Admin.READY} == serving
    assert set(state) <= set(desired_of(*instances)) | kept
