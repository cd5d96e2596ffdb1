"""Reconcile one TargetPool, as a recipe of steps (like aws-load-balancer-controller's Reconcile):

1. resolve: the pool's spec, its LoadBalancer and whether it may drive that backend;
2. read: what the backend holds now (level-triggered: restarts and missed events heal alike);
3. want: the desired members, and what blocking lifecycle hooks hold;
4. plan (pure, core.planner) and 5. apply (servers that drain and are read idle right after
   are removed at once: a drain and its removal take one reconcile);
6. move: once the pool is in rotation where the spec says, drain and empty every place it
   was before (status.placements remembers them across restarts);
7. report: status, Events and readiness gates (wording in controller/report.py).

Retries back off in the work queue: reconcile() says whether it failed, the worker calls
add_rate_limited or forget.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeGuard

from poolkeeper import API_VERSION
from poolkeeper.aws import AWSError
from poolkeeper.backends import ActionResult, Backend, ServerBackend
from poolkeeper.backends.elbv2 import ELBv2Backend, ELBv2Backends
from poolkeeper.backends.endpointslice import EndpointSliceBackend, ServiceProblem
from poolkeeper.backends.haproxy import BackendMissing, HAProxyPool
from poolkeeper.backends.haproxy_client import HAProxyUnreachable
from poolkeeper.controller.claimindex import LiveClaims
from poolkeeper.controller.loadbalancers import LoadBalancers
from poolkeeper.controller.readiness import ReadinessGates, gate_type, wanted_gate
from poolkeeper.controller.report import (
    PoolReport,
    Reporter,
    forget_removed,
    member_reports,
    waiting_for_connections,
)
from poolkeeper.controller.store import Key, Store
from poolkeeper.core.addresses import ENDPOINTSLICE_ALLOWANCE, LB_ALLOWANCE, AddressPolicy, source_refusal
from poolkeeper.core.claims import Claimant, ClaimIndex, ClaimKey, endpointslice_claim, haproxy_claim
from poolkeeper.core.conditions import Condition
from poolkeeper.core.elbv2 import instance_id_refusal
from poolkeeper.core.model import (
    ActualMember,
    Admin,
    DesiredMember,
    MemberHolds,
    MemberReport,
    MemberState,
    Placement,
    Plan,
    RemoveMember,
    SetAdmin,
)
from poolkeeper.core.planner import (
    MemberMemo,
    Refusal,
    desired_members,
    plan_pool,
    settle_names,
    simulate,
    unready_members,
)
from poolkeeper.core.poolspec import InvalidSpec, LoadBalancerSpec, PoolSpec, backend_refusal, parse_pool
from poolkeeper.core.tenancy import (
    NodeSourcePolicy,
    ec2_source_refusal,
    node_source_refusal,
    parse_ec2_source_namespaces,
)
from poolkeeper.kube import fence
from poolkeeper.kube.api import JSON_PATCH, MERGE, ApiError, KubeApi, resource_path
from poolkeeper.kube.events import EventRecorder
from poolkeeper.kube.status import StatusWriter
from poolkeeper.lifecycle.errors import OutboxError

log = logging.getLogger(__name__)
FINALIZER = "poolkeeper.dev/cleanup"
RESYNC_SECONDS = 30.0
FULL_RESYNC_EVERY = 10  # a settled pool's resync only re-reads its backend; every 10th is a full reconcile
WATCH_SECONDS = 0.5  # re-read a pool this often while members drain or wait for checks
HEALTH_SECONDS = 5.0  # a settled pool with health checks is re-read this often: checks move health on their own
FOLLOW_UP_SECONDS = 0.05  # the next step of a plan (drain -> remove) when not taken by the same reconcile
BACKEND_ERRORS = (TimeoutError, HAProxyUnreachable, BackendMissing, OSError, ApiError, AWSError)
# ELBv2 target groups poolkeeper must not touch at all (AWSError reasons that block the pool)
ELBV2_BLOCKED = ("TargetGroupNotOwned", "TargetTypeMismatch", "AWSSupportNotInstalled")
# Refusals after which the pool's own servers leave the backend it may no longer drive.
REVOKED = ("NotAllowed", "Conflict", "LoadBalancerNotFound", "SourceNotAllowed", "NodeSourceNotAllowed",
           "EC2SourceNotAllowed")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a reconcile asks of the work queue."""

    after: float | None = None  # look again after this many seconds; None: only on the next event
    failed: bool = False  # back off through the queue's rate limiter (per key, exponential)


class Blocked(Exception):
    """The pool cannot be synced for a reason a person must fix; goes into `Synced`."""

    def __init__(self, reason: str, message: str, retry: float | None = RESYNC_SECONDS, event: bool = False,
                 backoff: bool = False) -> None:
        super().__init__(message)
        self.reason, self.retry, self.event = reason, retry, event
        # backoff: retried through the queue's rate limiter (5 ms doubling to 30 s), for what is
        # usually fixed moments later by the same `kubectl apply` (a Service created after its pool)
        self.backoff = backoff


@dataclass
class PoolMemory:
    """What one pool remembers between reconciles (all of it may be lost on restart)."""

    draining: dict[Placement, dict[str, float]] = field(default_factory=dict)  # per place: server -> since
    refused_reported: set[str] = field(default_factory=set)
    reports: dict[str, MemberReport] = field(default_factory=dict)
    instance_of: dict[str, str] = field(default_factory=dict)  # server name -> Kind/ns/name, for Events
    slices: EndpointSliceBackend | None = None  # kept between reconciles: it caches what it wrote
    blocked: str = ""  # the Blocked reason last reported with an Event
    failing: str = ""  # the backend failure last reported with an Event
    placements: list[Placement] | None = None  # where the pool's servers may be; None: not read from status yet
    settled: Settled | None = None  # the last reconcile left everything in place; None: not (or not known)
    left: LeftView | None = None  # what the next reconcile may plan from instead of reading HAProxy
    verified: int = 0  # resyncs since then that found the backend as it was left
    members: MemberMemo = field(default_factory=MemberMemo)  # desired_members' answers per instance

    def since(self, where: Placement) -> dict[str, float]:
        return self.draining.setdefault(where, {})


