"""The pool planner: desired members vs what the load balancer reports -> a plan.

A pure function of its inputs, so the same inputs give the same plan and applying a plan
twice changes nothing: the second reconcile sees the load balancer already as desired.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from poolkeeper.core.addresses import DEFAULT_POLICY, AddressPolicy
from poolkeeper.core.model import (
    Action,
    ActualMember,
    AddMember,
    Admin,
    DesiredMember,
    InstanceState,
    MemberReport,
    MemberState,
    Phase,
    Plan,
    RemoveMember,
    SetAdmin,
    SetWeight,
)
from poolkeeper.core.naming import alternate_name, instance_part, member_name
from poolkeeper.core.poolspec import SourceSpec

HEALTHY = "UP"
DOWN = "DOWN"  # checks took the server out (backends.haproxy.normalise_health)
ADDRESS_CHANGED = "address changed"  # a removal that is no deregistration: the instance has another server
UNREADY_TOO_LONG = "not ready for longer than the deregistration delay"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An instance that matched the pool but may not be registered, and why."""

    instance: InstanceState
    reason: str


class MemberMemo:
    """desired_members' answer per instance, kept between one pool's reconciles.

    InstanceState is immutable and the store replaces it on every change, so an instance object
    answered before gets the same answer (its source, the address check, its member name) while the
    pool's inputs stay the same; other inputs forget every answer. At 100 members that is about a
    third of a reconcile's own CPU, spent before the backend is touched.
    """

    __slots__ = ("answers", "inputs")

    def __init__(self) -> None:
        self.inputs: tuple[object, ...] | None = None
        self.answers: dict[str, tuple[InstanceState, DesiredMember | Refusal | None]] = {}


def desired_members(
    *,
    namespace: str,
    pool: str,
    sources: Sequence[SourceSpec],
    port: int,
    instances: Iterable[InstanceState],
    policy: AddressPolicy = DEFAULT_POLICY,
    held: frozenset[str] = frozenset(),
    variant: str = "",
    cluster_id: str = "",
    memo: MemberMemo | None = None,
) -> tuple[dict[str, DesiredMember], list[Refusal]]:
    """Instances that are up or draining and match a source: up ones serve, draining ones drain.

    A member takes the weight of the first source that selects it. An instance whose address
    `policy` refuses is no member (and no handler hears of it): it is returned among the
    refusals, with the reason. `memo`: answers kept from the last call for the same pool.
    """
    inputs = (namespace, pool, tuple(sources), port, policy, variant, cluster_id)
    before = memo.answers if memo is not None and memo.inputs == inputs else {}
    answers: dict[str, tuple[InstanceState, DesiredMember | Refusal | None]] = {}
    desired: dict[str, DesiredMember] = {}
    refused: list[Refusal] = []
    for inst in instances:
        kept = before.get(inst.uid)
        answer = kept[1] if kept is not None and kept[0] is inst else _answer(
            inst, namespace, pool, sources, port, policy, variant, cluster_id)
        answers[inst.uid] = (inst, answer)
        if isinstance(answer, Refusal):
            refused.append(answer)
        elif answer is not None:
            if (answer.name in held) != answer.held:
                answer = replace(answer, held=not answer.held)
            desired[answer.name] = answer
    if memo is not None:
        memo.inputs, memo.answers = inputs, answers
    return desired, refused


def _answer(inst: InstanceState, namespace: str, pool: str, sources: Sequence[SourceSpec], port: int,
            policy: AddressPolicy, variant: str, cluster_id: str) -> DesiredMember | Refusal | None:
    """One instance's place in the pool, held or not aside: a member, a refusal, or nothing."""
    source = _source(inst, sources, namespace)
    if source is None or inst.phase is Phase.DOWN:
        return None
    why = policy.refusal(inst.address)
    if why is not None:
        return Refusal(inst, why)
    name = member_name(namespace, pool, inst.uid, variant, cluster_id)
    return DesiredMember(name=name, instance=inst, address=str(inst.address), port=port,
                         serving=inst.phase is Phase.UP, weight=source.weight)


def unready_members(
    *,
    namespace: str,
    pool: str,
    sources: Sequence[SourceSpec],
    port: int,
    instances: Iterable[InstanceState],
    policy: AddressPolicy = DEFAULT_POLICY,
    variant: str = "",
    cluster_id: str = "",
) -> dict[str, DesiredMember]:
    """Instances of the pool that are down only for want of readiness (InstanceState.unready), by name.

    They are no members (handlers hear `down`, the pool does not count them): plan_pool keeps their
    servers out of rotation for the deregistration delay, health checks running, so one that turns
    Ready again is back in rotation at once instead of waiting for a first check as a new server.
    An address the policy refuses is never kept.
    """
    out: dict[str, DesiredMember] = {}
    for inst in instances:
        if inst.unready and _source(inst, sources, namespace) is not None and policy.refusal(inst.address) is None:
            name = member_name(namespace, pool, inst.uid, variant, cluster_id)
            out[name] = DesiredMember(name=name, instance=inst, address=str(inst.address), port=port, serving=False)
    return out


