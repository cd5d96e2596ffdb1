"""The pool planner: exhaustive rules and properties (determinism, idempotence, drain first)."""

from __future__ import annotations

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
    RemoveMember,
    SetAdmin,
)
from poolkeeper.core.naming import member_name, pool_prefix
from poolkeeper.core.planner import MemberMemo, desired_members, plan_pool
from poolkeeper.core.poolspec import SourceSpec
from poolkeeper.core.selectors import LabelSelector

# The instances here have loopback addresses, so the pool's LoadBalancer says it allows them.
LOOPBACK_ALLOWED = AddressPolicy(parse_cidrs(["127.0.0.0/8"]), LB_ALLOWANCE)

WEB = (SourceSpec("Pod", LabelSelector.parse({"matchLabels": {"app": "web"}})),)


def inst(name: str, phase: Phase = Phase.UP, address: str = "127.0.0.2", labels: dict[str, str] | None = None,
         kind: str = "Pod", namespace: str = "ns") -> InstanceState:
    return InstanceState(kind, namespace, name, f"uid-{name}", address, labels or {"app": "web"}, phase, "r")


def desired_of(*instances: InstanceState, held: frozenset[str] = frozenset()) -> dict[str, DesiredMember]:
    desired, _ = desired_members(namespace="ns", pool="web", sources=WEB, port=80, instances=instances, held=held,
                                 policy=LOOPBACK_ALLOWED)
    return desired


def plan(desired, actual, since=None, now=100.0, delay=30.0, checks=False):  # type: ignore[no-untyped-def]
    return plan_pool(desired=desired, actual=actual, draining_since=since or {}, now=now,
                     deregistration_delay=delay, health_checks=checks)


def apply(actual: dict[str, ActualMember], actions) -> dict[str, ActualMember]:  # type: ignore[no-untyped-def]
    """A faithful little load balancer: what HAProxy would hold after the actions."""
    out = dict(actual)
    for action in actions:
        if isinstance(action, AddMember):
            out[action.name] = ActualMember(action.name, action.address, action.port, Admin.MAINT, "", 0)
        elif isinstance(action, SetAdmin):
            old = out[action.name]
            out[action.name] = ActualMember(old.name, old.address, old.port, action.admin, old.health, old.sessions)
        elif isinstance(action, RemoveMember):
            out.pop(action.name, None)
    return out


def test_names_are_deterministic_prefixed_and_short() -> None:
    name = member_name("ns", "web", "uid-1")
    assert name == member_name("ns", "web", "uid-1")
    assert name.startswith(pool_prefix("ns", "web")) and name.startswith("pk-")
    assert len(name) <= 41  # 80-bit pool prefix (core.naming): HAProxy 2.6 takes it, see test_haproxy_backend
    assert member_name("ns", "web", "uid-2") != name
    assert not member_name("ns", "api", "uid-1").startswith(pool_prefix("ns", "web"))


def test_new_up_instance_is_added_then_enabled() -> None:
    d = desired_of(inst("a"))
    p = plan(d, {})
    name = next(iter(d))
    assert p.actions == (AddMember(name, "127.0.0.2", 80), SetAdmin(name, Admin.READY))
    assert p.members[0].state is MemberState.REGISTERING


def test_with_health_checks_member_waits_in_drain_until_up() -> None:
    d = desired_of(inst("a"))
    name = next(iter(d))
    p = plan(d, {}, checks=True)
    assert p.actions[-1] == SetAdmin(name, Admin.DRAIN)
    checking = {name: ActualMember(name, "127.0.0.2", 80, Admin.DRAIN, "CHECKING", 0)}
    p2 = plan(d, checking, checks=True)
    assert p2.actions == () and p2.members[0].state is MemberState.REGISTERING
    healthy = {name: ActualMember(name, "127.0.0.2", 80, Admin.DRAIN, "UP", 0)}
    assert plan(d, healthy, checks=True).actions == (SetAdmin(name, Admin.READY),)
    active = {name: ActualMember(name, "127.0.0.2", 80, Admin.READY, "UP", 0)}
    p4 = plan(d, active, checks=True)
    assert p4.actions == () and p4.members[0].state is MemberState.ACTIVE


