"""The records the core decides on: instances, pool members, and the actions of a plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

NO_ENTRIES: Mapping[str, str] = MappingProxyType({})  # one empty, read-only map for every record without any


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
    gates: Mapping[str, str] = field(default_factory=lambda: NO_ENTRIES)  # our readiness gates -> their status now
    ec2_id: str = ""  # the EC2 instance id (a Node's spec.providerID, an Instance's spec.ec2InstanceID)
    # DOWN only because it is not ready: a pod that exists, is not terminating and keeps its address.
    # A health-checked pool keeps its server for a while (core.planner.unready_members), since
    # readiness that flaps comes back, and a server added afresh waits for its first check.
    unready: bool = False

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
    weight: int | None = None  # its source's weight (0-256); None: leave the load balancer's as it is


@dataclass(frozen=True, slots=True)
class ActualMember:
    """A member as the load balancer reports it."""

    name: str
    address: str
    port: int
    admin: Admin
    health: str = ""  # UP, DOWN, ... as the load balancer says; "" when it has no checks
    sessions: int | None = 0  # None when the load balancer cannot count sessions
    weight: int | None = None  # the server's weight; None when the load balancer has none


@dataclass(frozen=True, slots=True)
class AddMember:
    name: str
    address: str
    port: int
    # who the server stands for, for backends that record it (an EndpointSlice's targetRef)
    instance: InstanceState | None = field(default=None, compare=False)
    weight: int | None = None  # set when adding; None: the load balancer's default


@dataclass(frozen=True, slots=True)
class SetAdmin:
    name: str
    admin: Admin
    # entering rotation unchecked (initialState Up): also mark its health checks passed, so it
    # serves at once and only `fall` failed checks take it out (HAProxy `set server ... health up`)
    mark_up: bool = False


@dataclass(frozen=True, slots=True)
class SetWeight:
    """A new weight for a member in place: the server stays, only its share of new traffic changes."""

    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class RemoveMember:
    name: str
    reason: str
    force: bool = False  # the delay is over: cut what is left instead of waiting for sessions


Action = AddMember | SetAdmin | SetWeight | RemoveMember


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
    weight: int | None = None  # its weight in the load balancer, where it has weights


@dataclass(frozen=True)
class Plan:
    """What to do to the backend, and what the pool looks like once it is done."""

    actions: tuple[Action, ...]
    members: tuple[MemberReport, ...]
    draining_since: Mapping[str, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.actions


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a pool's servers live: one backend section of a LoadBalancer, or one Service's
    EndpointSlices. A pool moved elsewhere keeps the old placement in `status.placements`
    until its servers there are drained and gone, so a restart in between still finds them."""

    type: str  # HAProxy | EndpointSlice | ELBv2
    load_balancer: str = ""
    backend: str = ""  # the HAProxy backend, or the ELBv2 target group's ARN
    service: str = ""

    def to_status(self) -> dict[str, str]:
        if self.type == "ELBv2":
            return {"type": self.type, "loadBalancer": self.load_balancer, "targetGroupARN": self.backend}
        if self.type == "HAProxy":
            return {"type": self.type, "loadBalancer": self.load_balancer, "backend": self.backend}
        return {"type": self.type, "service": self.service}

    @classmethod
    def from_status(cls, raw: Any) -> Placement | None:
        """A status entry as written by to_status; anything else (hand-edited status) is None."""
        if not isinstance(raw, Mapping):
            return None
        fields = {k: raw.get(k) for k in ("type", "loadBalancer", "backend", "service", "targetGroupARN")}
        if not all(isinstance(v, str | None) for v in fields.values()):
            return None
        if fields["type"] == "ELBv2" and fields["loadBalancer"] and fields["targetGroupARN"]:
            return cls("ELBv2", load_balancer=str(fields["loadBalancer"]), backend=str(fields["targetGroupARN"]))
        if fields["type"] == "HAProxy" and fields["loadBalancer"] and fields["backend"]:
            return cls("HAProxy", load_balancer=str(fields["loadBalancer"]), backend=str(fields["backend"]))
        if fields["type"] == "EndpointSlice" and fields["service"]:
            return cls("EndpointSlice", service=str(fields["service"]))
        return None

    def __str__(self) -> str:
        if self.type == "ELBv2":
            return f"LoadBalancer {self.load_balancer}, target group {self.backend}"
        if self.type == "HAProxy":
            return f"LoadBalancer {self.load_balancer}, backend {self.backend}"
        return f"Service {self.service}"


@dataclass(frozen=True, slots=True)
class MemberHolds:
    """What blocking lifecycle hooks do to a pool's members, by server name."""

    pending: frozenset[str] = frozenset()  # a blocking `up` hook still runs: out of rotation, Registering
    abandoned: frozenset[str] = frozenset()  # a blocking hook gave up: out of rotation, Held
    keep: frozenset[str] = frozenset()  # a blocking draining hook still runs: drain but do not remove

    @property
    def held(self) -> frozenset[str]:
        """Members kept out of rotation."""
        return self.pending | self.abandoned