@dataclass(frozen=True, slots=True)
class Settled:
    """What a reconcile that changed nothing and left every member Active saw: the pool's
    resync then only needs to see the same servers again (see PoolController.resync_due)."""

    spec: PoolSpec
    client: Any  # the LoadBalancer's runtime-API client (a new one: the LoadBalancer changed)
    servers: dict[str, tuple[str, int, Admin, str, int | None]]


@dataclass(frozen=True, slots=True)
class LeftView:
    """The servers of an HAProxy pool as its last reconcile left them, while what its next plan
    depends on can change only through this operator; see PoolController._view_left."""

    spec: PoolSpec
    client: Any  # the LoadBalancer's runtime-API client
    generation: int  # the LoadBalancer's (LoadBalancers.generation) when it did
    actual: Mapping[str, ActualMember]


def settled_view(actual: Mapping[str, ActualMember]) -> dict[str, tuple[str, int, Admin, str, int | None]]:
    """What a plan depends on when every member is in rotation: not sessions (only draining
    members wait for them), which change with every request."""
    return {name: (m.address, m.port, m.admin, m.health, m.weight) for name, m in actual.items()}


def _removals_only(actions: Sequence[Any]) -> bool:
    return bool(actions) and all(isinstance(a, RemoveMember) for a in actions)


def placements_from_status(body: Mapping[str, Any]) -> list[Placement]:
    """status.placements as the last run wrote them; entries that do not parse are skipped."""
    raw = (body.get("status") or {}).get("placements")
    found = [Placement.from_status(item) for item in raw] if isinstance(raw, list) else []
    return list(dict.fromkeys(p for p in found if p is not None))


class ReconcileHooks(Protocol):
    """Lifecycle handlers plug in here: they gate members and see every reconcile."""

    def held(self, spec: PoolSpec) -> MemberHolds: ...
    async def prepare(self, spec: PoolSpec, desired: Mapping[str, DesiredMember]) -> bool: ...
    async def observe(self, spec: PoolSpec, desired: Mapping[str, DesiredMember],
                      results: list[ActionResult], present: frozenset[str]) -> None: ...


class NoHooks:
    def held(self, spec: PoolSpec) -> MemberHolds:
        return MemberHolds()

    async def prepare(self, spec: PoolSpec, desired: Mapping[str, DesiredMember]) -> bool:
        return False

    async def observe(self, spec: PoolSpec, desired: Mapping[str, DesiredMember],
                      results: list[ActionResult], present: frozenset[str]) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Wanted:
    """Step 3's answer: the members the pool wants, who is refused, and what hooks hold."""

    members: dict[str, DesiredMember]
    refused: list[Refusal]
    holds: MemberHolds
    unready: dict[str, DesiredMember] = field(default_factory=dict)  # servers kept while their pod is unready

    @property
    def serving(self) -> int:
        return sum(1 for m in self.members.values() if m.serving)