def test_member_that_fails_checks_leaves_rotation() -> None:
    d = desired_of(inst("a"))
    name = next(iter(d))
    down = {name: ActualMember(name, "127.0.0.2", 80, Admin.READY, "DOWN", 0)}
    assert plan(d, down, checks=True).actions == (SetAdmin(name, Admin.DRAIN),)


def test_leaving_member_drains_before_removal() -> None:
    name = member_name("ns", "web", "uid-a")
    busy = {name: ActualMember(name, "127.0.0.2", 80, Admin.READY, "", 3)}
    p = plan({}, busy)
    assert p.actions == (SetAdmin(name, Admin.DRAIN),)
    assert p.members[0].state is MemberState.DRAINING and p.draining_since[name] == 100.0
    draining = {name: ActualMember(name, "127.0.0.2", 80, Admin.DRAIN, "", 3)}
    assert plan({}, draining, since=p.draining_since, now=110).actions == ()
    idle = {name: ActualMember(name, "127.0.0.2", 80, Admin.DRAIN, "", 0)}
    assert plan({}, idle, since=p.draining_since, now=111).actions == (RemoveMember(name, "no longer desired"),)


def test_drain_delay_forces_removal() -> None:
    name = member_name("ns", "web", "uid-a")
    busy = {name: ActualMember(name, "127.0.0.2", 80, Admin.DRAIN, "", 5)}
    p = plan({}, busy, since={name: 50.0}, now=80.0, delay=30)
    assert p.actions == (RemoveMember(name, "no longer desired", force=True),)


def test_ready_member_with_no_sessions_is_drained_not_removed_in_one_step() -> None:
    name = member_name("ns", "web", "uid-a")
    idle = {name: ActualMember(name, "127.0.0.2", 80, Admin.READY, "", 0)}
    assert plan({}, idle).actions == (SetAdmin(name, Admin.DRAIN),)


def test_draining_instance_stays_until_sessions_end() -> None:
    d = desired_of(inst("a", Phase.DRAINING))
    name = next(iter(d))
    live = {name: ActualMember(name, "127.0.0.2", 80, Admin.READY, "", 2)}
    p = plan(d, live)
    assert p.actions == (SetAdmin(name, Admin.DRAIN),)
    assert p.members[0].state is MemberState.DRAINING
    drained = {name: ActualMember(name, "127.0.0.2", 80, Admin.DRAIN, "", 0)}
    assert plan(d, drained, since=p.draining_since).actions == (RemoveMember(name, "drained"),)


def test_draining_instance_never_registered_is_not_added() -> None:
    assert plan(desired_of(inst("a", Phase.DRAINING)), {}).actions == ()


def test_endpointslice_members_without_session_counts() -> None:
    d = desired_of(inst("a", Phase.DRAINING))
    name = next(iter(d))
    unknown = {name: ActualMember(name, "127.0.0.2", 80, Admin.DRAIN, "", None)}
    assert plan(d, unknown, since={name: 90.0}, now=100).actions == ()  # still serving: wait out the delay
    assert plan(d, unknown, since={name: 60.0}, now=100).actions[0] == RemoveMember(name, "drained", force=True)
    gone = {name: ActualMember(name, "127.0.0.2", 80, Admin.DRAIN, "", None)}
    assert plan({}, gone).actions == (RemoveMember(name, "no longer desired"),)


def test_address_change_replaces_the_server() -> None:
    d = desired_of(inst("a", address="127.0.0.3"))
    name = next(iter(d))
    old = {name: ActualMember(name, "127.0.0.2", 80, Admin.READY, "", 0)}
    p = plan(d, old)
    assert p.actions[0] == RemoveMember(name, "address changed", force=True)
    assert AddMember(name, "127.0.0.3", 80) in p.actions


def test_held_member_stays_in_maintenance() -> None:
    first = desired_of(inst("a"))
    name = next(iter(first))
    d = desired_of(inst("a"), held=frozenset([name]))
    p = plan(d, {})
    assert p.actions == (AddMember(name, "127.0.0.2", 80), SetAdmin(name, Admin.MAINT))
    assert p.members[0].state is MemberState.HELD


