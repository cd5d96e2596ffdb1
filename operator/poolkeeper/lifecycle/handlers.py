"""LifecycleHandlers plugged into the pool reconcile: transitions -> outbox -> deliveries,
and blocking hooks that gate a member's registration or removal.

Where handlers hear transitions: in one place, `_announce`, the diff between what each handler
was told (the outbox's announced entries) and what the pool's membership rule says now.
- Instance transitions (up, draining, down) reach it from the informer callback
  (`instance_changed`, for the one instance that changed). That is the path, and not the
  reconcile, because it is the fast one: a transition goes to the handler's queue in the same
  loop turn as the watch event, without waiting for the work queue, a backend read or another
  pool's reconcile (transition -> function entered is what bench/bench_lifecycle.py measures).
- The reconcile (`prepare`) runs `_announce` over the whole pool only when the membership it is
  about to act on differs from what the handlers were told: after a start (instances that left
  while no operator watched), a new or changed handler or pool spec, an address or permission
  change that no instance event reports. In steady state it starts nothing. It does keep the
  order that makes blocking hooks safe: a blocking handler's outbox is written (and its gate
  taken) before the backend acts. Non-blocking outboxes are written in the background: the
  backend does not wait for them, their deliveries do (delivery.py `_durable`), so a handler
  told `up` is told `down` too, even across a crash, and a non-blocking handler's outbox never
  holds the load balancer back. One exception: a pool's reconcile writes (without waiting on
  success) an outbox that holds an unwritten `draining` before the backend acts. Otherwise a
  drained server could be removed, the pod deleted and the operator killed before the write,
  and the restart, knowing only `up`, would tell the handler `down` without the `draining` it
  may already have missed. A drain lasts seconds: one ConfigMap write is nothing to it.
- Member transitions (registered, deregistered) come from what the backend did, so only from
  the reconcile (`observe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import UserDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from poolkeeper.backends import ActionResult
from poolkeeper.controller.store import Key, Store
from poolkeeper.core.addresses import AddressPolicy, parse_cidrs
from poolkeeper.core.cloudevents import build_event
from poolkeeper.core.model import Admin, DesiredMember, InstanceState, MemberHolds, RemoveMember, SetAdmin
from poolkeeper.core.planner import desired_members
from poolkeeper.core.poolspec import PoolSpec
from poolkeeper.core.tenancy import function_slots_per_namespace, http_slots_per_namespace
from poolkeeper.core.transitions import (
    DRAINING,
    UP,
    Transition,
    instance_transitions,
    member_states,
    member_transition,
)
from poolkeeper.functions.http import make_http_session
from poolkeeper.functions.pool import FunctionPool, default_size
from poolkeeper.kube import fence
from poolkeeper.kube.api import ApiError, KubeApi, resource_path
from poolkeeper.kube.events import EventRecorder
from poolkeeper.kube.status import StatusWriter
from poolkeeper.lifecycle.delivery import HandlerRuntime
from poolkeeper.lifecycle.errors import OutboxError
from poolkeeper.lifecycle.outbox import (
    COMPONENT,
    COMPONENT_LABEL,
    HANDLER_NAMESPACE_LABEL,
    HANDLER_UID_LABEL,
    Outbox,
    instance_from_record,
)
from poolkeeper.lifecycle.outbox_records import (
    AnnouncedEntry,
    PendingRecord,
    Scope,
    announced_entry,
    instance_record,
    new_pending,
    summary,
)
from poolkeeper.lifecycle.spec import HandlerSpec, parse_handler

log = logging.getLogger(__name__)
RECHECK_SECONDS = 5.0


class Gates:
    """Blocking hooks' hold on members: (pool key, member name) -> why."""

    def __init__(self) -> None:
        self.pending_up: dict[tuple[Key, str], set[str]] = {}  # -> event ids still running
        self.pending_drain: dict[tuple[Key, str], set[str]] = {}
        self.abandoned: set[tuple[Key, str]] = set()

    def for_pool(self, key: Key) -> MemberHolds:
        pending = frozenset(n for (k, n), ids in self.pending_up.items() if k == key and ids)
        held = frozenset(n for (k, n) in self.abandoned if k == key)
        keep = frozenset(n for (k, n), ids in self.pending_drain.items() if k == key and ids)
        return MemberHolds(pending, held, keep)


