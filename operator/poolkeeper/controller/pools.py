"""Reconcile one TargetPool: build the desired model, read the backend, plan, apply, report.

Level-triggered like sample-controller: every reconcile starts from what the load balancer
says now, so restarts, missed events and a restarted HAProxy all heal the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from poolkeeper import API_VERSION
from poolkeeper.backends import ActionResult, Backend
from poolkeeper.backends.endpointslice import EndpointSliceBackend, ServiceProblem
from poolkeeper.backends.haproxy import BackendMissing, HAProxyPool
from poolkeeper.backends.haproxy_client import HAProxyUnreachable
from poolkeeper.controller.loadbalancers import LoadBalancers
from poolkeeper.controller.readiness import ReadinessGates
from poolkeeper.controller.store import Key, Store
from poolkeeper.core.addresses import ENDPOINTSLICE_ALLOWANCE, LB_ALLOWANCE, AddressPolicy, source_refusal
from poolkeeper.core.claims import Claimant, ClaimIndex, ClaimKey, build_index, endpointslice_claim, haproxy_claim
from poolkeeper.core.conditions import Condition, merge_conditions
from poolkeeper.core.model import (
    AddMember,
    DesiredMember,
    MemberReport,
    MemberState,
    Plan,
    RemoveMember,
)
from poolkeeper.core.planner import Refusal, desired_members, plan_pool, simulate
from poolkeeper.core.poolspec import InvalidSpec, PoolSpec, backend_refusal, parse_pool
from poolkeeper.core.retry import backoff_delay
from poolkeeper.core.tenancy import NodeSourcePolicy, node_source_refusal
from poolkeeper.kube.api import JSON_PATCH, ApiError, KubeApi, resource_path
from poolkeeper.kube.events import EventRecorder, now_rfc3339
from poolkeeper.kube.status import StatusWriter
from poolkeeper.lifecycle.errors import OutboxError

log = logging.getLogger(__name__)
FINALIZER = "poolkeeper.dev/cleanup"
RESYNC_SECONDS = 30.0
WATCH_SECONDS = 0.5  # re-read a pool this often while members drain or wait for checks
FOLLOW_UP_SECONDS = 0.05  # the next step of a plan (drain -> remove) once HAProxy counted sessions


def _waiting_for_connections(result: ActionResult) -> bool:
    return isinstance(result.action, RemoveMember) and "connections" in result.message


class Blocked(Exception):
    """The pool cannot be synced for a reason a person must fix; goes into `Synced`."""

    def __init__(self, reason: str, message: str, retry: float | None = RESYNC_SECONDS, event: bool = False) -> None:
        super().__init__(message)
        self.reason, self.retry, self.event = reason, retry, event


@dataclass
class PoolMemory:
    """What one pool remembers between reconciles (all of it may be lost on restart)."""

    draining_since: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    refused_reported: set[str] = field(default_factory=set)
    reports: dict[str, MemberReport] = field(default_factory=dict)
    instance_of: dict[str, str] = field(default_factory=dict)  # server name -> Kind/ns/name, for Events
    slices: EndpointSliceBackend | None = None  # kept between reconciles: it caches what it wrote
    blocked: str = ""  # the Blocked reason last reported with an Event


class ReconcileHooks(Protocol):
    """Lifecycle handlers plug in here: they gate members and see every reconcile."""

    def held(self, spec: PoolSpec) -> tuple[frozenset[str], frozenset[str], frozenset[str]]: ...
    async def prepare(self, spec: PoolSpec, desired: Mapping[str, DesiredMember]) -> bool: ...
    async def observe(self, spec: PoolSpec, desired: Mapping[str, DesiredMember],
                      results: list[ActionResult], present: frozenset[str]) -> None: ...


class NoHooks:
    def held(self, spec: PoolSpec) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        return frozenset(), frozenset(), frozenset()

    async def prepare(self, spec: PoolSpec, desired: Mapping[str, DesiredMember]) -> bool:
        return False

    async def observe(self, spec: PoolSpec, desired: Mapping[str, DesiredMember],
                      results: list[ActionResult], present: frozenset[str]) -> None:
        return None


class PoolController:
    def __init__(self, store: Store, api: KubeApi, status: StatusWriter, events: EventRecorder,
                 lbs: LoadBalancers, gates: ReadinessGates, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic, *,
                 endpointslice_policy: AddressPolicy | None = None, allow_external_sources: bool = False,
                 node_sources: NodeSourcePolicy | None = None) -> None:
        self.store, self.api, self.status, self.events = store, api, status, events
        self.lbs, self.gates, self.metrics, self.clock = lbs, gates, metrics, clock
        self.endpointslice_policy = endpointslice_policy or AddressPolicy(None, ENDPOINTSLICE_ALLOWANCE)
        self.allow_external_sources = allow_external_sources
        self.node_sources = node_sources  # --node-source-namespaces; None: every namespace
        self.hooks: ReconcileHooks = NoHooks()
        self.memory: dict[Key, PoolMemory] = {}
        self.applied: dict[Key, int] = {}  # actions applied by the last reconcile, per pool
        self._specs: dict[Key, tuple[str, PoolSpec | InvalidSpec]] = {}
        self._claims: ClaimIndex | None = None  # rebuilt after a pool, LoadBalancer or Namespace changed

    # ----- specs, cached per resourceVersion
    def spec(self, key: Key) -> PoolSpec | InvalidSpec | None:
        body = self.store.pools.get(key)
        if body is None:
            return None
        version = body["metadata"].get("resourceVersion", "")
        cached = self._specs.get(key)
        if cached and cached[0] == version:
            return cached[1]
        try:
            parsed: PoolSpec | InvalidSpec = parse_pool(body)
        except InvalidSpec as exc:
            parsed = exc
        self._specs[key] = (version, parsed)
        return parsed

    def valid_specs(self) -> list[PoolSpec]:
        return [s for k in list(self.store.pools) if isinstance(s := self.spec(k), PoolSpec)]

    def address_policy(self, spec: PoolSpec) -> AddressPolicy:
        """The address policy of the pool's members: its LoadBalancer's allowedTargetCIDRs, or
        for EndpointSlices the operator's --endpointslice-allowed-cidrs."""
        if spec.backend_type != "HAProxy":
            return self.endpointslice_policy
        found = self.lbs.get(spec.load_balancer)
        return AddressPolicy(found[0].allowed_cidrs if found else None, LB_ALLOWANCE)

    def source_refusal(self, spec: PoolSpec) -> str | None:
        """Why the pool's source may not feed its backend at all (core.addresses.source_refusal)."""
        return source_refusal(spec.kind, spec.backend_type, spec.backend_text,
                              allow_external=self.allow_external_sources)

    def node_source_refusal(self, spec: PoolSpec) -> str | None:
        """Why the pool's namespace may not select Nodes (core.tenancy.node_source_refusal)."""
        return node_source_refusal(spec.kind, spec.namespace, self.store.namespace_labels.get(spec.namespace),
                                   self.node_sources)

    # ----- claims: who may drive which backend
    def refusal(self, spec: PoolSpec) -> tuple[str, str] | None:
        """(reason, message) if the pool may not drive its backend at all, whoever else wants it."""
        why = self.node_source_refusal(spec)
        if why is not None:
            return ("NodeSourceNotAllowed", why)
        why = self.source_refusal(spec)
        if why is not None:
            return ("SourceNotAllowed", why)
        if spec.backend_type != "HAProxy":
            return None
        found = self.lbs.get(spec.load_balancer)
        if found is None:
            return ("LoadBalancerNotFound",
                    self.lbs.invalid(spec.load_balancer) or f"LoadBalancer {spec.load_balancer} does not exist")
        why = backend_refusal(found[0], spec.backend, spec.namespace, self.store.namespace_labels.get(spec.namespace))
        return ("NotAllowed", why) if why is not None else None

    def claim_of(self, spec: PoolSpec) -> ClaimKey | None:
        """What the pool would own exclusively: endpoint + backend, or namespace + Service."""
        if spec.backend_type != "HAProxy":
            return endpointslice_claim(spec.namespace, spec.service)
        found = self.lbs.get(spec.load_balancer)
        return haproxy_claim(found[0].endpoint, spec.backend) if found else None

    def claims(self) -> ClaimIndex:
        if self._claims is None:
            claimants = []
            for key in list(self.store.pools):
                spec = self.spec(key)
                if isinstance(spec, PoolSpec) and (claim := self.claim_of(spec)) is not None:
                    eligible = not spec.deleting and self.refusal(spec) is None
                    claimants.append(Claimant(spec.key, spec.created, claim, eligible))
            self._claims = build_index(claimants)
        return self._claims

    def invalidate_claims(self) -> None:
        """Call when a pool, a LoadBalancer or a Namespace's labels changed."""
        self._claims = None

    def claim_peers(self, key: Key) -> list[Key]:
        """The other pools wanting the same backend as `key` (they may win or lose with it)."""
        mine = self.claims().of.get(key)
        return self.claims().others(mine.claim, key) if mine else []

    def pools_using_lb(self, lb: str) -> list[Key]:
        return [s.key for s in self.valid_specs() if s.backend_type == "HAProxy" and s.load_balancer == lb]

    # ----- the reconcile
    async def reconcile(self, key: Key) -> float | None:
        """Bring one pool in line; returns when to look again (None: only on the next event)."""
        body = self.store.pools.get(key)
        if body is None:
            self.memory.pop(key, None)
            self._specs.pop(key, None)
            return None
        spec = self.spec(key)
        memory = self.memory.setdefault(key, PoolMemory())
        if isinstance(spec, InvalidSpec):
            self._publish(body, None, [], Condition("Synced", False, "InvalidSpec", str(spec)))
            self.events.post(body, "InvalidSpec", str(spec), warning=True)
            return None
        assert spec is not None
        if spec.deleting:
            return await self._finalize(body, spec, memory)
        if FINALIZER not in (body["metadata"].get("finalizers") or []):
            await self._add_finalizer(body)
        try:
            t0 = time.monotonic()
            backend, allowed = await self._backend(spec)
            actual = await backend.read_members()
            t_read = time.monotonic()
        except Blocked as blocked:
            return await self._blocked(body, spec, memory, blocked)
        except (TimeoutError, HAProxyUnreachable, BackendMissing, OSError, ApiError) as exc:
            return self._backend_failed(body, spec, memory, exc)
        memory.blocked = ""
        desired, refused, (pending, held, keep) = self._desired(spec, allowed)
        t_desired = time.monotonic()
        try:
            gated = await self.hooks.prepare(spec, desired)
        except OutboxError as exc:
            memory.failures += 1
            self._publish(body, spec, list(memory.reports.values()), Condition("Synced", False, "OutboxWriteFailed",
                                                                                str(exc)))
            return backoff_delay(memory.failures, WATCH_SECONDS, 30.0)
        if gated:
            desired, refused, (pending, held, keep) = self._desired(spec, allowed)  # a blocking hook now holds
        self._report_refused(body, memory, refused)
        if isinstance(backend, EndpointSliceBackend):
            backend.bind(desired)
        now = self.clock()
        plan = plan_pool(desired=desired, actual=actual, draining_since=memory.draining_since, now=now,
                         deregistration_delay=spec.deregistration_delay,
                         health_checks=spec.health_check is not None, keep=keep)
        t_prepared = time.monotonic()
        try:
            results = await backend.apply(plan.actions) if plan.actions else []
        except (TimeoutError, HAProxyUnreachable, OSError, ApiError) as exc:
            return self._backend_failed(body, spec, memory, exc)
        self.applied[key] = len(results)
        t_applied = time.monotonic()
        memory.draining_since = dict(plan.draining_since)
        failed = [r for r in results if not r.ok]
        memory.instance_of.update({name: m.instance.ref for name, m in desired.items()})
        self._record(body, spec, results, memory)
        after = simulate(actual, [r.action for r in results if r.ok])
        final = plan_pool(desired=desired, actual=after, draining_since=memory.draining_since, now=now,
                          deregistration_delay=spec.deregistration_delay,
                          health_checks=spec.health_check is not None, keep=keep)
        reports = self._reports(final, pending, held, memory.instance_of) + [
            MemberReport("", r.instance.ref, r.instance.address or "", spec.port, MemberState.HELD, "",
                         f"refused: {r.reason}") for r in refused]
        memory.reports = {r.instance: r for r in reports if r.instance}
        await self.gates.sync(spec.name, self._pods_with_gate(spec), memory.reports)
        await self.hooks.observe(spec, desired, results, frozenset(r.name for r in reports))
        log.debug("reconciled %s/%s: read %.1f ms, desired %.1f ms, prepare %.1f ms, apply %.1f ms (%d actions), "
                  "report %.1f ms", spec.namespace, spec.name, (t_read - t0) * 1e3, (t_desired - t_read) * 1e3,
                  (t_prepared - t_desired) * 1e3, (t_applied - t_prepared) * 1e3, len(results),
                  (time.monotonic() - t_applied) * 1e3)
        synced = Condition("Synced", True, "Synced", f"in sync with {spec.backend_text}")
        hard = [r for r in failed if not _waiting_for_connections(r)]
        if hard:
            synced = Condition("Synced", False, "BackendError", hard[0].message)
            memory.failures += 1
        else:
            memory.failures = 0
        self._publish(body, spec, reports, synced, desired=sum(1 for m in desired.values() if m.serving))
        if hard:
            return backoff_delay(memory.failures, WATCH_SECONDS, 30.0)
        if final.actions:
            return FOLLOW_UP_SECONDS  # e.g. a member just drained may go once its sessions are counted
        if failed or any(r.state is not MemberState.ACTIVE for r in reports):
            return WATCH_SECONDS
        return RESYNC_SECONDS

    def _desired(self, spec: PoolSpec, policy: AddressPolicy) -> tuple[dict[str, DesiredMember], list[Refusal],
                                                               tuple[frozenset[str], frozenset[str], frozenset[str]]]:
        gates = self.hooks.held(spec)
        desired, refused = desired_members(
            namespace=spec.namespace, pool=spec.name, kind=spec.kind, selector=spec.selector, port=spec.port,
            instances=self._candidates(spec), policy=policy, held=gates[0] | gates[1],
            variant=spec.variant if spec.backend_type == "HAProxy" else "",
        )
        return desired, refused, gates

    def _candidates(self, spec: PoolSpec) -> Any:
        namespace = None if spec.kind == "Node" else spec.namespace
        return self.store.instances_of(spec.kind, namespace)

    def _pods_with_gate(self, spec: PoolSpec) -> list[Any]:
        if spec.kind != "Pod":
            return []
        gate = f"poolkeeper.dev/{spec.name}"
        return [p for p in self.store.instances_of("Pod", spec.namespace) if gate in p.gates]

    async def _backend(self, spec: PoolSpec) -> tuple[Backend, AddressPolicy]:
        refused = self.refusal(spec)
        if refused is not None:
            reason, message = refused
            raise Blocked(reason, message, retry=None if reason == "SourceNotAllowed" else RESYNC_SECONDS,
                          event=reason in ("SourceNotAllowed", "NotAllowed", "NodeSourceNotAllowed"))
        claim = self.claim_of(spec)
        assert claim is not None  # refusal() said the LoadBalancer exists
        mine = Claimant(spec.key, spec.created, claim, not spec.deleting)
        if self.claims().of.get(spec.key) != mine:
            self.invalidate_claims()  # a change this index has not seen yet: never decide on stale data
        winner = self.claims().winner(claim)
        if winner is None or winner.key != spec.key:
            other = f"TargetPool {winner.key[0]}/{winner.key[1]}, which is older" if winner else "another pool"
            where = f" (HAProxy {claim[1]})" if claim[0] == "HAProxy" else ""
            raise Blocked("Conflict", f"{spec.backend_text}{where} is already used by {other}", event=True)
        if spec.backend_type == "EndpointSlice":
            cached = self._slices(spec)
            try:
                await cached.check_service()
            except ServiceProblem as exc:
                cached.invalidate()
                raise Blocked(exc.reason, str(exc)) from exc
            return cached, self.endpointslice_policy
        found = self.lbs.get(spec.load_balancer)
        assert found is not None  # refusal() said it exists
        lb, client = found
        try:
            # the winner of the claim: no other pool may have servers here, so it also takes out
            # servers its namespace/name had under the old 32-bit prefix (upgrades leave none behind)
            pool = HAProxyPool(client, spec.backend, spec.prefix, spec.health_check, legacy_prefix=spec.legacy_prefix)
            return pool, AddressPolicy(lb.allowed_cidrs, LB_ALLOWANCE)
        except BackendMissing as exc:
            raise Blocked("BackendNotFound", str(exc)) from exc

    def _slices(self, spec: PoolSpec) -> EndpointSliceBackend:
        memory = self.memory.setdefault(spec.key, PoolMemory())
        cached = memory.slices
        if cached is None or (cached.service, cached.port, cached.pool_uid) != (spec.service, spec.port, spec.uid):
            cached = memory.slices = EndpointSliceBackend(
                self.api, namespace=spec.namespace, service=spec.service, pool=spec.name, pool_uid=spec.uid,
                port=spec.port)
        return cached

    def _own_servers(self, spec: PoolSpec) -> HAProxyPool | None:
        """The pool's own servers (its name prefix) in its backend, reachable even after the
        LoadBalancer was deleted or lost its permission: for draining them, never for adding."""
        client = self.lbs.client_for_cleanup(spec.load_balancer)
        return HAProxyPool(client, spec.backend, spec.prefix, None) if client is not None else None

    async def _drain_own(self, body: dict[str, Any], spec: PoolSpec,
                         memory: PoolMemory) -> tuple[list[MemberReport], int]:
        """Drain, then remove, the pool's own servers (deregistrationDelaySeconds apart).

        Returns the reports of what is left and how many servers remain. Touches nothing that
        does not carry the pool's prefix: HAProxyPool refuses other names.
        """
        if spec.backend_type == "EndpointSlice":
            await self._slices(spec).delete_all()
            return [], 0
        pool = self._own_servers(spec)
        if pool is None:
            return [], 0  # a LoadBalancer this operator never reached: nothing of ours can be there
        try:
            actual = await pool.read_members()
        except BackendMissing:
            return [], 0
        if not actual:
            memory.draining_since = {}
            return [], 0
        now = self.clock()
        plan = plan_pool(desired={}, actual=actual, draining_since=memory.draining_since, now=now,
                         deregistration_delay=spec.deregistration_delay, health_checks=False)
        results = await pool.apply(plan.actions) if plan.actions else []
        self._record(body, spec, results, memory)
        memory.draining_since = dict(plan.draining_since)
        after = simulate(actual, [r.action for r in results if r.ok])
        final = plan_pool(desired={}, actual=after, draining_since=memory.draining_since, now=now,
                          deregistration_delay=spec.deregistration_delay, health_checks=False)
        return self._reports(final, frozenset(), frozenset(), memory.instance_of), len(after)

    async def _blocked(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory,
                       blocked: Blocked) -> float | None:
        """The pool may not drive its backend: say why, and take its own servers out (if any)."""
        if blocked.event and memory.blocked != blocked.reason:
            self.events.post(body, blocked.reason, str(blocked), warning=True)
        memory.blocked = blocked.reason
        message = str(blocked)
        reports: list[MemberReport] = []
        remaining = 0
        if blocked.reason in ("NotAllowed", "Conflict", "LoadBalancerNotFound", "SourceNotAllowed"):
            try:
                reports, remaining = await self._drain_own(body, spec, memory)
            except (TimeoutError, HAProxyUnreachable, OSError, ApiError) as exc:
                message += f"; its own servers could not be removed yet: {exc}"
                remaining = -1
        if remaining > 0:
            message += f"; draining and removing its {remaining} own server(s)"
        memory.reports = {r.instance: r for r in reports if r.instance}
        self._publish(body, spec, reports, Condition("Synced", False, blocked.reason, message))
        if remaining:
            return WATCH_SECONDS if remaining > 0 else backoff_delay(max(memory.failures, 1), WATCH_SECONDS, 10.0)
        return blocked.retry

    def _backend_failed(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory, exc: Exception) -> float:
        memory.failures += 1
        reason = "BackendNotFound" if isinstance(exc, BackendMissing) else "BackendUnreachable"
        message = f"{spec.backend_text}: {exc}"
        if memory.failures == 1:
            self.events.post(body, reason, message, warning=True)
        if self.metrics is not None:
            self.metrics.backend_errors.labels(reason=reason).inc()
        self._publish(body, spec, list(memory.reports.values()), Condition("Synced", False, reason, message))
        return backoff_delay(memory.failures, 0.5, 10.0)

    def _report_refused(self, body: dict[str, Any], memory: PoolMemory, refused: list[Refusal]) -> None:
        now_refused = {r.instance.ref for r in refused}
        for item in refused:
            if item.instance.ref not in memory.refused_reported:
                self.events.post(body, "MemberRefused", f"{item.instance.ref}: {item.reason}", warning=True)
        memory.refused_reported = now_refused

    def _reports(self, plan: Plan, pending: frozenset[str], held: frozenset[str],
                 instance_of: Mapping[str, str]) -> list[MemberReport]:
        """Members waiting on a blocking `up` hook show Registering; abandoned ones show Held.

        A member whose instance left the pool still shows which instance it was, while it drains.
        """
        out = []
        for report in plan.members:
            if not report.instance and report.name in instance_of:
                report = replace(report, instance=instance_of[report.name])
            if report.name in pending and report.state is MemberState.HELD:
                report = MemberReport(report.name, report.instance, report.address, report.port,
                                      MemberState.REGISTERING, report.health, "waiting for a blocking up hook")
            out.append(report)
        return out

    def _record(self, body: dict[str, Any], spec: PoolSpec, results: list[ActionResult], memory: PoolMemory) -> None:
        """One Event per kind of change per reconcile, naming the instances, so a burst stays readable."""
        added: list[str] = []
        removed: list[str] = []
        for result in results:
            action = result.action
            who = memory.instance_of.get(action.name, action.name)
            if not result.ok:
                if not _waiting_for_connections(result):  # del waits for in-flight connections: retried later
                    self.events.post(body, "BackendError", f"{type(action).__name__} {who}: {result.message}",
                                     warning=True)
            elif isinstance(action, AddMember):
                added.append(f"{who} ({action.address}:{action.port}) as {action.name}")
            elif isinstance(action, RemoveMember):
                removed.append(f"{who} ({action.name}): {action.reason}")
                if action.reason != "address changed":
                    memory.instance_of.pop(action.name, None)
            if self.metrics is not None:
                self.metrics.backend_actions.labels(action=type(action).__name__, ok=str(result.ok).lower()).inc()
        for reason, verb, items in (("Registered", "added to", added), ("Deregistered", "removed from", removed)):
            if len(items) == 1:
                self.events.post(body, reason, f"{verb} {spec.backend_text}: {items[0]}")
            elif items:
                shown = "; ".join(items[:10]) + (f"; and {len(items) - 10} more" if len(items) > 10 else "")
                self.events.post(body, reason, f"{len(items)} members {verb} {spec.backend_text}: {shown}")

    def _publish(self, body: dict[str, Any], spec: PoolSpec | None, reports: list[MemberReport], synced: Condition,
                 desired: int | None = None) -> None:
        meta = body["metadata"]
        active = sum(1 for r in reports if r.state is MemberState.ACTIVE)
        draining = sum(1 for r in reports if r.state is MemberState.DRAINING)
        if desired is None:
            desired = sum(1 for r in reports if r.state is not MemberState.DRAINING)
        if not synced.status:
            ready = Condition("Ready", False, synced.reason, synced.message)
        elif desired == 0:
            ready = Condition("Ready", False, "NoMembers", "no instance matches the selector and is up")
        elif active == desired:
            ready = Condition("Ready", True, "AllMembersActive", f"{active} of {desired} members active")
        else:
            ready = Condition("Ready", False, "MembersNotActive", f"{active} of {desired} members active")
        now = now_rfc3339()
        previous = {m.get("instance"): m for m in (body.get("status") or {}).get("members") or []}
        status = {
            "members": [self._member_row(r, now, previous) for r in reports],
            "desired": desired, "active": active, "draining": draining,
            "conditions": merge_conditions((body.get("status") or {}).get("conditions"), [ready, synced],
                                           meta.get("generation"), now),
            "observedGeneration": meta.get("generation"),
            "backend": spec.backend_text if spec else "",
        }
        self.status.submit(resource_path(API_VERSION, "targetpools", meta["namespace"], meta["name"], "status"),
                           status)
        if self.metrics is not None and spec is not None:
            self.metrics.members.labels(namespace=spec.namespace, pool=spec.name).set(active)

    @staticmethod
    def _member_row(report: MemberReport, now: str, previous: dict[str, Any]) -> dict[str, Any]:
        prior = previous.get(report.instance)
        since = prior.get("since") if prior and prior.get("state") == report.state.value else now
        return {"instance": report.instance or report.name, "address": report.address, "port": report.port,
                "state": report.state.value, "health": report.health, "reason": report.reason, "since": since}

    # ----- finalizer
    async def _add_finalizer(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        finalizers = [*(meta.get("finalizers") or []), FINALIZER]
        await self.api.patch(resource_path(API_VERSION, "targetpools", meta["namespace"], meta["name"]),
                             {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}})

    async def _finalize(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory) -> float | None:
        """Drain and remove every member, release the pods' gates, then let the pool go."""
        if FINALIZER not in (body["metadata"].get("finalizers") or []):
            return None
        try:  # whether or not the pool may drive the backend: its own servers must go
            _, remaining = await self._drain_own(body, spec, memory)
        except (TimeoutError, HAProxyUnreachable, OSError, ApiError) as exc:
            return self._backend_failed(body, spec, memory, exc)
        if remaining:
            return WATCH_SECONDS
        await self.gates.sync(spec.name, self._pods_with_gate(spec), {}, release=True)
        meta = body["metadata"]
        finalizers = meta.get("finalizers") or []
        index = finalizers.index(FINALIZER)
        try:
            await self.api.patch(resource_path(API_VERSION, "targetpools", meta["namespace"], meta["name"]), [
                {"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
                {"op": "remove", "path": f"/metadata/finalizers/{index}"}], JSON_PATCH)
        except ApiError as exc:
            if exc.status not in (404, 409, 422):
                raise
        self.events.post(body, "Finalized", f"all members removed from {spec.backend_text}")
        return None