def test_selector_kind_namespace_and_addresses_filter_desired() -> None:
    desired, refused = desired_members(
        namespace="ns", pool="web", sources=WEB,
        port=80, policy=LOOPBACK_ALLOWED, instances=[
            inst("ok"), inst("other-app", labels={"app": "api"}), inst("down", Phase.DOWN),
            inst("other-ns", namespace="x"), inst("node", kind="Node", namespace=""),
            inst("linklocal", address="169.254.169.254"), inst("noip", address=""),
        ])
    assert [m.instance.name for m in desired.values()] == ["ok"]
    assert sorted(r.instance.name for r in refused) == ["linklocal", "noip"]


PHASES = st.sampled_from(list(Phase))
ADMINS = st.sampled_from(list(Admin))


@st.composite
def scenarios(draw):  # type: ignore[no-untyped-def]
    names = draw(st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=8))
    instances = [inst(n, draw(PHASES), f"127.0.0.{2 + i}") for i, n in enumerate(names)]
    desired = desired_of(*instances)
    pool_names = [member_name("ns", "web", f"uid-{n}") for n in "abcdefgh"]
    actual = {}
    for name in draw(st.lists(st.sampled_from(pool_names), unique=True, max_size=8)):
        actual[name] = ActualMember(name, "127.0.0.2", 80, draw(ADMINS),
                                    draw(st.sampled_from(["", "UP", "DOWN", "CHECKING"])),
                                    draw(st.integers(0, 3)))
    return desired, actual, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_properties(scenario) -> None:  # type: ignore[no-untyped-def]
    desired, actual, checks = scenario
    first = plan(desired, actual, checks=checks)
    # determinism
    assert first == plan(desired, actual, checks=checks)
    # never removes a member that is in rotation without draining first (unless it is being replaced)
    for action in first.actions:
        if isinstance(action, RemoveMember) and not action.force:
            assert actual[action.name].admin is not Admin.READY
    # only touches its own pool's servers
    for action in first.actions:
        assert action.name.startswith(pool_prefix("ns", "web"))
    # converges, and then applying again changes nothing (idempotence), with sessions gone
    state = apply(actual, first.actions)
    for _ in range(4):
        state = {n: ActualMember(m.name, m.address, m.port, m.admin, "UP" if checks else "", 0)
                 for n, m in state.items()}
        step = plan(desired, state, checks=checks)
        state = apply(state, step.actions)
    final = plan(desired, state, checks=checks)
    assert final.actions == ()
    serving = {n for n, m in desired.items() if m.serving}
    assert serving <= set(state) and all(state[n].admin is Admin.READY for n in serving)
    assert set(state) <= set(desired)


def test_changed_server_settings_replace_members_without_a_gap() -> None:
    """A new health check means new servers; each old one serves until its successor is in rotation."""
    inst_a = inst("a")
    old = desired_of(inst_a)
    old_name = next(iter(old))
    new, _ = desired_members(namespace="ns", pool="web", sources=WEB, port=80, instances=[inst_a],
                             variant="check:1:2:3", policy=LOOPBACK_ALLOWED)
    new_name = next(iter(new))
    assert new_name != old_name and new_name.startswith(old_name)
    serving = {old_name: ActualMember(old_name, "127.0.0.2", 80, Admin.READY, "UP", 2)}
    first = plan(new, serving, checks=True)
    assert first.actions == (AddMember(new_name, "127.0.0.2", 80), SetAdmin(new_name, Admin.DRAIN))
    checking = apply(serving, first.actions)
    assert plan(new, checking, checks=True).actions == ()  # the old one keeps serving meanwhile
    healthy = {**checking, new_name: ActualMember(new_name, "127.0.0.2", 80, Admin.DRAIN, "UP", 0)}
    assert plan(new, healthy, checks=True).actions == (SetAdmin(new_name, Admin.READY),)
    both = {**healthy, new_name: ActualMember(new_name, "127.0.0.2", 80, Admin.READY, "UP", 0)}
    assert plan(new, both, checks=True).actions == (SetAdmin(old_name, Admin.DRAIN),)


