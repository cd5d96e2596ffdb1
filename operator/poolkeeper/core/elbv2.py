"""Pure rules for ELBv2 target groups: target health as member state, who else manages a
target group, and batching. No I/O (backends/elbv2.py and aws/ do the calls)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from poolkeeper.core.model import ActualMember, Admin
from poolkeeper.core.planner import HEALTHY

BATCH = 100  # targets per RegisterTargets / DeregisterTargets / DescribeTargetHealth call
NOT_REGISTERED = "Target.NotRegistered"
OWNER_TAG = "poolkeeper.dev/owner"
# Tags other controllers put on the target groups they manage (aws-load-balancer-controller).
FOREIGN_TAGS = ("elbv2.k8s.aws/cluster", "ingress.k8s.aws/stack", "service.k8s.aws/stack")

T = TypeVar("T")
_PROVIDER_ID = re.compile(r"^aws://(?:/[^/]*)?/(i-[0-9a-f]{8,17})$")


@dataclass(frozen=True, slots=True)
class Target:
    """One target this pool registered: its member name, Id (an IP address, or an EC2 instance
    id for targetType instance), port, and the member's address (the planner compares it)."""

    name: str
    id: str
    port: int
    address: str = ""

    @property
    def member_address(self) -> str:
        return self.address or self.id


def ec2_instance_id(provider_id: str) -> str:
    """`aws:///us-east-1a/i-0abc...` (a Node's spec.providerID) -> `i-0abc...`; "" otherwise."""
    match = _PROVIDER_ID.match(provider_id.strip())
    return match.group(1) if match else ""


def instance_id_refusal(kind: str, ec2_id: str) -> str | None:
    """Why a member cannot be an `instance` target: it has no EC2 instance id."""
    if ec2_id:
        return None
    where = {"Node": "spec.providerID aws:///ZONE/i-...", "Instance": "spec.ec2InstanceID"}.get(kind)
    return ("the target group registers EC2 instances (targetType instance) and this "
            + (f"{kind} has no EC2 instance id ({where})" if where else f"{kind} is no EC2 instance"))


@dataclass(frozen=True, slots=True)
class TargetHealth:
    """DescribeTargetHealth's answer for one target."""

    state: str  # initial | healthy | unhealthy | unused | draining | unavailable
    reason: str = ""  # e.g. Target.NotRegistered, Target.DeregistrationInProgress

    @property
    def registered(self) -> bool:
        """Still in the target group (draining included)."""
        return self.reason != NOT_REGISTERED


def member_of(target: Target, health: TargetHealth) -> ActualMember:
    """A registered target as the planner sees a server.

    healthy: in rotation (Active); draining: the target group drains it (sessions unknown but not
    over: counted as 1, so the pool waits for the target group or its own delay); initial,
    unhealthy, unused, unavailable: registered, waiting for health checks (Registering).
    """
    if health.state == "healthy":
        return ActualMember(target.name, target.member_address, target.port, Admin.READY, HEALTHY, 0)
    sessions = 1 if health.state == "draining" else 0
    return ActualMember(target.name, target.member_address, target.port, Admin.DRAIN, health.state, sessions)


def ownership_refusal(arn: str, tags: Mapping[str, str], cluster_id: str = "") -> str | None:
    """Why poolkeeper must not touch the target group `arn` at all, or None.

    A target group tagged by aws-load-balancer-controller belongs to it; one whose
    `poolkeeper.dev/owner` tag names another cluster id belongs to that cluster's operator.
    """
    for key in FOREIGN_TAGS:
        if key in tags:
            return (f"target group {arn} carries tag {key}={tags[key]}: another controller manages it, "
                    "so poolkeeper leaves it alone")
    owner = tags.get(OWNER_TAG)
    if owner is not None and owner != cluster_id:
        mine = f"this operator's cluster id {cluster_id!r}" if cluster_id else "this operator (no cluster id set)"
        return f"target group {arn} carries tag {OWNER_TAG}={owner}, which is not {mine}"
    return None


def batches(items: Sequence[T], size: int = BATCH) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