class PoolController:
    def __init__(self, store: Store, api: KubeApi, status: StatusWriter, events: EventRecorder,
                 lbs: LoadBalancers, gates: ReadinessGates, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic, *,
                 endpointslice_policy: AddressPolicy | None = None, allow_external_sources: bool = False,
                 node_sources: NodeSourcePolicy | None = None, cluster_id: str = "") -> None:
        self.store, self.api, self.status, self.events = store, api, status, events
        self.lbs, self.gates, self.metrics, self.clock = lbs, gates, metrics, clock
        self.report = Reporter(status, events, metrics)
        self.endpointslice_policy = endpointslice_policy or AddressPolicy(None, ENDPOINTSLICE_ALLOWANCE)
        self.allow_external_sources = allow_external_sources
        self.node_sources = node_sources  # --node-source-namespaces; None: every namespace
        self.cluster_id = cluster_id  # --cluster-id: the name prefix of this operator's servers
        self.hooks: ReconcileHooks = NoHooks()
        self.memory: dict[Key, PoolMemory] = {}
        self.applied: dict[Key, int] = {}  # actions applied by the last reconcile, per pool
        self._specs: dict[Key, tuple[tuple[Any, ...], Any, PoolSpec | InvalidSpec]] = {}
        self._claims = LiveClaims()  # kept current per pool; rebuilt after a LoadBalancer or Namespace changed
        self._claims_stale = True
        self._claims_dirty: set[Key] = set()
        self._by_lb: tuple[int, dict[str, list[Key]]] = (-1, {})  # (store.pools.spec_version, LB -> pools)
        # (client, backend, prefix, check, legacy_prefix=)
        self.haproxy_pool: Callable[..., ServerBackend] = HAProxyPool
        self.elbv2 = ELBv2Backends(self._write_elbv2_targets, cluster_id=cluster_id)
        self.ec2_sources = parse_ec2_source_namespaces(None)  # --ec2-source-namespaces; unset: none
        # (reason, message) while an EC2 pool's instances are not listed yet (sources.ec2.Ec2Feeds.block)
        self.source_block: Callable[[PoolSpec], tuple[str, str] | None] = lambda spec: None

    # ----- specs, cached while what parse_pool reads stays the same
    def spec(self, key: Key) -> PoolSpec | InvalidSpec | None:
        """The parsed pool; our own status writes (a new resourceVersion each) do not parse it again."""
        body = self.store.pools.get(key)
        if body is None:
            return None
        meta = body["metadata"]
        identity = (meta.get("uid"), meta.get("generation"), meta.get("creationTimestamp"),
                    meta.get("deletionTimestamp"), meta.get("namespace"), meta.get("name"))
        cached = self._specs.get(key)
        if cached and cached[0] == identity and cached[1] == body.get("spec"):
            return cached[2]
        try:
            parsed: PoolSpec | InvalidSpec = parse_pool(body, self.cluster_id)
        except InvalidSpec as exc:
            parsed = exc
        self._specs[key] = (identity, copy.deepcopy(body.get("spec")), parsed)
        return parsed

    def valid_specs(self) -> list[PoolSpec]:
        return [s for k in list(self.store.pools) if isinstance(s := self.spec(k), PoolSpec)]

    def address_policy(self, spec: PoolSpec) -> AddressPolicy:
        """The address policy of the pool's members: its LoadBalancer's allowedTargetCIDRs, or
        for EndpointSlices the operator's --endpointslice-allowed-cidrs."""
        if spec.backend_type == "EndpointSlice":
            return self.endpointslice_policy
        found = self._lb_spec(spec)
        return AddressPolicy(found.allowed_cidrs if found else None, LB_ALLOWANCE)

    def _lb_spec(self, spec: PoolSpec) -> LoadBalancerSpec | None:
        """The LoadBalancer of an HAProxy or ELBv2 pool, if it exists with that type."""
        found = self.lbs.elbv2(spec.load_balancer) if spec.backend_type == "ELBv2" else self.lbs.get(spec.load_balancer)
        return found[0] if found else None

    def source_refusal(self, spec: PoolSpec) -> str | None:
        """Why the pool's source may not feed its backend at all (core.addresses.source_refusal)."""
        return next((why for kind in spec.kinds if (why := source_refusal(
            kind, spec.backend_type, spec.backend_text, allow_external=self.allow_external_sources)) is not None), None)

    def node_source_refusal(self, spec: PoolSpec) -> str | None:
        """Why the pool's namespace may not select Nodes (core.tenancy.node_source_refusal)."""
        labels = self.store.namespace_labels.get(spec.namespace)
        return next((why for kind in spec.kinds if (why := node_source_refusal(
            kind, spec.namespace, labels, self.node_sources)) is not None), None)

    def ec2_refusal(self, spec: PoolSpec) -> str | None:
        """Why the pool's namespace may not have its EC2 source (core.tenancy.ec2_source_refusal)."""
        source = spec.ec2_source
        if source is None or source.ec2 is None:
            return None
        return ec2_source_refusal(spec.namespace, self.store.namespace_labels.get(spec.namespace),
                                  own_credentials=bool(source.ec2.credentials_secret),
                                  endpoint_url=source.ec2.endpoint_url, policy=self.ec2_sources, where=source.where)

    # ----- claims: who may drive which backend
    def refusal(self, spec: PoolSpec) -> tuple[str, str] | None:
        """(reason, message) if the pool may not drive its backend at all, whoever else wants it."""
        why = self.node_source_refusal(spec)
        if why is not None:
            return ("NodeSourceNotAllowed", why)
        why = self.source_refusal(spec)
        if why is not None:
            return ("SourceNotAllowed", why)
        why = self.ec2_refusal(spec)
        if why is not None:
            return ("EC2SourceNotAllowed", why)
        if spec.backend_type == "EndpointSlice":
            return None
        found = self._lb_spec(spec)
        if found is None:
            return ("LoadBalancerNotFound",
                    self.lbs.invalid(spec.load_balancer) or f"LoadBalancer {spec.load_balancer} does not exist"
                    + (" with type ELBv2" if spec.backend_type == "ELBv2" else ""))
        why = backend_refusal(found, spec.backend, spec.namespace, self.store.namespace_labels.get(spec.namespace))
        return ("NotAllowed", why) if why is not None else None

    def claim_of(self, spec: PoolSpec) -> ClaimKey | None:
        """What the pool would own exclusively: endpoint + backend, or namespace + Service."""
        if spec.backend_type == "ELBv2":
            return ("ELBv2", spec.backend, "")  # a target group ARN names it in every account and region
        if spec.backend_type != "HAProxy":
            return endpointslice_claim(spec.namespace, spec.service)
        found = self.lbs.get(spec.load_balancer)
        return haproxy_claim(found[0].endpoint, spec.backend) if found else None

    def _claimant(self, key: Key) -> Claimant | None:
        spec = self.spec(key)
        if isinstance(spec, PoolSpec) and (claim := self.claim_of(spec)) is not None:
            return Claimant(spec.key, spec.created, claim, not spec.deleting and self.refusal(spec) is None)
        return None

    def claims(self) -> ClaimIndex:
        if self._claims_stale:
            self._claims.reset(c for key in list(self.store.pools) if (c := self._claimant(key)) is not None)
            self._claims_stale = False
            self._claims_dirty.clear()
        while self._claims_dirty:
            key = self._claims_dirty.pop()
            self._claims.put(key, self._claimant(key))
        return self._claims.index

    def invalidate_claims(self, *keys: Key) -> None:
        """Call with the pool's key when one pool changed (only its claims are decided again),
        without keys when a LoadBalancer or a Namespace's labels changed (everything is)."""
        if keys:
            self._claims_dirty.update(keys)
        else:
            self._claims_stale = True

    def claim_peers(self, key: Key) -> list[Key]:
        """The other pools wanting the same backend as `key` (they may win or lose with it)."""
        mine = self.claims().of.get(key)
        return self.claims().others(mine.claim, key) if mine else []

    def pools_using_lb(self, lb: str) -> list[Key]:
        """Asked every second per LoadBalancer (its status counts them): answered from an index
        rebuilt only when a pool came, went or changed its spec, not by parsing every pool."""
        if self._by_lb[0] != self.store.pools.spec_version:
            by_lb: dict[str, list[Key]] = {}
            for spec in self.valid_specs():
                if spec.backend_type in ("HAProxy", "ELBv2"):
                    by_lb.setdefault(spec.load_balancer, []).append(spec.key)
            self._by_lb = (self.store.pools.spec_version, by_lb)
        return list(self._by_lb[1].get(lb, ()))

    # ----- the reconcile, step by step
    async def reconcile(self, key: Key) -> Outcome:
        """Bring one pool in line; says when to look again and whether this attempt failed."""
        body = self.store.pools.get(key)
        if body is None:
            self.memory.pop(key, None)
            self._specs.pop(key, None)
            return Outcome()
        spec = self.spec(key)
        memory = self.memory.setdefault(key, PoolMemory())
        memory.settled = None  # set again by _settle if this reconcile leaves everything in place
        view, memory.left = memory.left, None  # set again below if this one leaves a view worth keeping
        if memory.placements is None:
            memory.placements = placements_from_status(body)
        if isinstance(spec, InvalidSpec):
            self.report.publish(body, None, PoolReport([], Condition("Synced", False, "InvalidSpec", str(spec))))
            self.report.warn(body, "InvalidSpec", str(spec))
            return Outcome()
        assert spec is not None
        if spec.deleting:
            return await self._finalize(body, spec, memory)
        if FINALIZER not in (body["metadata"].get("finalizers") or []):
            await self._add_finalizer(body)
        try:  # 1. resolve, 2. read
            backend, policy = await self._backend(spec)
            kept = self._left_view(spec, view)
            actual = kept or await backend.read_members()
        except Blocked as blocked:
            return await self._blocked(body, spec, memory, blocked)
        except BACKEND_ERRORS as exc:
            return self._backend_failed(body, spec, memory, exc)
        memory.blocked = ""
        try:  # 3. want
            wanted = await self._wanted(spec, policy, actual, memory.members)
        except OutboxError as exc:
            self._publish(body, spec, memory, list(memory.reports.values()),
                          Condition("Synced", False, "OutboxWriteFailed", str(exc)))
            return Outcome(failed=True)
        memory.refused_reported = self.report.refused(body, wanted.refused, memory.refused_reported)
        here = spec.placement
        self._remember(memory, here)  # before anything is added: a restart must find it
        since = memory.since(here)
        plan = self._plan(spec, wanted, actual, since)  # 4. plan
        try:  # 5. apply
            fresh: Mapping[str, ActualMember] | None = None
            if self._read_with_apply(backend, spec, plan.actions):
                results, fresh = await backend.apply_and_read(plan.actions)
            else:
                results = await backend.apply(plan.actions) if plan.actions else []
            if fresh is None and kept is not None and spec.health_check is not None:
                # checks moved health since the view was read: the report needs what HAProxy says now
                fresh = await backend.read_members()
        except BACKEND_ERRORS as exc:
            return self._backend_failed(body, spec, memory, exc)
        memory.failing = ""
        memory.draining[here] = since = dict(plan.draining_since)
        after = fresh if fresh is not None else simulate(actual, [r.action for r in results if r.ok])
        final = self._plan(spec, wanted, after, since)
        if fresh is not None and all(r.ok for r in results) and _removals_only(final.actions):
            # the read after the drain found them idle: removed now, not by a reconcile of its own
            removed = await self._apply_removals(backend, final.actions)
            if removed:
                results = [*results, *removed]
                memory.draining[here] = since = dict(final.draining_since)
                after = simulate(after, [r.action for r in removed if r.ok])
                final = self._plan(spec, wanted, after, since)
        self.applied[key] = len(results)
        memory.instance_of.update({name: m.instance.ref for name, m in wanted.members.items()})
        self.report.actions(body, spec.backend_text, results, memory.instance_of)
        forget_removed(results, memory.instance_of)
        memory.instance_of = {n: ref for n, ref in memory.instance_of.items() if n in after or n in wanted.members}
        reports = member_reports(final, wanted.holds.pending, memory.instance_of, wanted.refused, spec.port)
        memory.reports = {r.instance: r for r in reports if r.instance}
        hard = [r for r in results if not r.ok and not waiting_for_connections(r)]
        in_rotation = not hard and not any(r.state is MemberState.REGISTERING for r in reports)
        elsewhere = 0
        if in_rotation:  # 6. move: the new place serves, so the old ones may drain
            elsewhere = await self._drain_elsewhere(body, spec, memory, except_for=here)
        # 7. report
        moving = any(p != here for p in memory.placements or [])
        await self.gates.sync(spec.name, self._pods_with_gate(spec), self._gate_reports(spec, memory, moving))
        await self.hooks.observe(spec, wanted.members, results, frozenset(r.name for r in reports))
        synced = Condition("Synced", True, "Synced", f"in sync with {spec.backend_text}")
        if hard:
            synced = Condition("Synced", False, "BackendError", hard[0].message)
        elif elsewhere:
            left = (f"draining and removing {elsewhere} server(s) left where the pool was before" if elsewhere > 0
                    else "the servers left where the pool was before could not be reached yet")
            synced = Condition("Synced", True, "Synced", f"in sync with {spec.backend_text}; {left}")
        self._publish(body, spec, memory, reports, synced, desired=wanted.serving)
        memory.left = self._view_left(spec, results, final.actions, elsewhere, after, fresh=fresh is not None)
        if hard:
            return Outcome(failed=True)
        if final.actions:
            return Outcome(FOLLOW_UP_SECONDS)  # e.g. a member just drained may go once its sessions are counted
        if elsewhere or any(not r.ok for r in results) or any(r.state is not MemberState.ACTIVE for r in reports):
            return Outcome(WATCH_SECONDS)
        return self._settle(spec, memory, after)

    def _settle(self, spec: PoolSpec, memory: PoolMemory, after: Mapping[str, ActualMember]) -> Outcome:
        """Everything in place: an HAProxy pool is looked at again by the periodic resync, which
        only re-reads its servers (resync_due) while they stay as `after` says (what was read,
        with this reconcile's actions done; if HAProxy shows them otherwise, e.g. a default
        weight, the resync simply reconciles once more)."""
        found = self.lbs.get(spec.load_balancer) if spec.backend_type == "HAProxy" else None
        gate = gate_type(spec.name)
        if (found is None or memory.placements != [spec.placement]
                or any(pod.gates.get(gate) != wanted_gate(memory.reports.get(pod.ref))[0]
                       for pod in self._pods_with_gate(spec))):  # a gate write that failed is retried by resyncs
            return Outcome(RESYNC_SECONDS)
        memory.settled, memory.verified = Settled(spec, found[1], settled_view(after)), 0
        return Outcome()

    @staticmethod
    async def _apply_removals(backend: Backend, removals: Sequence[Any]) -> list[ActionResult]:
        """The removals a fresh read allows, in a second round trip; none when it fails (the
        follow-up reconcile the plan then asks for tries again, and says what is wrong)."""
        try:
            return await backend.apply(removals)
        except BACKEND_ERRORS as exc:
            log.debug("removals after a drain not applied yet: %s", exc)
            return []

    def _read_with_apply(self, backend: Backend, spec: PoolSpec, actions: Sequence[Any]) -> TypeGuard[ServerBackend]:
        """Read the servers in the apply's round trip where that read is worth keeping (only an
        HAProxy pool's backend, a ServerBackend, can).

        - Servers start to drain in a pool without checks: those found idle are removed by the
          same reconcile (one more round trip, not a reconcile of its own); a follow-up for the
          others needs no read of its own.
        - Any action of a pool whose checks do not decide entry (initialState Up): the read is
          the report's health and the view the next event plans from, so an event costs one
          round trip, as without checks.
        """
        if spec.backend_type != "HAProxy" or not actions:
            return False
        if spec.health_check is not None:
            return spec.enters_unchecked
        return any(isinstance(a, SetAdmin) and a.admin is Admin.DRAIN for a in actions)

    def _view_left(self, spec: PoolSpec, results: Sequence[ActionResult], still: Sequence[Any], elsewhere: int,
                   after: Mapping[str, ActualMember], *, fresh: bool = False) -> LeftView | None:
        """The servers as this reconcile left them, kept when what the next plan depends on can
        change only through this operator: every action done, no old placement being emptied,
        and nothing left to do or draining (a drain waits for sessions that HAProxy counts) unless
        `after` was read from HAProxy after the actions (`fresh`: a draining server's sessions
        only fall). An HAProxy pool without health checks, or one whose checks do not decide
        entry (initialState Up: the plan's actions do not depend on health, and the reconcile
        that plans from the view reads the health it reports). With initialState Checking a
        server's entry waits for its checks, which change its health on their own: no view."""
        if spec.backend_type != "HAProxy" or elsewhere or not all(r.ok for r in results):
            return None
        if spec.health_check is not None and not (spec.enters_unchecked and fresh):
            return None
        if not fresh and (still or any(m.admin is Admin.DRAIN for m in after.values())):
            return None
        found = self.lbs.get(spec.load_balancer)
        generation = self.lbs.generation(spec.load_balancer)
        return LeftView(spec, found[1], generation, after) if found is not None and generation >= 0 else None

    def _left_view(self, spec: PoolSpec, left: LeftView | None) -> Mapping[str, ActualMember] | None:
        """The view the last reconcile left, if still good: the same spec, LoadBalancer client and
        generation (no restart, reload, lost connection or outage of HAProxy since).

        An instance's event then costs no read of HAProxy. A server someone else changed is found
        by the periodic resync (which re-reads every pool, and whose reconciles read), and a plan
        made on a view HAProxy no longer matches fails on its first command and is made again
        from a read.
        """
        if left is None or any(m.admin is Admin.DRAIN and m.sessions for m in left.actual.values()):
            return None  # sessions to wait for: counted again
        found = self.lbs.get(spec.load_balancer)
        if (found is None or found[1] is not left.client or (spec is not left.spec and spec != left.spec)
                or self.lbs.generation(spec.load_balancer) != left.generation):
            return None
        return left.actual

    def checked_and_settled(self) -> list[Key]:
        """Settled pools with health checks: no event tells when a check takes a server out or
        puts it back, so the health resync re-reads these (a read, not a reconcile, while their
        servers stay as they were) to show it in status within seconds, not at the next resync."""
        return [key for key, memory in self.memory.items()
                if memory.settled is not None and memory.settled.spec.health_check is not None]

    async def resync_due(self, keys: Sequence[Key],
                         fence_of: Callable[[Key], fence.Check | None] = lambda key: None,
                         count: bool = True) -> list[Key]:
        """The pools among `keys` that the periodic resync must reconcile.

        A settled pool (its last reconcile changed nothing and left every member Active) is
        only re-read: if its backend still shows the same servers, nothing else can have
        changed without an event (instances, the pool, its LoadBalancer and its handlers all
        queue it when they change), so it is not reconciled. The reads of one HAProxy go in one
        round trip (BackendReads). Every FULL_RESYNC_EVERY-th resync is a full reconcile anyway.
        Each pool's read runs under its own fence (with shards: its shard's Lease). `count`
        False (the health resync): the read does not count towards the full reconcile.
        """
        due, checks = [], []
        for key in keys:
            memory = self.memory.get(key)
            if memory is None or memory.settled is None or memory.verified + 1 >= FULL_RESYNC_EVERY:
                due.append(key)
            else:
                checks.append(key)
        async def still_settled(key: Key) -> bool:
            with fence.fenced(fence_of(key)):
                return await self._still_settled(key, count)
        found = await asyncio.gather(*(still_settled(key) for key in checks), return_exceptions=True)
        due += [key for key, same in zip(checks, found, strict=True) if same is not True]  # errors: reconcile
        for key in due:  # its reconcile reads the backend: no view of it is taken as current
            memory = self.memory.get(key)
            if memory is not None:
                memory.left = None
        return due

    async def _still_settled(self, key: Key, count: bool = True) -> bool:
        memory = self.memory.get(key)
        settled = memory.settled if memory is not None else None
        spec = self.spec(key)
        found = self.lbs.get(settled.spec.load_balancer) if settled is not None else None
        if memory is None or settled is None or found is None or found[1] is not settled.client or \
                not isinstance(spec, PoolSpec) or (spec is not settled.spec and spec != settled.spec):
            return False
        pool = self.haproxy_pool(found[1], spec.backend, spec.prefix, spec.health_check,
                                 legacy_prefix=spec.legacy_prefix)
        try:  # without checks, every part of a server settled_view compares is in `show servers state`
            actual = await (pool.read_members() if spec.health_check is not None else pool.read_servers())
        except (*BACKEND_ERRORS, ValueError):
            return False  # the reconcile says what is wrong
        if memory.settled is not settled or settled_view(actual) != settled.servers:
            return False  # reconciled meanwhile, or something changed the servers
        if count:
            memory.verified += 1
        return True

    async def _wanted(self, spec: PoolSpec, policy: AddressPolicy, actual: Mapping[str, ActualMember],
                      memo: MemberMemo | None = None) -> Wanted:
        """Desired members and holds; a blocking hook that starts now holds at once (asked again)."""
        wanted = self._desired(spec, policy, actual, memo)
        if await self.hooks.prepare(spec, wanted.members):
            wanted = self._desired(spec, policy, actual, memo)
        return wanted

    def _desired(self, spec: PoolSpec, policy: AddressPolicy, actual: Mapping[str, ActualMember],
                 memo: MemberMemo | None = None) -> Wanted:
        holds = self.hooks.held(spec)
        haproxy = spec.backend_type == "HAProxy"
        candidates = self.candidates(spec)
        desired, refused = desired_members(
            namespace=spec.namespace, pool=spec.name, sources=spec.sources, port=spec.port,
            instances=candidates, policy=policy, held=holds.held,
            variant=spec.variant if haproxy else "", cluster_id=spec.cluster_id, memo=memo,
        )
        if spec.target_type == "instance":  # ELBv2 registers EC2 instances: members need an instance id
            for name, member in list(desired.items()):
                why = instance_id_refusal(member.instance.kind, member.instance.ec2_id)
                if why is not None:
                    refused.append(Refusal(member.instance, why))
                    del desired[name]
        # HAProxy fixes a server's address when adding it: a new address or port takes the member's
        # other name, so old and new serve side by side (EndpointSlices rewrite an endpoint in place)
        if not haproxy:
            return Wanted(desired, refused, holds)
        # an unready pod's server stays, drained, its checks going on (ELBv2 has no drained-but-kept
        # target: draining one deregisters it)
        unready = unready_members(namespace=spec.namespace, pool=spec.name, sources=spec.sources, port=spec.port,
                                  instances=candidates, policy=policy, variant=spec.variant,
                                  cluster_id=spec.cluster_id) if spec.health_check is not None else {}
        return Wanted(settle_names(desired, actual), refused, holds, unready)

    def _plan(self, spec: PoolSpec, wanted: Wanted, actual: Mapping[str, ActualMember],
              since: Mapping[str, float]) -> Plan:
        return plan_pool(desired=wanted.members, actual=actual, draining_since=since, now=self.clock(),
                         deregistration_delay=spec.deregistration_delay,
                         health_checks=spec.checks_health, keep=wanted.holds.keep, unready=wanted.unready,
                         enter_unchecked=spec.enters_unchecked)

    def candidates(self, spec: PoolSpec) -> list[Any]:
        """The instances the pool's sources may select, from the store's label index: a pool of 10
        pods in a namespace of 1,000 matches its selectors against 10, not 1,000, per reconcile (and
        a cold start at 100,000 pods and 1,000 pools does not test a million selectors)."""
        return [inst for kind in spec.kinds
                for inst in self.store.selected(kind, None if kind == "Node" else spec.namespace,
                                                [s.selector for s in spec.sources if s.kind == kind])]

    def _gate_reports(self, spec: PoolSpec, memory: PoolMemory, moving: bool) -> Mapping[str, MemberReport]:
        """While the pool moves, a member still registering in the new place is in rotation in the
        old one: a readiness gate that is True stays True (the pod stays Ready through the move)."""
        if not moving:
            return memory.reports
        gate = gate_type(spec.name)
        out = dict(memory.reports)
        for pod in self._pods_with_gate(spec):
            report = out.get(pod.ref)
            if report is not None and report.state is MemberState.REGISTERING and pod.gates.get(gate) == "True":
                out[pod.ref] = replace(report, state=MemberState.ACTIVE, reason="in rotation where the pool was before")
        return out

    def _pods_with_gate(self, spec: PoolSpec) -> list[Any]:
        if "Pod" not in spec.kinds:
            return []
        return self.store.gated(spec.namespace, gate_type(spec.name))

    async def _backend(self, spec: PoolSpec) -> tuple[Backend, AddressPolicy]:
        refused = self.refusal(spec)
        if refused is not None:
            reason, message = refused
            raise Blocked(reason, message, retry=None if reason == "SourceNotAllowed" else RESYNC_SECONDS,
                          event=reason in ("SourceNotAllowed", "NotAllowed", "NodeSourceNotAllowed",
                                           "EC2SourceNotAllowed"))
        waiting = self.source_block(spec)
        if waiting is not None:  # never listed yet: acting now would take every member for gone
            raise Blocked(*waiting, event=waiting[0] != "EC2SourceNotListed")
        claim = self.claim_of(spec)
        assert claim is not None  # refusal() said the LoadBalancer exists
        mine = Claimant(spec.key, spec.created, claim, not spec.deleting)
        if self.claims().of.get(spec.key) != mine:
            self.invalidate_claims()  # a change this index has not seen yet: never decide on stale data
        winner = self.claims().winner(claim)
        if winner is None or winner.key != spec.key:
            other = "another pool"
            if winner is not None:
                older = ("which is older" if winner.created != spec.created
                         else "created the same second and first by namespace/name")
                other = f"TargetPool {winner.key[0]}/{winner.key[1]}, {older}"
            where = f" (HAProxy {claim[1]})" if claim[0] == "HAProxy" else ""
            raise Blocked("Conflict", f"{spec.backend_text}{where} is already used by {other}", event=True)
        if spec.backend_type == "EndpointSlice":
            cached = self._slices(spec)
            try:
                await cached.check_service()
            except ServiceProblem as exc:
                cached.invalidate()
                raise Blocked(exc.reason, str(exc), backoff=True) from exc
            return cached, self.endpointslice_policy
        if spec.backend_type == "ELBv2":
            return await self._elbv2_backend(spec)
        found = self.lbs.get(spec.load_balancer)
        assert found is not None  # refusal() said it exists
        lb, client = found
        try:
            # the winner of the claim: no other pool may have servers here, so it also takes out
            # servers its namespace/name had under the old 32-bit prefix (upgrades leave none behind)
            pool = self.haproxy_pool(client, spec.backend, spec.prefix, spec.health_check,
                                     legacy_prefix=spec.legacy_prefix)
            return pool, AddressPolicy(lb.allowed_cidrs, LB_ALLOWANCE)
        except BackendMissing as exc:
            raise Blocked("BackendNotFound", str(exc)) from exc

    async def _elbv2_backend(self, spec: PoolSpec) -> tuple[Backend, AddressPolicy]:
        """The pool's own targets in its target group, once the group is checked to be ours to fill."""
        found = self.lbs.elbv2(spec.load_balancer)
        assert found is not None  # refusal() said it exists
        lb, client = found
        try:
            refused = await self.elbv2.refusal(client, spec.backend, spec.target_type)
        except AWSError as exc:
            if exc.reason in ELBV2_BLOCKED:
                raise Blocked(exc.reason, str(exc), event=True) from exc
            raise
        if refused is not None:
            raise Blocked(*refused, event=True)
        return self._elbv2_targets(spec, client, spec.backend), AddressPolicy(lb.allowed_cidrs, LB_ALLOWANCE)

    def _elbv2_targets(self, spec: PoolSpec, client: Any, arn: str) -> ELBv2Backend:
        status = (self.store.pools.get(spec.key) or {}).get("status") or {}
        return ELBv2Backend(client, arn, self.elbv2.owned(spec.namespace, spec.name, spec.uid, status),
                            spec.target_type or "ip")

    async def _write_elbv2_targets(self, namespace: str, name: str, rows: list[dict[str, Any]]) -> None:
        """status.elbv2Targets, written at once (not coalesced): it must be stored before a target is registered."""
        await self.api.patch(resource_path(API_VERSION, "targetpools", namespace, name, "status"),
                             {"status": {"elbv2Targets": rows}}, MERGE)

    def _slices(self, spec: PoolSpec, service: str | None = None) -> EndpointSliceBackend:
        """The pool's slices for its Service (cached), or for another Service it used before (fresh)."""
        if service is not None and service != spec.service:
            return EndpointSliceBackend(self.api, namespace=spec.namespace, service=service, pool=spec.name,
                                        pool_uid=spec.uid, port=spec.port, cluster_id=spec.cluster_id)
        memory = self.memory.setdefault(spec.key, PoolMemory())
        cached = memory.slices
        if cached is None or (cached.service, cached.port, cached.pool_uid) != (spec.service, spec.port, spec.uid):
            cached = memory.slices = EndpointSliceBackend(
                self.api, namespace=spec.namespace, service=spec.service, pool=spec.name, pool_uid=spec.uid,
                port=spec.port, cluster_id=spec.cluster_id)
        return cached

    # ----- leaving a place: the pool's own servers, drained then removed
    @staticmethod
    def _remember(memory: PoolMemory, where: Placement) -> None:
        known = memory.placements or []
        if where not in known:
            memory.placements = [*known, where]

    def _own_servers(self, spec: PoolSpec, where: Placement) -> Backend | None:
        """The pool's own servers (its name prefix) in one backend, reachable even after the
        LoadBalancer was deleted or lost its permission: for draining them, never for adding."""
        if where.type == "ELBv2":
            aws_client = self.lbs.elbv2_for_cleanup(where.load_balancer)
            return self._elbv2_targets(spec, aws_client, where.backend) if aws_client is not None else None
        client = self.lbs.client_for_cleanup(where.load_balancer)
        try:
            return self.haproxy_pool(client, where.backend, spec.prefix, None) if client is not None else None
        except ValueError:
            return None  # a name HAProxy cannot have (a hand-edited status): nothing of ours there

    async def _drain_at(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory,
                        where: Placement) -> tuple[list[MemberReport], int]:
        """Drain, then remove, the pool's own servers in one place (deregistrationDelaySeconds apart).

        Returns the reports of what is left there and how many servers remain. Touches nothing
        that does not carry the pool's prefix: HAProxyPool refuses other names.
        """
        if where.type == "EndpointSlice":
            await self._slices(spec, where.service).delete_all()
            return [], 0
        pool = self._own_servers(spec, where)
        if pool is None:
            return [], 0  # a LoadBalancer this operator never reached: nothing of ours can be there
        try:
            actual = await pool.read_members()
        except BackendMissing:
            return [], 0
        since = memory.since(where)
        if not actual:
            memory.draining.pop(where, None)
            return [], 0
        plan = self._leave(spec, actual, since)
        results = await pool.apply(plan.actions) if plan.actions else []
        self.report.actions(body, str(where), results, memory.instance_of)
        forget_removed(results, memory.instance_of)
        memory.draining[where] = since = dict(plan.draining_since)
        after = simulate(actual, [r.action for r in results if r.ok])
        final = self._leave(spec, after, since)
        return member_reports(final, frozenset(), memory.instance_of), len(after)

    def _leave(self, spec: PoolSpec, actual: Mapping[str, ActualMember], since: Mapping[str, float]) -> Plan:
        """The plan that empties a place: every server drains, then goes."""
        return plan_pool(desired={}, actual=actual, draining_since=since, now=self.clock(),
                         deregistration_delay=spec.deregistration_delay, health_checks=False)

    async def _drain_places(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory,
                            places: Sequence[Placement]) -> tuple[list[MemberReport], int]:
        """Drain several places; a place fully emptied is forgotten. -1: one could not be reached."""
        reports: list[MemberReport] = []
        remaining = 0
        for where in places:
            try:
                left, count = await self._drain_at(body, spec, memory, where)
            except BACKEND_ERRORS as exc:
                log.warning("pool %s/%s: its servers in %s could not be drained yet: %s",
                            spec.namespace, spec.name, where, exc)
                remaining = -1 if remaining <= 0 else remaining
                continue
            reports += left
            if count:
                remaining = count + max(remaining, 0)
            elif memory.placements and where in memory.placements and where != spec.placement:
                memory.placements = [p for p in memory.placements if p != where]
                memory.draining.pop(where, None)
                self.report.note(body, "Moved", f"all servers removed from {where}, where the pool was before")
        return reports, remaining

    async def _drain_elsewhere(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory, *,
                               except_for: Placement) -> int:
        stale = [p for p in memory.placements or [] if p != except_for]
        if not stale:
            return 0
        return (await self._drain_places(body, spec, memory, stale))[1]

    async def _blocked(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory, blocked: Blocked) -> Outcome:
        """The pool may not drive its backend: say why, and take its own servers out (if any)."""
        if blocked.event and memory.blocked != blocked.reason:
            self.report.warn(body, blocked.reason, str(blocked))
        memory.blocked = blocked.reason
        message = str(blocked)
        reports: list[MemberReport] = []
        remaining = 0
        if blocked.reason in REVOKED:
            reports, remaining = await self._drain_places(body, spec, memory, [spec.placement])
            if remaining < 0:
                message += "; its own servers could not be removed yet"
        if remaining > 0:
            message += f"; draining and removing its {remaining} own server(s)"
        memory.reports = {r.instance: r for r in reports if r.instance}
        self._publish(body, spec, memory, reports, Condition("Synced", False, blocked.reason, message))
        if remaining < 0 or (blocked.backoff and not remaining):
            return Outcome(failed=True)
        return Outcome(WATCH_SECONDS if remaining else blocked.retry)

    def _backend_failed(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory, exc: Exception) -> Outcome:
        reason = "BackendNotFound" if isinstance(exc, BackendMissing) else "BackendUnreachable"
        if isinstance(exc, AWSError):
            reason = exc.reason  # Throttled (after botocore's retries with backoff), AWSUnreachable, ...
        message = f"{spec.backend_text}: {exc}"
        if memory.failing != reason:
            self.report.warn(body, reason, message)
        memory.failing = reason
        self.report.backend_error(reason)
        self._publish(body, spec, memory, list(memory.reports.values()), Condition("Synced", False, reason, message))
        return Outcome(failed=True)

    def _publish(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory, reports: list[MemberReport],
                 synced: Condition, desired: int | None = None) -> None:
        self.report.publish(body, spec, PoolReport(reports, synced, desired, tuple(memory.placements or ())))

    # ----- finalizer
    async def _add_finalizer(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        finalizers = [*(meta.get("finalizers") or []), FINALIZER]
        await self.api.patch(resource_path(API_VERSION, "targetpools", meta["namespace"], meta["name"]),
                             {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}})

    async def _finalize(self, body: dict[str, Any], spec: PoolSpec, memory: PoolMemory) -> Outcome:
        """Drain and remove every member wherever the pool has servers, release the pods' gates,
        then let the pool go: the finalizer stays until the pool's own servers are gone."""
        if FINALIZER not in (body["metadata"].get("finalizers") or []):
            return Outcome()
        places = [spec.placement, *(p for p in memory.placements or [] if p != spec.placement)]
        reports, remaining = await self._drain_places(body, spec, memory, places)
        if remaining:
            self._publish(body, spec, memory, reports, Condition(
                "Synced", False, "Finalizing", "draining and removing the pool's own servers before it goes"
                if remaining > 0 else "the pool's own servers could not be reached yet; retrying"))
            return Outcome(failed=True) if remaining < 0 else Outcome(WATCH_SECONDS)
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
        self.elbv2.forget(spec.uid)
        self.report.note(body, "Finalized", f"all members removed from {spec.backend_text}")
        return Outcome()