def test_default_policy_refuses_what_a_tenant_could_point_at_the_load_balancer() -> None:
    hostile = {"lo": "127.0.0.1", "any": "0.0.0.0", "lo6": "::1", "meta": "169.254.169.254",
               "mapped": "::ffff:10.0.0.1", "ali": "100.100.100.200", "aws6": "fd00:ec2::254", "mc": "224.0.0.1",
               "bc": "255.255.255.255"}
    desired, refused = desired_members(
        namespace="ns", pool="web", sources=WEB,
        port=80, instances=[inst("ok", address="192.0.2.9"), *(inst(n, address=a) for n, a in hostile.items())])
    assert [m.address for m in desired.values()] == ["192.0.2.9"]
    assert {r.instance.name for r in refused} == set(hostile)
    assert all(r.reason.startswith(f"address {hostile[r.instance.name]} is ") for r in refused)


OTHER_SOURCES = (SourceSpec("Pod", LabelSelector.parse({"matchLabels": {"app": "web"}}), weight=7),)
STRICT = AddressPolicy(parse_cidrs(["127.0.0.0/30"]), LB_ALLOWANCE)


@st.composite
def memo_steps(draw):  # type: ignore[no-untyped-def]
    """A pool's reconciles: each replaces some instances (new objects), drops or adds some, and may
    change the holds, the sources, the address policy or the port."""
    steps = []
    current = {n: inst(n) for n in draw(st.lists(st.sampled_from("abcdef"), unique=True, max_size=6))}
    for _ in range(draw(st.integers(1, 6))):
        for name in draw(st.lists(st.sampled_from("abcdefg"), unique=True, max_size=4)):
            if draw(st.booleans()) and name in current:
                del current[name]
            else:
                current[name] = inst(name, draw(PHASES), f"127.0.0.{draw(st.integers(1, 6))}",
                                     labels={"app": draw(st.sampled_from(["web", "api"]))})
        held = frozenset(draw(st.lists(st.sampled_from([member_name("ns", "web", f"uid-{n}") for n in "abcdefg"]),
                                       max_size=3)))
        steps.append((list(current.values()), held, draw(st.sampled_from([WEB, OTHER_SOURCES])),
                      draw(st.sampled_from([LOOPBACK_ALLOWED, STRICT])), draw(st.sampled_from([80, 81]))))
    return steps


@settings(max_examples=300, deadline=None)
@given(memo_steps())
def test_a_memo_changes_no_answer(steps) -> None:  # type: ignore[no-untyped-def]
    """Kept answers are only an optimisation: every call gives what a call without the memo gives."""
    memo = MemberMemo()
    for instances, held, sources, policy, port in steps:
        args = {"namespace": "ns", "pool": "web", "sources": sources, "port": port, "instances": instances,
                "policy": policy, "held": held}
        assert desired_members(**args, memo=memo) == desired_members(**args)


def test_a_memo_answers_an_unchanged_instance_without_asking_again() -> None:
    memo = MemberMemo()
    same, changed = inst("a"), inst("b")
    first, _ = desired_members(namespace="ns", pool="web", sources=WEB, port=80, instances=[same, changed],
                               policy=LOOPBACK_ALLOWED, memo=memo)
    replaced = inst("b", Phase.DRAINING)
    second, _ = desired_members(namespace="ns", pool="web", sources=WEB, port=80, instances=[same, replaced],
                                policy=LOOPBACK_ALLOWED, memo=memo)
    name_a, name_b = (member_name("ns", "web", f"uid-{n}") for n in "ab")
    assert second[name_a] is first[name_a], "the same instance object: the same answer"
    assert second[name_b] is not first[name_b] and not second[name_b].serving
    assert set(memo.answers) == {"uid-a", "uid-b"} and memo.answers["uid-b"][0] is replaced
    third, _ = desired_members(namespace="ns", pool="web", sources=WEB, port=81, instances=[same],
                               policy=LOOPBACK_ALLOWED, memo=memo)
    assert third[name_a].port == 81 and set(memo.answers) == {"uid-a"}, "another port: answered afresh"
