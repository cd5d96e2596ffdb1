"""Pod readiness gates `poolkeeper.dev/<pool>`: True only once the member is Active.

So a rolling update cannot outrun the load balancer: the next old pod is not taken down
until its replacement really takes traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from poolkeeper.core.model import InstanceState, MemberReport, MemberState
from poolkeeper.kube.api import STRATEGIC, ApiError, KubeApi, resource_path
from poolkeeper.kube.events import now_rfc3339
from poolkeeper.sources.convert import GATE_PREFIX

log = logging.getLogger(__name__)

REASONS = {
    MemberState.ACTIVE: ("Registered", "registered and healthy in the load balancer"),
    MemberState.REGISTERING: ("Registering", "waiting to be registered and healthy"),
    MemberState.DRAINING: ("Draining", "leaving the load balancer"),
    MemberState.HELD: ("Held", "kept out of rotation by a blocking lifecycle hook"),
}


def gate_type(pool: str) -> str:
    return f"{GATE_PREFIX}{pool}"


def wanted_gate(report: MemberReport | None) -> tuple[str, str, str]:
    """(status, reason, message) for a pod's gate condition."""
    if report is None:
        return "False", "NotRegistered", "not a member of the pool (not ready, or refused)"
    if report.state is MemberState.HELD and report.reason.startswith("refused"):
        return "False", "Refused", report.reason
    reason, message = REASONS[report.state]
    if report.reason:
        message = f"{message}: {report.reason}"
    return ("True" if report.state is MemberState.ACTIVE else "False"), reason, message


def gate_patch(uid: str, gate: str, status: str, reason: str, message: str) -> dict[str, object]:
    """The pod status patch for one gate condition. `metadata.uid` is a precondition, as in the
    kubelet's status patches: the API server refuses it for another pod of the same name (422,
    metadata.uid is immutable), so a re-created pod never gets the old one's condition. It is only
    sent when the status changes, so `lastTransitionTime` really is the moment of the transition."""
    return {"metadata": {"uid": uid},
            "status": {"conditions": [{"type": gate, "status": status, "reason": reason, "message": message,
                                       "lastTransitionTime": now_rfc3339()}]}}


class ReadinessGates:
    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.writes = 0
        self._written: dict[tuple[str, str], str] = {}  # (pod uid, gate) -> status we last wrote

    async def sync(self, pool: str, pods: Iterable[InstanceState], reports: Mapping[str, MemberReport],
                   release: bool = False) -> None:
        """Write the gate of every pod that carries it and whose status differs from what it shows.

        `release` (the pool is being deleted) sets the gate True so no pod stays blocked.
        """
        gate = gate_type(pool)
        for pod in pods:
            if gate not in pod.gates:
                continue
            if release:
                status, reason, message = "True", "PoolDeleted", "the TargetPool was deleted; gate released"
            else:
                status, reason, message = wanted_gate(reports.get(pod.ref))
            if pod.gates.get(gate) == status:
                self._written.pop((pod.uid, gate), None)
                continue
            if self._written.get((pod.uid, gate)) == status:
                continue  # our write is on its way back through the watch
            try:
                await self.api.patch(resource_path("v1", "pods", pod.namespace, pod.name, "status"),
                                     gate_patch(pod.uid, gate, status, reason, message), STRATEGIC)
                self.writes += 1
                self._written[(pod.uid, gate)] = status
            except ApiError as exc:
                if exc.status in (409, 422) and "metadata.uid" in exc.message:  # a new pod took the name
                    log.info("pod %s/%s was re-created; gate %s not written to the new one", pod.namespace,
                             pod.name, gate)
                elif exc.status != 404:
                    log.warning("could not set readiness gate %s on pod %s/%s: %s", gate, pod.namespace, pod.name, exc)
