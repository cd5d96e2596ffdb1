"""Turn raw Pod / Node / Instance objects into compact InstanceState records (pure).

Only the fields pools need are kept, so a cluster full of pods no pool selects stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from poolkeeper.core.compact import shared_labels, shared_name
from poolkeeper.core.elbv2 import ec2_instance_id
from poolkeeper.core.model import NO_ENTRIES, InstanceState, Phase
from poolkeeper.core.selectors import LabelSelector, Requirement, SelectorError

GATE_PREFIX = "poolkeeper.dev/"
EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"


def _conditions(status: Mapping[str, Any]) -> dict[str, str]:
    return {c.get("type", ""): c.get("status", "") for c in status.get("conditions") or []}


def _meta(obj: Mapping[str, Any]) -> tuple[str, str, str, Mapping[str, str]]:
    meta = obj.get("metadata") or {}
    return (shared_name(meta.get("namespace") or ""), meta.get("name") or "", meta.get("uid") or "",
            shared_labels(meta.get("labels")))


def pod_state(obj: Mapping[str, Any], deleted: bool = False) -> InstanceState:
    """Ready (or ContainersReady when the pod carries one of our gates) and an IP -> up.

    A pod with our readiness gate cannot turn Ready before we set the gate, so waiting for
    Ready would deadlock: ContainersReady stands in for it, as in the AWS LB Controller.
    """
    namespace, name, uid, labels = _meta(obj)
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    conditions = _conditions(status)
    gates = {
        g["conditionType"]: conditions.get(g["conditionType"], "")
        for g in spec.get("readinessGates") or []
        if str(g.get("conditionType", "")).startswith(GATE_PREFIX)
    } or NO_ENTRIES
    ready = conditions.get("ContainersReady" if gates else "Ready") == "True"
    address = status.get("podIP") or None
    terminating = bool((obj.get("metadata") or {}).get("deletionTimestamp"))
    pod_phase = status.get("phase")
    if deleted:
        phase, reason = Phase.DOWN, "pod deleted"
    elif pod_phase in ("Failed", "Succeeded"):
        phase, reason = Phase.DOWN, f"pod {pod_phase.lower()}"
    elif not ready:
        phase, reason = Phase.DOWN, "pod not ready"
    elif not address:
        phase, reason = Phase.DOWN, "pod has no IP"
    elif terminating:
        phase, reason = Phase.DRAINING, "pod terminating"
    else:
        phase, reason = Phase.UP, "pod ready"
    # down only for want of readiness, which may come back: alive (not deleted, failed, done or
    # terminating) and still at its address
    unready = (not ready and not deleted and pod_phase not in ("Failed", "Succeeded") and not terminating
               and address is not None)
    return InstanceState("Pod", namespace, name, uid, address, labels, phase, reason, gates, unready=unready)


LEFT_FILTER = "pod no longer matches the operator's --pod-label-selector"
_SET = re.compile(r"\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*")
_TERM = re.compile(r"\s*(!?)([^\s!=(),]+)\s*(?:(==|=|!=)\s*([^\s!=(),]*))?\s*")


def parse_label_query(text: str) -> LabelSelector:
    """A `labelSelector=` string (`a=b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`), as the
    API server reads it for the filtered Pod watch; raises SelectorError if it does not parse."""
    reqs: list[Requirement] = []
    rest = text.strip()
    while rest:
        if match := _SET.match(rest):
            values = frozenset(v.strip() for v in match[3].split(",") if v.strip())
            reqs.append(Requirement(match[1], "In" if match[2] == "in" else "NotIn", values))
        elif (match := _TERM.match(rest)) and match[0].strip():
            negated, key, op, value = match[1], match[2], match[3], match[4]
            if op is None:
                reqs.append(Requirement(key, "DoesNotExist" if negated else "Exists", frozenset()))
            elif negated:
                raise SelectorError(f"cannot parse label selector {text!r}")
            else:
                reqs.append(Requirement(key, "NotIn" if op == "!=" else "In", frozenset([value or ""])))
        else:
            raise SelectorError(f"cannot parse label selector {text!r}")
        rest = rest[match.end():]
        if rest and not rest.startswith(","):
            raise SelectorError(f"cannot parse label selector {text!r}")
        rest = rest[1:]
    return LabelSelector(tuple(reqs))


def left_filter(gone: Mapping[str, Any], now: Mapping[str, Any] | None, pod_filter: LabelSelector) -> bool:
    """A DELETED watch event (`gone`: the API server sends the object as it last matched) for a pod
    that still exists (`now`, read back): the same pod, not being deleted, outside the operator's
    --pod-label-selector. It leaves its pools like a pod leaving their selector, not like a deleted one."""
    if now is None:
        return False
    was, meta = gone.get("metadata") or {}, now.get("metadata") or {}
    return (meta.get("uid") == was.get("uid") and not meta.get("deletionTimestamp")
            and not pod_filter.matches(dict(meta.get("labels") or {})))


def node_state(obj: Mapping[str, Any], deleted: bool = False) -> InstanceState:
    """Ready and not excluded -> up; cordoned -> draining; anything else -> down."""
    _, name, uid, labels = _meta(obj)
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    address = next(
        (a.get("address") for a in status.get("addresses") or [] if a.get("type") == "InternalIP"), None
    )
    ready = _conditions(status).get("Ready") == "True"
    if deleted:
        phase, reason = Phase.DOWN, "node deleted"
    elif EXCLUDE_LABEL in labels:
        phase, reason = Phase.DOWN, "node excluded from external load balancers"
    elif not ready:
        phase, reason = Phase.DOWN, "node not ready"
    elif not address:
        phase, reason = Phase.DOWN, "node has no InternalIP"
    elif spec.get("unschedulable"):
        phase, reason = Phase.DRAINING, "node cordoned"
    else:
        phase, reason = Phase.UP, "node ready"
    return InstanceState("Node", "", name, uid, address, labels, phase, reason,
                         ec2_id=ec2_instance_id(str(spec.get("providerID") or "")))


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def heartbeat_timeout(obj: Mapping[str, Any]) -> float | None:
    value = (obj.get("spec") or {}).get("heartbeatTimeoutSeconds")
    return float(value) if value else None


def instance_state(obj: Mapping[str, Any], *, heartbeat_fresh: bool = True, deleted: bool = False) -> InstanceState:
    """EC2 vocabulary: running (with a fresh heartbeat) -> up, stopping -> draining, else down.

    Freshness is decided by the caller's clock (core.heartbeats), not from here.
    """
    namespace, name, uid, labels = _meta(obj)
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    state = status.get("state") or "pending"
    address = spec.get("address") or None
    if deleted:
        phase, reason = Phase.DOWN, "instance deleted"
    elif state == "running" and not heartbeat_fresh:
        phase, reason = Phase.DOWN, "heartbeat lost"
    elif state == "running":
        phase, reason = Phase.UP, "instance running"
    elif state == "stopping":
        phase, reason = Phase.DRAINING, "instance stopping"
    else:
        phase, reason = Phase.DOWN, f"instance {state}"
    return InstanceState("Instance", namespace, name, uid, address, labels, phase, reason,
                         ec2_id=str(spec.get("ec2InstanceID") or ""))
