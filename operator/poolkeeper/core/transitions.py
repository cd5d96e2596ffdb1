"""Per-pool instance transitions for handlers (pure).

A handler is told about an instance's state changes in order, each numbered by a
per-instance sequence that is persisted with the outbox, so ids survive restarts. After a
restart the diff between what the handler was last told and what is true now is coalesced
into one transition per instance.

The same holds while events wait (a slow or dead receiver): `supersede` says how a new event
replaces an earlier one for the same instance that nobody has tried to deliver yet. The rule,
for at-least-once delivery in order per instance:
- instance states (up, draining, down): the newer event is delivered instead, its `from` being
  the older one's `from` (what the handler was last told); when that makes from == to (up ->
  down -> up), or none -> down (came and went unheard), both go: as far as the handler knows,
  nothing changed;
- members (registered, deregistered): a registered and a deregistered cancel out; a repeat of
  the same type replaces the older one;
- an event already attempted (or loaded from the outbox at a start: the operator before may
  have sent it), a blocking one, or one about a different instance record (the address or
  labels changed) is never superseded.
Each event keeps the id it was made with (ids are never reused: sequence numbers only grow), so
an instance that keeps flapping behind a stuck delivery holds at most one event of each kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from poolkeeper.core.model import DesiredMember, InstanceState

NONE = "none"
UP, DRAINING, DOWN = "up", "draining", "down"
REGISTERED, DEREGISTERED = "registered", "deregistered"
STATE_EVENTS = frozenset({UP, DRAINING, DOWN})
MEMBER_EVENTS = frozenset({REGISTERED, DEREGISTERED})


@dataclass(frozen=True, slots=True)
class Announced:
    """The last state a handler was told about for one instance, and its sequence number."""

    state: str
    seq: int


@dataclass(frozen=True, slots=True)
class Transition:
    instance: InstanceState
    member: str  # backend server name
    event_type: str  # up | draining | down | registered | deregistered
    from_state: str
    to_state: str
    seq: int
    reason: str


def member_states(desired: Mapping[str, DesiredMember]) -> dict[str, tuple[str, DesiredMember]]:
    """instance uid -> (up | draining, member) for every member the pool wants."""
    return {m.instance.uid: (UP if m.serving else DRAINING, m) for m in desired.values()}


def instance_transitions(
    announced: Mapping[str, Announced],
    current: Mapping[str, tuple[str, DesiredMember]],
    known: Mapping[str, tuple[InstanceState, str]],
) -> list[Transition]:
    """One transition per instance whose state differs from what was announced.

    `known` maps instance uid -> (last instance record, member name) for instances that may
    have left the pool, so their `down` event can still say who they were.
    """
    out: list[Transition] = []
    for uid in sorted(current):
        state, member = current[uid]
        before = announced.get(uid)
        if before is None or before.state != state:
            out.append(Transition(member.instance, member.name, state, before.state if before else NONE, state,
                                  (before.seq if before else 0) + 1, member.instance.reason))
    for uid in sorted(set(announced) - set(current)):
        before = announced[uid]
        if before.state in (DOWN, NONE) or uid not in known:
            continue
        inst, name = known[uid]
        reason = inst.reason if inst.phase.value == DOWN else "instance no longer matches the pool"
        out.append(Transition(inst, name, DOWN, before.state, DOWN, before.seq + 1, reason))
    return out


def member_transition(announced: Announced | None, inst: InstanceState, name: str, event_type: str,
                      reason: str) -> Transition:
    """registered / deregistered: the load balancer acted; the instance state is unchanged."""
    state = announced.state if announced else NONE
    return Transition(inst, name, event_type, state, state, (announced.seq if announced else 0) + 1, reason)


def advance(announced: dict[str, Announced], transitions: Iterable[Transition]) -> None:
    """Record transitions as announced (before delivery: the outbox holds them until delivered)."""
    for t in transitions:
        announced[t.instance.uid] = Announced(t.to_state, t.seq)


def supersede(older_type: str, older_from: str, t: Transition) -> tuple[bool, Transition | None]:
    """How `t` replaces an undelivered older event of the same instance (see the module docstring).

    Returns (the older event goes, what to deliver instead of `t`: None when the two cancel out).
    The caller checks that the older event was never attempted, is not blocking and describes the
    same instance record.
    """
    if older_type in STATE_EVENTS and t.event_type in STATE_EVENTS:
        if older_from == t.to_state or (older_from == NONE and t.to_state == DOWN):
            return True, None
        return True, replace(t, from_state=older_from)
    if older_type in MEMBER_EVENTS and t.event_type in MEMBER_EVENTS:
        return True, (t if older_type == t.event_type else None)
    return False, t
