"""EC2 as an instance source, the pure part: the source spec, EC2 states as phases, instances as
InstanceState records, and EventBridge messages (as delivered to SQS) as state changes. No I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from poolkeeper.core.model import InstanceState, Phase

KIND = "EC2"
STATE_CHANGE = "EC2 Instance State-change Notification"
# what a pool lists: every state an instance can be seen in before it is gone for good
LISTED_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
_PHASES = {
    "pending": Phase.DOWN,  # not up yet
    "running": Phase.UP,
    "stopping": Phase.DRAINING,
    "shutting-down": Phase.DRAINING,
    "stopped": Phase.DOWN,
    "terminated": Phase.DOWN,
}


@dataclass(frozen=True, slots=True)
class Ec2Source:
    """`spec.source.ec2` of a TargetPool: which instances, and where their state changes arrive."""

    region: str
    queue_url: str
    tags: tuple[tuple[str, str], ...]
    endpoint_url: str = ""  # "" -> AWS's own endpoint for the region
    credentials_secret: str = ""  # a Secret in the pool's namespace; "" -> the operator's own identity
    address_tag: str = ""  # take the address from this tag instead of the private IP

    @property
    def tag_map(self) -> dict[str, str]:
        return dict(self.tags)

    def describe_filters(self) -> list[dict[str, Any]]:
        """DescribeInstances filters: every tag, and the states a member can be in."""
        return [*({"Name": f"tag:{k}", "Values": [v]} for k, v in self.tags),
                {"Name": "instance-state-name", "Values": list(LISTED_STATES)}]

    def matches(self, tags: Mapping[str, str]) -> bool:
        return all(tags.get(k) == v for k, v in self.tags)


def parse_source(raw: Mapping[str, Any], where: str = "spec.source.ec2") -> Ec2Source:
    """From the (schema-checked) `spec.source.ec2` (or `spec.sources[i].ec2`); ValueError for what
    the schema cannot check."""
    tags = raw.get("tags") or {}
    if not isinstance(tags, Mapping) or not tags:
        raise ValueError(f"{where}.tags must select instances by at least one tag")
    secret = (raw.get("credentialsSecretRef") or {}).get("name") or ""
    return Ec2Source(region=str(raw.get("region") or ""), queue_url=str(raw.get("queueURL") or ""),
                     tags=tuple(sorted((str(k), str(v)) for k, v in tags.items())),
                     endpoint_url=str(raw.get("endpointURL") or ""), credentials_secret=str(secret),
                     address_tag=str(raw.get("addressTag") or ""))


def phase_of(state: str) -> tuple[Phase, str]:
    """pending -> down (not up yet), running -> up, stopping/shutting-down -> draining,
    stopped/terminated (or anything unknown) -> down."""
    return _PHASES.get(state, Phase.DOWN), f"instance {state or 'in an unknown state'}"


def tags_of(raw: Mapping[str, Any]) -> dict[str, str]:
    return {str(t.get("Key")): str(t.get("Value") or "") for t in raw.get("Tags") or [] if t.get("Key")}


def instance_record(raw: Mapping[str, Any], namespace: str, source: Ec2Source,
                    state: str | None = None) -> InstanceState:
    """One instance of DescribeInstances as the pool's namespace sees it; `state` (from an event)
    overrides the listed one. Its tags are its labels, so the pool's selector (the tags) matches."""
    tags = tags_of(raw)
    current = state or str((raw.get("State") or {}).get("Name") or "")
    phase, reason = phase_of(current)
    address = tags.get(source.address_tag) if source.address_tag else raw.get("PrivateIpAddress")
    instance_id = str(raw.get("InstanceId") or "")
    if not address and phase is not Phase.DOWN:
        phase, reason = Phase.DOWN, ("instance has no tag " + source.address_tag if source.address_tag
                                     else "instance has no private IP")
    return InstanceState(KIND, namespace, instance_id, instance_id, str(address) if address else None,
                         tags, phase, reason, ec2_id=instance_id)  # an ELBv2 `instance` target as it is


def with_state(record: InstanceState, state: str) -> InstanceState:
    """The same instance in a new EC2 state (from a state-change event)."""
    phase, reason = phase_of(state)
    if not record.address and phase is not Phase.DOWN:
        return record
    return replace(record, phase=phase, reason=reason)


@dataclass(frozen=True, slots=True)
class StateChange:
    instance_id: str
    state: str
    time: float  # the event's time (seconds since the epoch; 0 if unknown), to drop events delivered late


def parse_message(body: str) -> StateChange | None:
    """An EventBridge "EC2 Instance State-change Notification" as an SQS message body, or None
    for anything else (other events, test notifications, garbage)."""
    try:
        event = json.loads(body)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("detail-type") != STATE_CHANGE or event.get("source") != "aws.ec2":
        return None
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return None
    instance_id, state = detail.get("instance-id"), detail.get("state")
    if not isinstance(instance_id, str) or not instance_id or not isinstance(state, str) or state not in _PHASES:
        return None
    return StateChange(instance_id, state, _epoch(event.get("time")))


def _epoch(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
_LIFECYCLE_DETAIL_TYPES = ("EC2 Instance-launch Lifecycle Action", "EC2 Instance-terminate Lifecycle Action")


@dataclass(frozen=True, slots=True)
class LifecycleAction:
    """An Auto Scaling lifecycle hook waiting for us (Pending:Wait or Terminating:Wait)."""

    transition: str  # LAUNCHING | TERMINATING
    group: str
    hook: str
    instance_id: str
    token: str


def parse_lifecycle(body: str) -> LifecycleAction | None:
    """A lifecycle hook message, sent by the hook straight to SQS or through EventBridge; else None
    (test notifications included)."""
    try:
        event = json.loads(body)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    if event.get("source") == "aws.autoscaling" and event.get("detail-type") in _LIFECYCLE_DETAIL_TYPES:
        event = event.get("detail")
        if not isinstance(event, dict):
            return None
    fields = [event.get(k) for k in ("LifecycleTransition", "AutoScalingGroupName", "LifecycleHookName",
                                     "EC2InstanceId", "LifecycleActionToken")]
    if fields[0] not in (LAUNCHING, TERMINATING) or not all(isinstance(f, str) and f for f in fields):
        return None
    return LifecycleAction(*(str(f) for f in fields))


def lifecycle_result(transition: str, member: str | None) -> str | None:
    """How to complete a hook given the instance's row in the pool (`status.members[].state`, None
    when it has none): CONTINUE or ABANDON, or None to wait (heartbeating). A launch goes on once the
    member is Active, and is abandoned when it is Held (a blocking `up` handler gave up, or its
    address is refused); a termination goes on once the member is drained and gone."""
    if transition == LAUNCHING:
        return {"Active": "CONTINUE", "Held": "ABANDON"}.get(member or "")
    return "CONTINUE" if member is None else None
