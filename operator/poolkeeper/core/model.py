"""The records the core decides on: instances, pool members, and the actions of a plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Phase(StrEnum):
    """An instance's lifecycle phase as a pool sees it."""

    UP = "up"  # ready and serving
    DRAINING = "draining"  # leaving but still serving existing connections
    DOWN = "down"  # not ready, gone, or heartbeat lost


class Admin(StrEnum):
    """The administrative state of a member in its load balancer."""

    READY = "ready"  # in rotation
    DRAIN = "drain"  # no new traffic; health checks and existing sessions go on
    MAINT = "maint"  # no traffic at all


class MemberState(StrEnum):
    """What `status.members[].state` reports."""

    REGISTERING = "Registering"
    ACTIVE = "Active"
    DRAINING = "Draining"
    HELD = "Held"


@dataclass(frozen=True, slots=True)
class InstanceState:
    """The only thing kept per instance: just the fields pools need."""

    kind: str  # Pod | Node | Instance
    namespace: str  # "" for nodes
    name: str
    uid: str
    address: str | None
    labels: Mapping[str, str]
    phase: Phase
    reason: str
    gates: Mapping[str, str] = field(default_factory=dict)  # our readiness gates -> their status now

    @property
    def ref(self) -> str:
        """`Kind/namespace/name`, or `Node/name` for nodes."""
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else f"{self.kind}/{self.name}"


@dataclass(frozen=True, slots=True)
class DesiredMember:
    """A member the pool wants, and whether it should take new traffic."""

    name: str  # the deterministic backend server name
    instance: InstanceState
    address: str
    port: int
    serving: bool  # False while the instance is draining: keep it but out of rotation
    held: bool = False  # a blocking hook keeps it out of rotation for now


@dataclass(frozen=True, slots=True)
class ActualMember:
    """A member as the load balancer reports it."""

    name: str
    address: str
    port: int
    admin: Admin
    health: str = ""  # UP, DOWN, ... as the load balancer says; "" when it has no checks
    sessions: int | None = 0  # None when the load balancer cannot count sessions


@dataclass(frozen=True, slots=True)
class AddMember:
    name: str
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class SetAdmin:
    name: str
    admin: Admin


@dataclass(frozen=True, slots=True)
class RemoveMember:
    name: str
    reason: str
    force: bool = False  # the delay is over: cut what is left instead of waiting for sessions


Action = AddMember | SetAdmin | RemoveMember


@dataclass(frozen=True, slots=True)
class MemberReport:
    """One row of `status.members`."""

    name: str
    instance: str
    address: str
    port: int
    state: MemberState
    health: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """What to do to the backend, and what the pool looks like once it is done."""

    actions: tuple[Action, ...]
    members: tuple[MemberReport, ...]
    draining_since: Mapping[str, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.actions