@dataclass
class Heard:
    """What a pool's handlers were told, in short: checked by the reconcile before it acts."""

    handlers: frozenset[tuple[str, int]] = frozenset()  # (uid, generation) of each handler
    spec: PoolSpec | None = None
    members: dict[str, tuple[str, str]] = field(default_factory=dict)  # instance uid -> (member, up | draining)


class Runtimes(UserDict[Key, "HandlerRuntime"]):
    """The loaded handlers by (namespace, name), indexed by their pool: every instance event and
    every reconcile asks for a pool's handlers, and a scan of all handlers each time grows with
    the cluster. Every change of the map goes through __setitem__ or __delitem__ (UserDict's
    pop, update, setdefault and clear do), and drops the index (a runtime's spec never changes)."""

    def __init__(self) -> None:
        self._by_pool: dict[tuple[str, str], list[HandlerRuntime]] | None = None
        super().__init__()

    def __setitem__(self, key: Key, value: HandlerRuntime) -> None:
        self._by_pool = None
        self.data[key] = value

    def __delitem__(self, key: Key) -> None:
        self._by_pool = None
        del self.data[key]

    def popitem(self) -> tuple[Key, HandlerRuntime]:
        """The newest first, as a dict's (KeyError when empty: clear() relies on it)."""
        self._by_pool = None
        return self.data.popitem()

    def for_pool(self, namespace: str, pool: str) -> list[HandlerRuntime]:
        if self._by_pool is None:
            index: dict[tuple[str, str], list[HandlerRuntime]] = {}
            for (handler_namespace, _), runtime in self.items():
                index.setdefault((handler_namespace, runtime.spec.pool), []).append(runtime)
            self._by_pool = index
        return self._by_pool.get((namespace, pool), [])


