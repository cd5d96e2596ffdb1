"""healthCheck.initialState: Up (a ready member enters rotation at once, marked healthy) vs Checking.

Every way a server can enter rotation is covered: a new member, one back from unready (a kept,
drained server), one released by a blocking hook (MAINT), every member re-added after an HAProxy
restart, successors of changed server settings; for Pod, Node, Instance and EC2 sources alike.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolkeeper.core.addresses import LB_ALLOWANCE, AddressPolicy, parse_cidrs
from poolkeeper.core.model import (
    ActualMember,
    AddMember,
    Admin,
    DesiredMember,
    InstanceState,
    MemberState,
    Phase,
    Plan,
    RemoveMember,
    SetAdmin,
)
from poolkeeper.core.naming import member_name
from poolkeeper.core.planner import desired_members, plan_pool, simulate, unready_members
from poolkeeper.core.poolspec import InitialState, InvalidSpec, SourceSpec, parse_pool
from poolkeeper.core.selectors import LabelSelector

LOOPBACK = AddressPolicy(parse_cidrs(["127.0.0.0/8"]), LB_ALLOWANCE)
KINDS = ("Pod", "Node", "Instance", "EC2")
SOURCES = tuple(SourceSpec(kind, LabelSelector.parse({"matchLabels": {"app": "web"}})) for kind in KINDS)
HEALTHS = ("", "CHECKING", "UP", "DOWN")
ADMINS = (None, Admin.MAINT, Admin.DRAIN, Admin.READY)


def instance(name: str = "a", kind: str = "Pod", phase: Phase = Phase.UP, unready: bool = False) -> InstanceState:
    return InstanceState(kind, "" if kind == "Node" else "ns", name, f"uid-{name}", "127.0.0.2", {"app": "web"},
                         phase, "r", unready=unready)


def desired_of(*instances: InstanceState, held: frozenset[str] = frozenset(),
               variant: str = "") -> dict[str, DesiredMember]:
    return desired_members(namespace="ns", pool="web", sources=SOURCES, port=80, instances=instances,
                           policy=LOOPBACK, held=held, variant=variant)[0]


def plan(desired: dict[str, DesiredMember], actual: dict[str, ActualMember], *, up: bool = True,
         unready: dict[str, DesiredMember] | None = None) -> Plan:
    """As the controller plans an HAProxy pool with health checks."""
    return plan_pool(desired=desired, actual=actual, draining_since={}, now=100.0, deregistration_delay=30.0,
                     health_checks=True, unready=unready, enter_unchecked=up)


def server(name: str, admin: Admin, health: str) -> dict[str, ActualMember]:
    return {name: ActualMember(name, "127.0.0.2", 80, admin, health, 0, 1)}


NAME = member_name("ns", "web", "uid-a")


# ----- the rule, every case: (held / draining / serving) x admin now x health now
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("admin", ADMINS)
@pytest.mark.parametrize("health", HEALTHS)
def test_up_puts_a_serving_member_in_rotation_whatever_its_checks_say(kind: str, admin: Admin | None,
                                                                      health: str) -> None:
    desired = desired_of(instance(kind=kind))
    (name,) = desired
    actual = {} if admin is None else server(name, admin, health)
    actions = plan(desired, actual).actions
    if admin is None:
        assert actions == (AddMember(name, "127.0.0.2", 80, weight=None), SetAdmin(name, Admin.READY, mark_up=True))
    elif admin is Admin.READY:
        assert actions == (), "only the entry is forced: checks that took it out keep it out"
    else:
        assert actions == (SetAdmin(name, Admin.READY, mark_up=True),)


@pytest.mark.parametrize("admin", ADMINS)
@pytest.mark.parametrize("health", HEALTHS)
def test_checking_is_unchanged_it_waits_for_a_passed_check(admin: Admin | None, health: str) -> None:
    desired = desired_of(instance())
    actual = {} if admin is None else server(NAME, admin, health)
    target = Admin.READY if health == "UP" and admin is not None else Admin.DRAIN
    expected: tuple[Any, ...] = ((AddMember(NAME, "127.0.0.2", 80),) if admin is None else ()) + (
        (SetAdmin(NAME, target),) if admin != target else ())
    assert plan(desired, actual, up=False).actions == expected
    assert not any(isinstance(a, SetAdmin) and a.mark_up for a in plan(desired, actual, up=False).actions)


@pytest.mark.parametrize("up", [True, False])
@pytest.mark.parametrize("admin", ADMINS[1:])
@pytest.mark.parametrize("health", HEALTHS)
def test_held_and_draining_members_never_enter_rotation(up: bool, admin: Admin, health: str) -> None:
    held = plan(desired_of(instance(), held=frozenset({NAME})), server(NAME, admin, health), up=up)
    assert held.actions == (() if admin is Admin.MAINT else (SetAdmin(NAME, Admin.MAINT),))
    assert held.members[0].state is MemberState.HELD
    draining = plan(desired_of(instance(phase=Phase.DRAINING)), server(NAME, admin, health), up=up)
    assert all(a == SetAdmin(NAME, Admin.DRAIN) or isinstance(a, RemoveMember) for a in draining.actions)
    assert all(r.state is MemberState.DRAINING for r in draining.members)


# ----- what kubectl shows
def test_up_reports_active_before_the_first_check_and_registering_once_checks_took_it_out() -> None:
    desired = desired_of(instance())
    first = plan(desired, {})
    after = simulate({}, first.actions)
    assert after[NAME].admin is Admin.READY and after[NAME].health == "CHECKING"
    (row,) = plan(desired, after).members
    assert row.state is MemberState.ACTIVE and row.health == "CHECKING"
    assert row.reason == "in rotation before its first health check (initialState Up)"
    (passed,) = plan(desired, server(NAME, Admin.READY, "UP")).members
    assert (passed.state, passed.reason) == (MemberState.ACTIVE, "")
    (failed,) = plan(desired, server(NAME, Admin.READY, "DOWN")).members
    assert failed.state is MemberState.REGISTERING and failed.health == "DOWN"
    assert failed.reason == "health checks failed (DOWN): out of rotation until they pass"
    (waiting,) = plan(desired, simulate({}, plan(desired, {}, up=False).actions), up=False).members
    assert waiting.state is MemberState.REGISTERING and "waiting for health checks" in waiting.reason


def test_simulate_marks_a_server_up_but_keeps_a_passed_check() -> None:
    up = SetAdmin(NAME, Admin.READY, mark_up=True)
    assert simulate(server(NAME, Admin.DRAIN, "DOWN"), [up])[NAME].health == "CHECKING"
    assert simulate(server(NAME, Admin.DRAIN, "UP"), [up])[NAME].health == "UP"
    assert simulate(server(NAME, Admin.DRAIN, "DOWN"), [SetAdmin(NAME, Admin.READY)])[NAME].health == "DOWN"


# ----- every place that adds servers or returns them to rotation
@pytest.mark.parametrize("kind", KINDS)
def test_back_from_unready_enters_at_once_even_with_failing_checks(kind: str) -> None:
    """A kept server (unready_members, in DRAIN) of an instance that is ready again: Up trusts the source."""
    unready = instance(kind=kind, phase=Phase.DOWN, unready=True)
    kept = unready_members(namespace="ns", pool="web", sources=SOURCES, port=80, instances=[unready],
                           policy=LOOPBACK)
    (name,) = kept
    for health in HEALTHS:
        drained = server(name, Admin.DRAIN, health)
        assert plan({}, drained, unready=kept).actions == (), "kept while unready"
        back = plan(desired_of(instance(kind=kind)), drained, unready=kept).actions
        assert back == (SetAdmin(name, Admin.READY, mark_up=True),)
        stays = plan(desired_of(instance(kind=kind)), drained, unready=kept, up=False).actions
        assert stays == ((SetAdmin(name, Admin.READY),) if health == "UP" else ())


def test_a_blocking_hook_that_releases_a_member_puts_it_in_rotation_marked_up() -> None:
    held = server(NAME, Admin.MAINT, "CHECKING")
    assert plan(desired_of(instance()), held).actions == (SetAdmin(NAME, Admin.READY, mark_up=True),)


def test_refill_after_an_haproxy_restart_puts_every_member_in_rotation_at_once() -> None:
    desired = desired_of(*(instance(f"i-{kind}", kind) for kind in KINDS))
    assert len(desired) == len(KINDS)
    actions = plan(desired, {}).actions
    assert [type(a) for a in actions] == [AddMember, SetAdmin] * len(KINDS)
    assert {a.name for a in actions if isinstance(a, SetAdmin) and a.admin is Admin.READY and a.mark_up} == \
        set(desired)
    after = simulate({}, actions)
    final = plan(desired, after)
    assert final.actions == () and all(r.state is MemberState.ACTIVE for r in final.members)


def test_changed_server_settings_hand_over_without_waiting_for_the_successors_first_check() -> None:
    old = desired_of(instance())
    new = desired_of(instance(), variant="check:2:2:3")
    (old_name,), (new_name,) = old, new
    serving = server(old_name, Admin.READY, "UP")
    first = plan(new, serving).actions
    assert first == (AddMember(new_name, "127.0.0.2", 80), SetAdmin(new_name, Admin.READY, mark_up=True))
    assert plan(new, simulate(serving, first)).actions == (SetAdmin(old_name, Admin.DRAIN),)


# ----- properties over any pool state
@st.composite
def pools(draw: Any) -> tuple[dict[str, DesiredMember], dict[str, ActualMember]]:
    names = [f"i{i}" for i in range(draw(st.integers(0, 5)))]
    instances = [instance(n, draw(st.sampled_from(KINDS)), draw(st.sampled_from([Phase.UP, Phase.DRAINING])))
                 for n in names]
    held = frozenset(member_name("ns", "web", f"uid-{n}") for n in names if draw(st.booleans()))
    desired = desired_of(*instances, held=held)
    actual: dict[str, ActualMember] = {}
    for name in [*desired, *(member_name("ns", "web", f"uid-gone{i}") for i in range(draw(st.integers(0, 2))))]:
        if draw(st.booleans()):
            actual.update(server(name, draw(st.sampled_from(ADMINS[1:])), draw(st.sampled_from(HEALTHS))))
    return desired, actual


@settings(max_examples=300, deadline=None)
@given(pools())
def test_up_marks_only_entries_into_rotation_and_converges(pool: tuple[dict[str, DesiredMember],
                                                                        dict[str, ActualMember]]) -> None:
    desired, actual = pool
    first = plan(desired, actual)
    assert first == plan(desired, actual)
    for action in first.actions:
        if isinstance(action, SetAdmin) and action.mark_up:
            assert action.admin is Admin.READY and desired[action.name].serving and not desired[action.name].held
            assert action.name not in actual or actual[action.name].admin is not Admin.READY
    state = simulate(actual, first.actions)
    for _ in range(3):  # sessions end; whatever checks say, nothing more is forced
        state = {n: replace(m, sessions=0) for n, m in state.items()}
        state = simulate(state, plan(desired, state).actions)
    final = plan(desired, state)
    assert not any(isinstance(a, SetAdmin | AddMember) for a in final.actions)
    assert all(isinstance(a, RemoveMember) for a in final.actions)
    serving = {n for n, m in desired.items() if m.serving and not m.held}
    assert all(state[n].admin is Admin.READY for n in serving)


# ----- the spec
def pool_obj(check: dict[str, Any] | None) -> dict[str, Any]:
    ha: dict[str, Any] = {"loadBalancerRef": {"name": "edge"}, "backend": "be"}
    if check is not None:
        ha["healthCheck"] = check
    return {"metadata": {"namespace": "ns", "name": "web"},
            "spec": {"source": {"kind": "Pod", "selector": {}}, "port": 80,
                     "backend": {"type": "HAProxy", "haproxy": ha}}}


def test_the_spec_defaults_to_up_and_a_change_replaces_no_server() -> None:
    default = parse_pool(pool_obj({"rise": 2}))  # the API server fills in the rest
    assert default.health_check is not None and default.health_check.initial_state is InitialState.UP
    assert default.enters_unchecked and default.checks_health
    checking = parse_pool(pool_obj({"rise": 2, "initialState": "Checking"}))
    assert checking.health_check is not None and checking.health_check.initial_state is InitialState.CHECKING
    assert not checking.enters_unchecked and checking.checks_health
    assert checking.variant == default.variant == "check:2:2:3"  # servers keep their names: no replacement
    unchecked = parse_pool(pool_obj(None))
    assert not unchecked.enters_unchecked and not unchecked.checks_health


def test_a_stored_value_the_schema_would_refuse_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpec, match=r"initialState 'up' is not Up or Checking"):
        parse_pool(pool_obj({"initialState": "up"}))
