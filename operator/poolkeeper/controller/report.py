"""What a reconcile tells people: the pool's status, its Events and metrics.

The reconciler decides; this module holds the wording, so a reader of controller/pools.py
sees the steps and a reader of a pool's status finds its sentences in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from poolkeeper import API_VERSION
from poolkeeper.backends import ActionResult
from poolkeeper.core.conditions import Condition, merge_conditions
from poolkeeper.core.model import AddMember, MemberReport, MemberState, Placement, Plan, RemoveMember, SetWeight
from poolkeeper.core.planner import ADDRESS_CHANGED, Refusal
from poolkeeper.core.poolspec import PoolSpec
from poolkeeper.kube.api import resource_path
from poolkeeper.kube.events import now_rfc3339
from poolkeeper.kube.status import StatusBody

EVENT_LIST_LIMIT = 10  # instances named in one Event before "and N more"


class StatusSink(Protocol):
    def submit(self, path: str, status: StatusBody, observed: Mapping[str, Any] | None = None) -> None: ...


class EventSink(Protocol):
    def post(self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None: ...


def waiting_for_connections(result: ActionResult) -> bool:
    """A `del server` HAProxy refused while sessions finish: retried by the next reconcile, not an error."""
    return isinstance(result.action, RemoveMember) and "connections" in result.message


@dataclass(frozen=True, slots=True)
class PoolReport:
    """Everything one reconcile says about a pool in its status."""

    members: Sequence[MemberReport]
    synced: Condition
    desired: int | None = None  # serving members wanted; None: counted from the members
    placements: Sequence[Placement] = ()


def ready_condition(report: PoolReport) -> tuple[Condition, int, int, int]:
    """(Ready, desired, active, draining) from the members and Synced."""
    active, draining = members_in(report, MemberState.ACTIVE), members_in(report, MemberState.DRAINING)
    desired = report.desired
    if desired is None:
        desired = sum(1 for r in report.members if r.state is not MemberState.DRAINING)
    synced = report.synced
    if not synced.status:
        ready = Condition("Ready", False, synced.reason, synced.message)
    elif desired == 0:
        ready = Condition("Ready", False, "NoMembers", "no instance matches the selector and is up")
    elif active == desired:
        ready = Condition("Ready", True, "AllMembersActive", f"{active} of {desired} members active")
    else:
        ready = Condition("Ready", False, "MembersNotActive", f"{active} of {desired} members active")
    return ready, desired, active, draining


def members_in(report: PoolReport, state: MemberState) -> int:
    return sum(1 for r in report.members if r.state is state)


def pool_status(body: Mapping[str, Any], spec: PoolSpec | None, report: PoolReport, now: str) -> dict[str, Any]:
    """The status subresource body (pure): rows keep `since` while their state holds."""
    meta = body["metadata"]
    ready, desired, active, draining = ready_condition(report)
    old = body.get("status") or {}
    previous = {m.get("instance"): m for m in old.get("members") or []}
    return {
        "members": [member_row(r, now, previous) for r in report.members],
        "desired": desired, "active": active, "draining": draining,
        "conditions": merge_conditions(old.get("conditions"), [ready, report.synced], meta.get("generation"), now),
        "observedGeneration": meta.get("generation"),
        "source": ",".join(spec.kinds) if spec else "",
        "backend": spec.backend_text if spec else "",
        "placements": [p.to_status() for p in report.placements],
        **({"clusterID": spec.cluster_id} if spec else {}),  # whose servers these are in a shared backend
    }


def member_row(report: MemberReport, now: str, previous: Mapping[str, Any]) -> dict[str, Any]:
    prior = previous.get(report.instance)
    since = prior.get("since") if prior and prior.get("state") == report.state.value else now
    row = {"instance": report.instance or report.name, "address": report.address, "port": report.port,
           "state": report.state.value, "health": report.health, "reason": report.reason, "since": since}
    return row if report.weight is None else {**row, "weight": report.weight}


def member_reports(plan: Plan, pending: frozenset[str], instance_of: Mapping[str, str],
                   refused: Iterable[Refusal] = (), port: int = 0) -> list[MemberReport]:
    """Members waiting on a blocking `up` hook show Registering; refused instances show Held.

    A member whose instance left the pool still shows which instance it was, while it drains.
    """
    out = []
    for report in plan.members:
        if not report.instance and report.name in instance_of:
            report = replace(report, instance=instance_of[report.name])
        if report.name in pending and report.state is MemberState.HELD:
            report = replace(report, state=MemberState.REGISTERING, reason="waiting for a blocking up hook")
        out.append(report)
    out += [MemberReport("", r.instance.ref, r.instance.address or "", port, MemberState.HELD, "",
                         f"refused: {r.reason}") for r in refused]
    return out


class Reporter:
    """Writes a pool's status, posts its Events and counts its metrics."""

    def __init__(self, status: StatusSink, events: EventSink, metrics: Any = None) -> None:
        self.status, self.events, self.metrics = status, events, metrics

    def publish(self, body: dict[str, Any], spec: PoolSpec | None, report: PoolReport) -> None:
        """The status as of now (its `since` times), built only if the writer compares or writes it."""
        meta = body["metadata"]
        now = now_rfc3339()
        self.status.submit(resource_path(API_VERSION, "targetpools", meta["namespace"], meta["name"], "status"),
                           lambda: pool_status(body, spec, report, now), body.get("status"))
        if self.metrics is not None and spec is not None:
            active = members_in(report, MemberState.ACTIVE)
            self.metrics.members.labels(namespace=spec.namespace, pool=spec.name).set(active)

    def warn(self, body: dict[str, Any], reason: str, message: str) -> None:
        self.events.post(body, reason, message, warning=True)

    def note(self, body: dict[str, Any], reason: str, message: str) -> None:
        self.events.post(body, reason, message)

    def backend_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.backend_errors.labels(reason=reason).inc()

    def refused(self, body: dict[str, Any], refused: Iterable[Refusal], reported: set[str]) -> set[str]:
        """One MemberRefused Event per instance as it becomes refused; returns who is refused now."""
        now = set()
        for item in refused:
            now.add(item.instance.ref)
            if item.instance.ref not in reported:
                self.warn(body, "MemberRefused", f"{item.instance.ref}: {item.reason}")
        return now

    def actions(self, body: dict[str, Any], where: str, results: Sequence[ActionResult],
                instance_of: Mapping[str, str]) -> None:
        """One Event per kind of change per reconcile, naming the instances, so a burst stays readable."""
        added: list[str] = []
        removed: list[str] = []
        weighted: list[str] = []
        for result in results:
            action = result.action
            who = instance_of.get(action.name, action.name)
            if not result.ok:
                if not waiting_for_connections(result):  # del waits for in-flight connections: retried later
                    self.warn(body, "BackendError", f"{type(action).__name__} {who}: {result.message}")
            elif isinstance(action, AddMember):
                added.append(f"{who} ({action.address}:{action.port}) as {action.name}")
            elif isinstance(action, RemoveMember):
                removed.append(f"{who} ({action.name}): {action.reason}")
            elif isinstance(action, SetWeight):
                weighted.append(f"{who} to {action.weight}")
            if self.metrics is not None:
                self.metrics.backend_action(type(action).__name__, "true" if result.ok else "false").inc()
        for reason, verb, items in (("Registered", "added to", added), ("Deregistered", "removed from", removed),
                                    ("WeightChanged", "weight set in", weighted)):
            if len(items) == 1:
                self.note(body, reason, f"{verb} {where}: {items[0]}")
            elif items:
                shown = "; ".join(items[:EVENT_LIST_LIMIT])
                if len(items) > EVENT_LIST_LIMIT:
                    shown += f"; and {len(items) - EVENT_LIST_LIMIT} more"
                self.note(body, reason, f"{len(items)} members {verb} {where}: {shown}")


def forget_removed(results: Sequence[ActionResult], instance_of: dict[str, str]) -> None:
    """Servers that are gone no longer need their instance's name for Events."""
    for result in results:
        action = result.action
        if result.ok and isinstance(action, RemoveMember) and action.reason != ADDRESS_CHANGED:
            instance_of.pop(action.name, None)