def _source(inst: InstanceState, sources: Sequence[SourceSpec], namespace: str) -> SourceSpec | None:
    """The first source selecting the instance, if the pool may have it at all."""
    if inst.kind != "Node" and inst.namespace != namespace:  # Pods and Instances: the pool's namespace only
        return None
    return next((s for s in sources if s.kind == inst.kind and s.selector.matches(inst.labels)), None)


def settle_names(desired: Mapping[str, DesiredMember],
                 actual: Mapping[str, ActualMember]) -> dict[str, DesiredMember]:
    """Give a member whose address or port changed its other name (naming.alternate_name).

    A load balancer fixes a server's address when it is added, so the new address needs a new
    server; under the other name it joins beside the old one, which plan_pool keeps serving
    until its successor is in rotation. A port change thus replaces members one by one, never
    the whole pool at once. Only for backends that report members under the names they were
    given (HAProxy); when both names hold stale addresses the plain name is replaced in place.
    """
    out: dict[str, DesiredMember] = {}
    for name, want in desired.items():
        other = alternate_name(name)
        have, have_other = actual.get(name), actual.get(other)
        stale_here = _moved(have, want) and not _moved(have_other, want)  # the new address goes to the other
        there = have is None and have_other is not None and not _moved(have_other, want)  # ... and is there
        if stale_here or there:
            name = other
        out[name] = want if name == want.name else replace(want, name=name)
    return out


def _moved(have: ActualMember | None, want: DesiredMember) -> bool:
    """The server exists but at another address or port."""
    return have is not None and (have.address, have.port) != (want.address, want.port)


def _target_admin(member: DesiredMember, health: str, waits_for_checks: bool) -> Admin:
    if member.held:
        return Admin.MAINT
    if not member.serving:
        return Admin.DRAIN
    if waits_for_checks and health != HEALTHY:
        return Admin.DRAIN  # checks run, traffic waits for the first pass
    return Admin.READY


def plan_pool(
    *,
    desired: Mapping[str, DesiredMember],
    actual: Mapping[str, ActualMember],
    draining_since: Mapping[str, float],
    now: float,
    deregistration_delay: float,
    health_checks: bool,
    keep: frozenset[str] = frozenset(),
    unready: Mapping[str, DesiredMember] | None = None,
    enter_unchecked: bool = False,
) -> Plan:
    """Decide the actions that bring `actual` to `desired`, draining before every removal.

    Members in `keep` (a blocking draining hook still runs) drain but are not removed yet.
    With health checks, the servers of `unready` instances (unready_members) drain but stay,
    checks running, until they have been unready for the deregistration delay: readiness that
    flaps comes back, and a server added afresh would wait for its first check while an empty
    backend answers 503. Without health checks a server is back in one step: nothing to keep.

    `enter_unchecked` (health checks with initialState Up): a serving member's server enters
    rotation at once, whatever its checks say, and is marked healthy as it does (SetAdmin.mark_up;
    from a new server, MAINT or DRAIN alike), so its first `fall` failed checks take it out. Only
    the entry is forced: a server in rotation that checks took out stays out until they pass.
    """
    actions: list[Action] = []
    reports: list[MemberReport] = []
    since: dict[str, float] = {}

    for name in sorted(desired):
        want = desired[name]
        have = actual.get(name)
        if have is not None and (have.address, have.port) != (want.address, want.port):
            actions.append(RemoveMember(name, ADDRESS_CHANGED, force=True))
            have = None
        if have is None and not want.serving:
            continue  # a draining instance that was never registered stays out
        health = have.health if have else ""
        target = _target_admin(want, health, health_checks and not enter_unchecked)
        mark_up = enter_unchecked and target is Admin.READY
        if have is None:
            actions.append(AddMember(name, want.address, want.port, want.instance, want.weight))
            actions.append(SetAdmin(name, target, mark_up))
        else:
            if want.weight is not None and have.weight != want.weight:
                actions.append(SetWeight(name, want.weight))  # in place: the server and its sessions stay
            if have.admin != target:
                actions.append(SetAdmin(name, target, mark_up))
        if not want.serving:
            started = draining_since.get(name, now)
            since[name] = started
            if name not in keep and _drained(have, started, now, deregistration_delay, instance_serving=True):
                actions.append(RemoveMember(name, "drained", force=now - started >= deregistration_delay))
                continue
        reports.append(_report(want, have, target, health_checks, enter_unchecked))

    successors = {instance_part(name): name for name in desired}
    for name in sorted(set(actual) - set(desired)):
        have = actual[name]
        successor = successors.get(instance_part(name))
        if successor is not None and have.admin is Admin.READY and not _in_rotation(actual.get(successor)):
            # Same instance, new server settings: keep serving until the new server takes traffic.
            reports.append(MemberReport(name, "", have.address, have.port, MemberState.DRAINING, have.health,
                                        "replaced by a server with new settings; serving until it is in rotation",
                                        have.weight))
            continue
        started = draining_since.get(name, now)
        if have.admin is Admin.READY:
            actions.append(SetAdmin(name, Admin.DRAIN))
        kept = _kept(name, have, unready) if health_checks and unready else None
        if kept is not None:
            if name not in keep and now - started >= deregistration_delay:
                actions.append(RemoveMember(name, UNREADY_TOO_LONG, force=True))
                continue
            since[name] = started
            reports.append(MemberReport(
                name, kept.instance.ref, have.address, have.port, MemberState.DRAINING, have.health,
                f"{kept.instance.reason or 'not ready'}: out of rotation, its server and health checks kept for "
                f"up to {deregistration_delay:g} s in case it turns Ready again", have.weight))
            continue
        if name not in keep and _drained(have, started, now, deregistration_delay, instance_serving=False):
            # a server replaced by one at the instance's new address: the instance stays registered
            moved = successor is not None and (have.address, have.port) != (desired[successor].address,
                                                                              desired[successor].port)
            actions.append(RemoveMember(name, ADDRESS_CHANGED if moved else "no longer desired",
                                        force=now - started >= deregistration_delay))
            continue
        since[name] = started
        reports.append(MemberReport(name, "", have.address, have.port, MemberState.DRAINING,
                                    have.health, "instance left the pool; draining", have.weight))
    return Plan(tuple(actions), tuple(reports), since)