class LifecycleHandlers:
    def __init__(self, store: Store, api: KubeApi, status: StatusWriter, events: EventRecorder, queue: Any, *,
                 handlers_dir: Path, allowed_cidrs: tuple[str, ...] | None, workers: int | None,
                 outbox_namespace: str, metrics: Any = None, handler_kubeconfig: str | None = None,
                 http_connections: int = 100, http_namespace_concurrency: int | None = None,
                 cluster_id: str = "") -> None:
        self.store, self.api, self.status, self.events, self.queue = store, api, status, events, queue
        self.cluster_id = cluster_id  # member names in outbox records carry it
        self.outbox_namespace = outbox_namespace
        self.unloaded: dict[Key, dict[str, Any]] = {}  # handlers whose outbox could not be read: retried
        self.handlers_dir, self.metrics = handlers_dir, metrics
        self.allowed_cidrs = parse_cidrs(list(allowed_cidrs)) if allowed_cidrs else None
        size = workers if workers is not None else default_size()
        # Fairness between namespaces: one namespace's slow functions or receivers hold at most
        # all workers but one, and a share of the HTTP connections (core/tenancy.py).
        self.functions = FunctionPool(size, kubeconfig=handler_kubeconfig,
                                      per_namespace=function_slots_per_namespace(size))
        self.http = make_http_session(self.allowed_cidrs, limit=http_connections)
        self.http_per_namespace = http_slots_per_namespace(http_connections, http_namespace_concurrency)
        self._http_slots: dict[str, asyncio.Semaphore] = {}
        self.runtimes = Runtimes()
        self.gates = Gates()
        self.heard: dict[Key, Heard] = {}
        # Pools with a `draining` recorded for a non-blocking handler and not yet written: the
        # pool's next reconcile writes it before the backend acts (`prepare`).
        self.unwritten_drains: dict[Key, set[HandlerRuntime]] = {}
        self._starting: asyncio.Future[None] | None = None
        self._recheck: asyncio.Task[None] | None = None
        # With shards: the fence of a handler's work, the Lease of its pool's shard (namespace, pool)
        self.fence_of: Callable[[str, str], fence.Check | None] = lambda namespace, pool: None

    async def _ensure_started(self) -> None:
        """Start the function workers once; handlers listed concurrently all wait for that one start."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        await self.functions.start()
        self._recheck = asyncio.create_task(self._recheck_loop(), name="handler-recheck")

    # ----- the watch calls these
    async def handler_changed(self, key: Key, body: dict[str, Any], *, deleted: bool) -> None:
        await self._ensure_started()
        old = self.runtimes.get(key)
        if deleted:
            self.unloaded.pop(key, None)
            if old is not None:
                await old.close()
                self.runtimes.pop(key, None)
                self._requeue_pool(key[0], old.spec.pool)
            gone = parse_handler(body)
            if gone.uid:
                await self._delete_outbox(old.outbox if old is not None else self._outbox(gone))
            return
        spec = parse_handler(body)
        if old is not None and old.spec == spec:
            old.body = body
            return
        same_handler = old is not None and old.spec.uid == spec.uid
        outbox = old.outbox if old is not None and same_handler else self._outbox(spec)
        if not same_handler and not await self._load(key, spec, body, outbox):
            if old is not None:
                await old.close()
                self.runtimes.pop(key, None)
            return
        if old is not None:
            await old.close()
            if not same_handler:  # deleted and re-created while we were not looking
                await self._delete_outbox(old.outbox)
        slots = self._http_slots.setdefault(spec.namespace, asyncio.Semaphore(self.http_per_namespace))
        runtime = HandlerRuntime(spec, body, api=self.api, outbox=outbox, functions=self.functions, http=self.http,
                                 http_slots=slots,
                                 handlers_dir=self.handlers_dir, allowed_cidrs=self.allowed_cidrs, status=self.status,
                                 events=self.events, settled=self._settled_for(key), metrics=self.metrics)
        self.runtimes[key] = runtime
        await runtime.validate()
        for event_id, record in sorted(outbox.pending.items(), key=lambda kv: kv[1].order):
            self._gate(record)
            runtime.enqueue(event_id)
        runtime.bound()
        self._requeue_pool(spec.namespace, spec.pool)
        if old is not None and old.spec.pool != spec.pool:
            self._requeue_pool(spec.namespace, old.spec.pool)

    def _outbox(self, spec: HandlerSpec) -> Outbox:
        return Outbox(self.api, self.outbox_namespace, spec.namespace, spec.name, spec.uid)

    def _scope(self, spec: HandlerSpec) -> Scope:
        """What the handler's outbox records may name: its own pool (by uid once known) and namespace."""
        pool = self.store.pools.get((spec.namespace, spec.pool)) or {}
        source = (pool.get("spec") or {}).get("source") or {}
        return Scope(handler_uid=spec.uid, namespace=spec.namespace, pool=spec.pool,
                     pool_uid=(pool.get("metadata") or {}).get("uid"), kind=source.get("kind"),
                     cluster_id=self.cluster_id)

    async def _load(self, key: Key, spec: HandlerSpec, body: dict[str, Any], outbox: Outbox) -> bool:
        """Load and check the outbox; False (and retried later) when the API server can't be read."""
        try:
            dropped = await outbox.load(self._scope(spec))
        except (ApiError, OSError, TimeoutError) as exc:
            log.warning("outbox of LifecycleHandler %s/%s not readable, retrying: %s", *key, exc)
            if key not in self.unloaded:
                self.events.post(body, "OutboxUnavailable", f"the outbox could not be read, retrying: {exc}",
                                 warning=True)
            self.unloaded[key] = body
            return False
        self.unloaded.pop(key, None)
        if dropped:
            for reason in dropped:
                log.warning("outbox of LifecycleHandler %s/%s: %s", key[0], key[1], reason)
            self.events.post(body, "OutboxRecordsDropped", summary(dropped), warning=True)
        return True

    async def _delete_outbox(self, outbox: Outbox) -> None:
        try:
            await outbox.delete()
        except (ApiError, OSError, TimeoutError) as exc:  # collected at the next start
            log.warning("outbox %s not deleted: %s", outbox.path, exc)

    async def collect_orphans(self, live_uids: set[str], namespaces: tuple[str, ...]) -> None:
        """Delete outboxes whose handler went away while no operator was watching.

        With `namespaces` (a namespaced operator) only outboxes of those namespaces are touched.
        """
        for cm in await self.api.list_items(resource_path("v1", "configmaps", self.outbox_namespace)):
            meta = cm.get("metadata") or {}
            labels = meta.get("labels") or {}
            uid = labels.get(HANDLER_UID_LABEL)
            if labels.get(COMPONENT_LABEL) != COMPONENT or not uid or uid in live_uids:
                continue
            if namespaces and labels.get(HANDLER_NAMESPACE_LABEL) not in namespaces:
                continue
            log.info("deleting outbox %s: its LifecycleHandler is gone", meta.get("name"))
            await self.api.delete(resource_path("v1", "configmaps", self.outbox_namespace, meta.get("name")))

    def _requeue_pool(self, namespace: str, pool: str) -> None:
        if (namespace, pool) in self.store.pools:
            self.queue.add((namespace, pool))

    async def _recheck_loop(self) -> None:
        """A broken handler file or an unreadable outbox recovers without a restart: retry those."""
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            for key, body in list(self.unloaded.items()):
                try:
                    with fence.fenced(self.fence_of(key[0], parse_handler(body).pool)):
                        await self.handler_changed(key, body, deleted=False)
                except Exception:
                    log.exception("loading handler %s/%s failed", *key)
            for runtime in list(self.runtimes.values()):
                if runtime.problem is not None:
                    try:
                        with fence.fenced(self.fence_of(runtime.spec.namespace, runtime.spec.pool)):
                            await runtime.validate()
                    except Exception:
                        log.exception("re-checking handler %s failed", runtime.spec.name)

    def forget_pool(self, key: Key) -> None:
        """Another replica acted for the pool (shards): what its handlers were told and what holds
        its members are read again from the outboxes, not taken from memory."""
        self.heard.pop(key, None)
        self.unwritten_drains.pop(key, None)
        for pending in (self.gates.pending_up, self.gates.pending_drain):
            for gate in [g for g in pending if g[0] == key]:
                del pending[gate]
        self.gates.abandoned = {g for g in self.gates.abandoned if g[0] != key}

    # ----- the pool reconcile calls these
    def _handlers_for(self, spec: PoolSpec) -> list[HandlerRuntime]:
        return list(self.runtimes.for_pool(spec.namespace, spec.name))

    def handles(self, spec: PoolSpec) -> bool:
        """Whether any handler is on the pool (asked for every instance event)."""
        return bool(self.runtimes.for_pool(spec.namespace, spec.name))

    def held(self, spec: PoolSpec) -> MemberHolds:
        return self.gates.for_pool(spec.key)

    def instance_changed(self, spec: PoolSpec, instance: InstanceState, policy: AddressPolicy) -> None:
        """The event path: tell handlers at once, without waiting for the pool's next reconcile.

        Membership is decided by the same pure rule the reconcile uses, on this one instance.
        """
        runtimes = self._handlers_for(spec)
        if not runtimes:
            return
        one, _ = desired_members(namespace=spec.namespace, pool=spec.name, sources=spec.sources,
                                 port=spec.port, instances=[instance], policy=policy,
                                 variant=spec.variant if spec.backend_type == "HAProxy" else "",
                                 cluster_id=spec.cluster_id)
        heard = self.heard.get(spec.key)
        if heard is not None:
            heard.members.pop(instance.uid, None)
            heard.members.update(_told(one))
        current = member_states(one)
        for runtime in runtimes:
            self._announce(runtime, spec, current, only=instance.uid)
        for runtime in runtimes:
            if not runtime.spec.blocking:
                runtime.outbox.flush_soon()  # blocking ones: the reconcile writes them before it acts

    async def prepare(self, spec: PoolSpec, desired: Mapping[str, DesiredMember]) -> bool:
        """Before the backend acts: the handlers heard every transition, and blocking ones have it on record.

        Runs `_announce` for the whole pool only when the event path could not have told the
        handlers (see the module docstring). Returns True when a blocking hook now holds a
        member, so the caller re-plans with it. Raises OutboxError only when a blocking
        handler's outbox cannot be written: nothing else holds the backend back.
        """
        runtimes = self._handlers_for(spec)
        if not runtimes:
            self.heard.pop(spec.key, None)
            return False
        members = _told(desired)
        handlers = frozenset((r.spec.uid, r.spec.generation) for r in runtimes)
        heard = self.heard.get(spec.key)
        gated = False
        if heard is None or heard.handlers != handlers or heard.spec != spec or heard.members != members:
            current = member_states(desired)
            told = 0
            for runtime in runtimes:
                new, holds = self._announce(runtime, spec, current, only=None)
                told, gated = told + len(new), gated or holds
            if told and heard is not None and heard.handlers == handlers and heard.spec == spec:
                log.info("pool %s/%s: %d transition(s) no instance event reported, told now", spec.namespace,
                         spec.name, told)
            self.heard[spec.key] = Heard(handlers, spec, members)
        for runtime in runtimes:
            if not runtime.spec.blocking and runtime.outbox.dirty:
                runtime.outbox.flush_soon()
        await self._persist([r for r in runtimes if r.spec.blocking], strict=True)
        if drains := self.unwritten_drains.pop(spec.key, None):
            await self._persist([r for r in runtimes if r in drains and r.outbox.dirty])
        return gated

    def _announce(self, runtime: HandlerRuntime, spec: PoolSpec, current: Mapping[str, tuple[str, DesiredMember]],
                  *, only: str | None) -> tuple[list[str], bool]:
        """THE place handlers hear instance transitions: diff, record, gate, start delivering.

        `current` is what the membership rule says now; `only` limits the diff to one instance
        (the event path), None takes the whole pool. Returns the event ids started and whether
        a blocking `up` hook now holds a member.
        """
        entries = runtime.outbox.announced.setdefault(spec.uid, {})
        scope = entries if only is None else {only: entries[only]} if only in entries else {}
        announced = {uid: e.announced for uid, e in scope.items()}
        known = {uid: (self._current_record(e), e.member) for uid, e in scope.items()}
        new: list[str] = []
        gated = False
        for t in instance_transitions(announced, current, known):
            self.gates.abandoned.discard((spec.key, t.member))  # Held lasts until the next transition
            event_id = self._record(runtime, spec, t)
            if event_id:
                new.append(event_id)
                gated |= self._gate(runtime.outbox.pending[event_id])
                if t.event_type == DRAINING and not runtime.spec.blocking:
                    self.unwritten_drains.setdefault(spec.key, set()).add(runtime)
        for event_id in new:
            if event_id in runtime.outbox.pending:  # (the bound may have dead-lettered it already)
                runtime.enqueue(event_id)
        return new, gated

    async def observe(self, spec: PoolSpec, desired: Mapping[str, DesiredMember], results: list[ActionResult],
                      present: frozenset[str]) -> None:
        """registered (entered rotation) and deregistered (removed) come from what the backend did.

        `present` names the members still in the backend; an instance that is gone, was told
        `down` and has no member left is forgotten, so the outbox does not grow forever.
        """
        runtimes = self._handlers_for(spec)
        if not runtimes:
            return
        by_name = {m.name: m.instance for m in desired.values()}
        new: list[tuple[HandlerRuntime, str]] = []
        for runtime in runtimes:
            entries = runtime.outbox.announced.setdefault(spec.uid, {})
            by_member = {e.member: e for e in entries.values()}
            for result in results:
                action = result.action
                if not result.ok:
                    continue
                if isinstance(action, SetAdmin) and action.admin is Admin.READY and action.name in by_name:
                    event_type, inst = "registered", by_name[action.name]
                elif (isinstance(action, RemoveMember) and action.name in by_member
                      and action.reason != "address changed"):
                    event_type = "deregistered"
                    inst = self._current_record(by_member[action.name])
                else:
                    continue
                entry = entries.get(inst.uid)
                t = member_transition(entry.announced if entry else None, inst, action.name, event_type,
                                      action.reason if isinstance(action, RemoveMember) else "member entered rotation")
                event_id = self._record(runtime, spec, t)
                if event_id:
                    new.append((runtime, event_id))
            for uid, entry in list(entries.items()):
                if entry.state == "down" and entry.member not in present and not self._still_exists(entry):
                    del entries[uid]
                    runtime.outbox.touch()
        for runtime, event_id in new:
            if event_id in runtime.outbox.pending:
                runtime.enqueue(event_id)
        for runtime in runtimes:  # the action already happened: nothing waits on this write
            if runtime.outbox.dirty:
                runtime.outbox.flush_soon()

    # ----- helpers
    def _record(self, runtime: HandlerRuntime, spec: PoolSpec, t: Transition) -> str | None:
        """Advance what the handler was told; queue an event if it subscribed to this type.

        A newer event supersedes an undelivered older one of the same instance (delivery.py), and
        the backlog stays within its bound: neither ever waits for the receiver.
        """
        runtime.outbox.announced.setdefault(spec.uid, {})[t.instance.uid] = announced_entry(t)
        runtime.outbox.touch()
        if t.event_type not in runtime.spec.events:
            return None
        instance = {**instance_record(t.instance), "port": spec.port}
        instead = runtime.supersede(t, instance)
        if instead is None:
            return None  # it and the event it superseded cancel out
        event = build_event(
            handler_uid=runtime.spec.uid, pool_uid=spec.uid, pool_namespace=spec.namespace, pool_name=spec.name,
            instance=instance, event_type=instead.event_type, sequence=instead.seq, from_state=instead.from_state,
            to_state=instead.to_state, reason=instead.reason, time=datetime.now(UTC))
        record = new_pending(event, instead, spec.key, blocking=runtime.spec.blocking, order=time.time_ns())
        runtime.outbox.pending[record.event_id] = record
        runtime.bound()
        return record.event_id if record.event_id in runtime.outbox.pending else None

    def _gate_slot(self, record: PendingRecord) -> tuple[dict[tuple[Key, str], set[str]], tuple[Key, str]]:
        """The table of running blocking hooks for the record's type, and its (pool, member) key."""
        table = self.gates.pending_up if record.event_type == UP else self.gates.pending_drain
        return table, (record.pool, record.member)

    def _gate(self, record: PendingRecord) -> bool:
        if not record.blocking:
            return False
        table, key = self._gate_slot(record)
        table.setdefault(key, set()).add(record.event_id)
        return record.event_type == UP

    def _settled_for(self, handler_key: Key) -> Callable[[PendingRecord, bool], None]:
        def settled(record: PendingRecord, ok: bool) -> None:
            if not record.blocking:
                return
            runtime = self.runtimes.get(handler_key)
            table, member_key = self._gate_slot(record)
            pool_key = member_key[0]
            ids = table.get(member_key)
            if ids is not None:
                ids.discard(record.event_id)
                if not ids:
                    table.pop(member_key, None)
            if record.event_type == UP and not ok and runtime and runtime.spec.on_failure == "Abandon":
                self.gates.abandoned.add(member_key)
            pool_body = self.store.pools.get(pool_key)
            if pool_body is not None:
                verdict = "succeeded" if ok else f"failed ({runtime.spec.on_failure if runtime else 'Continue'})"
                self.events.post(pool_body, "LifecycleHook",
                                 f"blocking {record.event_type} hook {handler_key[1]} for "
                                 f"{record.subject} {verdict}", warning=not ok)
            self.queue.add(pool_key)
        return settled

    def _current_record(self, entry: AnnouncedEntry) -> InstanceState:
        record = entry.instance
        live = self.store.get_instance(record.get("kind", ""), record.get("namespace") or "", record.get("name", ""))
        if live is not None and live.uid == record.get("uid"):
            return live
        return instance_from_record(record, f"{record.get('kind', 'instance').lower()} deleted")

    def _still_exists(self, entry: AnnouncedEntry) -> bool:
        record = entry.instance
        live = self.store.get_instance(record.get("kind", ""), record.get("namespace") or "", record.get("name", ""))
        return live is not None and live.uid == record.get("uid")

    async def _persist(self, runtimes: list[HandlerRuntime], strict: bool = False) -> None:
        """Write the outboxes; `strict` raises OutboxError so the backend does not act unrecorded."""
        results = await asyncio.gather(*(r.outbox.persist() for r in runtimes), return_exceptions=True)
        for runtime, result in zip(runtimes, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                log.warning("outbox of %s not written: %s", runtime.spec.name, result)
                if strict:
                    raise OutboxError(f"the outbox of LifecycleHandler {runtime.spec.name} could not be "
                                      f"written: {result}") from result

    async def close(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
        for runtime in list(self.runtimes.values()):
            await runtime.close()
            with contextlib.suppress(ApiError, OSError, TimeoutError), \
                    fence.fenced(self.fence_of(runtime.spec.namespace, runtime.spec.pool)):
                await runtime.outbox.persist()  # a clean stop leaves nothing to re-deliver
        await self.http.close()
        await self.functions.close()


def _told(desired: Mapping[str, DesiredMember]) -> dict[str, tuple[str, str]]:
    """instance uid -> (member, up | draining): what the handlers are told about these members."""
    return {m.instance.uid: (m.name, UP if m.serving else DRAINING) for m in desired.values()}