def _kept(name: str, have: ActualMember, unready: Mapping[str, DesiredMember]) -> DesiredMember | None:
    """The unready instance a server stands for (under either of its names), if still at its address."""
    want = unready.get(name) or unready.get(alternate_name(name))
    return want if want is not None and not _moved(have, want) else None


def _in_rotation(member: ActualMember | None) -> bool:
    return member is not None and member.admin is Admin.READY


def _drained(have: ActualMember | None, started: float, now: float, delay: float, *, instance_serving: bool) -> bool:
    """A draining member may go once it has no sessions, or when the delay is over.

    When the load balancer cannot count sessions (EndpointSlices), a member whose instance
    still serves waits out the delay; one whose instance stopped serving goes at once.
    """
    if have is None:
        return True
    if now - started >= delay:
        return True
    if have.sessions is None:
        return not instance_serving
    return have.sessions == 0 and have.admin is not Admin.READY


def _report(want: DesiredMember, have: ActualMember | None, target: Admin, health_checks: bool,
            enter_unchecked: bool) -> MemberReport:
    inst = want.instance
    health = have.health if have else ""
    if want.held:
        state, reason = MemberState.HELD, "kept out of rotation by a blocking hook"
    elif not want.serving:
        state, reason = MemberState.DRAINING, inst.reason or "instance is draining"
    elif enter_unchecked and have is not None and have.admin is Admin.READY and health == DOWN:
        state, reason = MemberState.REGISTERING, "health checks failed (DOWN): out of rotation until they pass"
    elif enter_unchecked and have is not None and have.admin is Admin.READY and health != HEALTHY:
        state, reason = MemberState.ACTIVE, "in rotation before its first health check (initialState Up)"
    elif have is not None and have.admin is Admin.READY and target is Admin.READY:
        state, reason = MemberState.ACTIVE, ""
    elif have is None:
        state, reason = MemberState.REGISTERING, "being added to the load balancer"
    elif health_checks and health != HEALTHY:
        state, reason = MemberState.REGISTERING, f"waiting for health checks to pass ({health or 'no result yet'})"
    else:
        state, reason = MemberState.REGISTERING, "entering rotation"
    weight = have.weight if have is not None else want.weight
    return MemberReport(want.name, inst.ref, want.address, want.port, state, health, reason, weight)


def simulate(actual: Mapping[str, ActualMember], actions: Iterable[Action]) -> dict[str, ActualMember]:
    """What the backend holds after `actions` succeeded: reports need no read-back round trip."""
    out = dict(actual)
    for action in actions:
        if isinstance(action, AddMember):
            out[action.name] = ActualMember(action.name, action.address, action.port, Admin.MAINT, "", 0,
                                            action.weight)
        elif isinstance(action, SetAdmin) and action.name in out:
            have = out[action.name]
            health = "CHECKING" if action.mark_up and have.health != HEALTHY else have.health  # up, unchecked
            out[action.name] = replace(have, admin=action.admin, health=health)
        elif isinstance(action, SetWeight) and action.name in out:
            out[action.name] = replace(out[action.name], weight=action.weight)
        elif isinstance(action, RemoveMember):
            out.pop(action.name, None)
    return out
