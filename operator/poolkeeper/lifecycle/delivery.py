"""Delivering one handler's events: in order per instance, concurrent across instances,
retried with backoff, dead-lettered at the end, counted in status.

The backlog is bounded, so a receiver that never answers costs its own events, never the pool:
an event nobody has tried to deliver yet is superseded by a newer one for the same instance
(core/transitions.py `supersede` has the rule), and past `maxPendingEvents` (or the outbox's
byte budget) the oldest non-blocking events are dead-lettered with reason BacklogFull: counted
in status.deadLettered and status.lastDeadLetter, in poolkeeper_handler_dead_lettered_total,
posted as an Event and to the dead-letter URL. Blocking events are never dropped: they hold
their member until they ran.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from poolkeeper.core.conditions import Condition, merge_conditions
from poolkeeper.core.retry import backoff_delay
from poolkeeper.core.transitions import DRAINING, NONE, Transition, supersede
from poolkeeper.functions.http import check_url_allowed, deliver_http
from poolkeeper.functions.pool import FunctionPool, Invocation, InvocationResult
from poolkeeper.kube.api import ApiError, KubeApi, NotLeading, resource_path
from poolkeeper.kube.events import EventRecorder, now_rfc3339
from poolkeeper.kube.status import StatusWriter
from poolkeeper.lifecycle.outbox import Outbox
from poolkeeper.lifecycle.outbox_records import PendingRecord
from poolkeeper.lifecycle.spec import HandlerSpec

log = logging.getLogger(__name__)

# Called when a delivery is settled: (record, succeeded) -> None; used to open blocking gates.
Settled = Callable[[PendingRecord, bool], None]
BACKLOG_FULL = "BacklogFull"
RETRIES_EXHAUSTED = "RetriesExhausted"
DEAD_LETTER_QUEUE = 1000  # events waiting for the dead-letter URL; past it they are only counted
Outcome = tuple[bool, str, bool, float | None]  # (ok, error, retryable, retry after seconds)


class Slots(asyncio.Semaphore):
    """A semaphore that can also be taken without awaiting, when a slot is free right now."""

    def try_acquire(self) -> bool:
        """Take a slot at once if one is free and nobody waits for it; never suspends."""
        if self.locked():
            return False
        self._value -= 1
        return True


class HandlerRuntime:
    """One LifecycleHandler: its outbox, per-instance queues, and its status."""

    def __init__(self, spec: HandlerSpec, body: dict[str, Any], *, api: KubeApi, outbox: Outbox,
                 functions: FunctionPool, http: aiohttp.ClientSession, handlers_dir: Path,
                 http_slots: asyncio.Semaphore | None = None,
                 allowed_cidrs: Any, status: StatusWriter, events: EventRecorder, settled: Settled,
                 metrics: Any = None) -> None:
        self.spec, self.body, self.api, self.outbox = spec, body, api, outbox
        self.functions, self.http, self.handlers_dir = functions, http, handlers_dir
        self.allowed_cidrs, self.status, self.events, self.settled = allowed_cidrs, status, events, settled
        self.metrics = metrics
        # The namespace's share of HTTP connections, shared by all its handlers (None: unlimited).
        self.http_slots = http_slots or asyncio.Semaphore(1 << 30)
        self.queues: dict[str, deque[str]] = {}  # instance uid -> event ids, in order
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.in_flight: set[str] = set()  # event ids being attempted right now
        # Loaded from the outbox: an earlier operator may have sent them (its success not yet
        # recorded when it stopped), so they are never superseded.
        self.inherited: set[str] = set(outbox.pending)
        self.dead_letters: deque[dict[str, Any]] = deque(maxlen=DEAD_LETTER_QUEUE)  # for the dead-letter URL
        self._dead_letter_task: asyncio.Task[None] | None = None
        outbox.shed = self._shed_bytes
        self.semaphore = Slots(spec.max_concurrency)
        counts = body.get("status") or {}
        self.counts = {k: int(counts.get(k) or 0) for k in ("invocations", "succeeded", "failed", "deadLettered")}
        self.last: dict[str, Any] | None = counts.get("lastInvocation")
        self.last_dead_letter: dict[str, Any] | None = counts.get("lastDeadLetter")
        self.problem: tuple[str, str] | None = None  # (reason, message) while not Ready
        self.secret: bytes | None = None

    # ----- readiness of the function itself
    async def validate(self) -> None:
        """Check what can be checked before any event: the file, the URL, the signing secret."""
        problem: tuple[str, str] | None = None
        spec = self.spec
        if spec.function_type == "Python":
            error = await self.functions.check(self.handlers_dir, spec.python_handler)
            if error:
                problem = ("HandlerLoadFailed", error)
        else:
            refused = check_url_allowed(spec.url, self.allowed_cidrs)
            if refused:
                problem = ("URLNotAllowed", refused)
            elif spec.secret:
                problem = await self._load_secret()
        if problem and problem != self.problem:
            self.events.post(self.body, problem[0], problem[1], warning=True)
        elif self.problem and not problem:
            self.events.post(self.body, "HandlerReady", f"{spec.function_name} is ready")
        self.problem = problem
        self.publish()

    async def _load_secret(self) -> tuple[str, str] | None:
        assert self.spec.secret is not None
        name, key = self.spec.secret
        secret = await self.api.get_or_none(resource_path("v1", "secrets", self.spec.namespace, name))
        if secret is None:
            return ("SecretNotFound", f"Secret {self.spec.namespace}/{name} not found")
        value = (secret.get("data") or {}).get(key)
        if value is None:
            return ("SecretNotFound", f"Secret {self.spec.namespace}/{name} has no key {key!r}")
        self.secret = base64.b64decode(value)
        return None

    # ----- the backlog
    def supersede(self, t: Transition, instance: dict[str, Any]) -> Transition | None:
        """Drop this instance's undelivered event that `t` supersedes; returns what to record instead.

        `instance` is the event's instance record: an older event about a different record (a
        new address) is kept, so the handler hears about both.
        """
        if self.spec.blocking and t.event_type in ("up", "draining"):
            return t
        older = self._supersedable(t)
        if older is None or older.event["data"]["instance"] != instance:
            return t
        goes, instead = supersede(older.event_type, older.from_state, t)
        if goes:
            self._forget(older)
        return instead

    def _supersedable(self, t: Transition) -> PendingRecord | None:
        """The newest event for t's instance of the same kind (state or member) nobody tried yet."""
        queue = self.queues.get(t.instance.uid) or ()
        for event_id in reversed(queue):
            record = self.outbox.pending.get(event_id)
            if record is None:
                continue
            if record.attempts or record.blocking or event_id in self.in_flight or event_id in self.inherited:
                return None  # what follows an attempted event is never reordered before it
            goes, _ = supersede(record.event_type, record.from_state, t)
            if goes:
                return record
        return None

    def _forget(self, record: PendingRecord) -> None:
        self.outbox.pending.pop(record.event_id, None)
        self.inherited.discard(record.event_id)
        queue = self.queues.get(record.instance_uid)
        if queue is not None and record.event_id in queue and record.event_id not in self.in_flight:
            queue.remove(record.event_id)
        self.outbox.touch()

    def _oldest_droppable(self) -> Iterator[PendingRecord]:
        return (r for r in self.outbox.pending.values() if not r.blocking)

    def bound(self) -> None:
        """Past maxPendingEvents, dead-letter the oldest non-blocking events (BacklogFull)."""
        excess = sum(1 for _ in self._oldest_droppable()) - self.spec.max_pending
        if excess > 0:
            self._dead_letter_backlog([r for _, r in zip(range(excess), self._oldest_droppable(), strict=False)])

    def _shed_bytes(self, needed: int) -> bool:
        """The outbox's JSON is `needed` bytes over its budget: dead-letter the oldest non-blocking events."""
        gone: list[PendingRecord] = []
        for record in self._oldest_droppable():
            if needed <= 0:
                break
            gone.append(record)
            needed -= self.outbox.record_bytes(record)
        self._dead_letter_backlog(gone)
        return bool(gone)

    def _dead_letter_backlog(self, records: list[PendingRecord]) -> None:
        if not records:
            return
        for record in records:
            self._forget(record)
            self.dead_letters.append(dict(record.event))
        self.counts["deadLettered"] += len(records)
        if self.metrics is not None:
            self.metrics.dead_lettered.labels(reason=BACKLOG_FULL).inc(len(records))
        message = (f"the backlog of undelivered events is over maxPendingEvents ({self.spec.max_pending}) or the "
                   f"outbox size: the oldest non-blocking events are dead-lettered; the load balancer is not "
                   f"held back")
        self._note_dead_letter(records[-1], BACKLOG_FULL, message)
        self.events.post(self.body, BACKLOG_FULL, message, warning=True)
        log.warning("LifecycleHandler %s/%s: %d event(s) dead-lettered, backlog full", self.spec.namespace,
                    self.spec.name, len(records))
        self._post_dead_letters()
        self.publish()

    def _note_dead_letter(self, record: PendingRecord, reason: str, message: str) -> None:
        self.last_dead_letter = {"eventId": record.event_id, "type": record.event_type, "instance": record.subject,
                                 "reason": reason, "message": message[:1000], "time": now_rfc3339()}

    # ----- queueing
    def enqueue(self, event_id: str) -> None:
        record = self.outbox.pending[event_id]
        uid = record.instance_uid
        queue = self.queues.setdefault(uid, deque())
        if event_id not in queue:
            queue.append(event_id)
        if uid not in self.workers:
            head = self._head_start(record) if queue[0] == event_id else None
            task = asyncio.create_task(self._drain(uid, head), name=f"deliver-{self.spec.name}-{uid[:8]}")
            if head is not None:
                task.add_done_callback(functools.partial(self._drop_unread, head, event_id))
            self.workers[uid] = task

    def _head_start(self, record: PendingRecord) -> Invocation | None:
        """Begin the instance's next event's first attempt now, from the watch event's callback
        (sent to a free worker, or queued in the function pool), when nothing has to come first:
        an outbox write, or a `maxConcurrency` slot.

        Dispatch waited for the event loop to start the new delivery task, behind every callback
        queued before it: on a busy loop that was most of transition -> function entered.
        """
        spec = self.spec
        if (spec.function_type != "Python" or self.problem is not None or record.attempts
                or record.from_state == NONE or record.event_type == DRAINING or not self._may_write()
                or not self.semaphore.try_acquire()):
            return None
        invocation = self.functions.start_invoke(self.handlers_dir, spec.python_handler, dict(record.event),
                                                 timeout=spec.timeout, attempt=1,
                                                 function_name=spec.python_handler, namespace=spec.namespace)
        if invocation is None:
            self.semaphore.release()
            return None
        self.in_flight.add(record.event_id)
        return invocation

    def _drop_unread(self, head: Invocation, event_id: str, _task: object) -> None:
        """The delivery task ended without waiting for its head start (cancelled before it ran)."""
        if head.abandon():
            self.in_flight.discard(event_id)
            self.semaphore.release()

    def _may_write(self) -> bool:
        """False once this replica lost the shard the handler's pools are in."""
        fenced = getattr(self.api, "may_write", None)
        return fenced is None or bool(fenced())

    async def _drain(self, uid: str, head: Invocation | None = None) -> None:
        """Deliver this instance's events one after the other: the next waits for the previous.

        `head` is the first event's first attempt, already sent (`_head_start`).
        """
        try:
            queue = self.queues[uid]
            while queue:
                event_id = queue[0]
                record = self.outbox.pending.get(event_id)
                if record is not None and (record.from_state == NONE or record.event_type == DRAINING):
                    await self._durable()
                if head is not None or event_id in self.outbox.pending:
                    first, head = head, None
                    try:
                        await self._deliver(event_id, first)
                    except (TimeoutError, OSError, ApiError) as exc:
                        log.warning("delivery of %s stopped, kept in the outbox: %s", event_id, exc)
                        return
                if queue and queue[0] == event_id:
                    queue.popleft()
        finally:
            self.workers.pop(uid, None)
            if not self.queues.get(uid):
                self.queues.pop(uid, None)

    async def _durable(self) -> None:
        """Wait until the outbox that says this event is owed is written (one write serves every
        delivery of the moment).

        An instance's first event waits (from `none`): sent before its record is durable, a
        crash followed by the instance going away would leave the handler told `up` and never
        `down`, since a restarted operator would know nothing of it. A `draining` waits too:
        sent before it is durable, a crash followed by the pod's deletion would have the restart
        derive `down` from the durable `up`, after the handler heard `draining`. A drain lasts
        seconds, so one ConfigMap write costs it nothing worth keeping.

        `up` and `down` after the first do not wait: the restart re-derives what follows the
        last durable state, with the same ids. Waiting on every event serialised deliveries
        behind ConfigMap writes (dispatch p50 went from ~1 ms to ~0.7 s at 200 transitions/s on
        a loaded machine). The price (README, The outbox): a `down` delivered just before a
        crash, of an instance that is `up` again by the restart, is not followed by a new `up`.
        """
        delay = 0.5
        while True:
            try:
                await self.outbox.persist()
                return
            except (TimeoutError, OSError, ApiError) as exc:
                (log.warning if delay == 0.5 else log.debug)("outbox %s not written, deliveries wait: %s",
                                                             self.outbox.path, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _deliver(self, event_id: str, head: Invocation | None = None) -> None:
        """Attempt until settled; returns early when the event left the backlog (dead-lettered) meanwhile.

        `head` is the first attempt, already begun and holding a slot of `semaphore`.
        """
        spec = self.spec
        error = ""
        started = time.monotonic()
        while True:
            record = self.outbox.pending.get(event_id)
            outcome: Outcome | None = None
            if head is not None:  # read even if the event left the backlog meanwhile: it holds a slot
                outcome, head = await self._head_outcome(event_id, head), None
            if record is None:
                return
            if outcome is not None:
                attempt = 1
            else:
                attempt = record.attempts + 1
                if not self._may_write():  # its shard is lost
                    raise NotLeading("deliver", event_id)  # kept in the outbox for the replica that holds it
                async with self.semaphore:
                    self.in_flight.add(event_id)
                    try:
                        outcome = await self._attempt(dict(record.event), attempt)
                    finally:
                        self.in_flight.discard(event_id)
            ok, error, retryable, retry_after = outcome
            self.counts["invocations"] += 1
            if event_id not in self.outbox.pending:
                return  # dead-lettered while it ran: already counted there
            record = replace(record, attempts=attempt)
            self.outbox.pending[event_id] = record
            if ok:
                self.counts["succeeded"] += 1
                await self._settle(record, "Succeeded", attempt, started, "")
                return
            self.counts["failed"] += 1
            if not retryable or attempt >= spec.max_attempts:
                break
            self._remember(record, "Failed", attempt, started, error)
            delay = backoff_delay(attempt, spec.initial_backoff, spec.max_backoff)
            await asyncio.sleep(max(delay, retry_after or 0.0))
        self._note_dead_letter(record, RETRIES_EXHAUSTED, error)
        if self.metrics is not None:
            self.metrics.dead_lettered.labels(reason=RETRIES_EXHAUSTED).inc()
        await self._dead_letter(dict(record.event), error)
        await self._settle(record, "DeadLettered", record.attempts, started, error)

    async def _head_outcome(self, event_id: str, head: Invocation) -> Outcome:
        """The head start's outcome; its `maxConcurrency` slot is given back."""
        try:
            return _function_outcome(await head.result())
        finally:
            self.in_flight.discard(event_id)
            self.semaphore.release()

    async def _attempt(self, event: dict[str, Any], attempt: int) -> Outcome:
        spec = self.spec
        if spec.function_type == "Python":
            return _function_outcome(await self.functions.invoke(
                self.handlers_dir, spec.python_handler, event, timeout=spec.timeout, attempt=attempt,
                function_name=spec.python_handler, namespace=spec.namespace))
        if self.problem and self.problem[0] == "URLNotAllowed":
            return False, self.problem[1], False, None
        async with self.http_slots:
            delivered = await deliver_http(self.http, spec.url, event, timeout=spec.timeout, secret=self.secret,
                                           allowed_cidrs=self.allowed_cidrs)
        return delivered.ok, delivered.error or "", delivered.retryable, delivered.retry_after

    async def _dead_letter(self, event: dict[str, Any], error: str) -> None:
        spec = self.spec
        message = f"event {event['id']} ({event['type']} {event.get('subject')}) dead-lettered: {error}"
        self.events.post(self.body, "DeadLettered", message, warning=True)
        if spec.dead_letter_url:
            await self._post_dead_letter(event)

    async def _post_dead_letter(self, event: dict[str, Any]) -> None:
        async with self.http_slots:
            result = await deliver_http(self.http, self.spec.dead_letter_url, event, timeout=self.spec.timeout,
                                        secret=self.secret, allowed_cidrs=self.allowed_cidrs)
        if not result.ok:
            self.events.post(self.body, "DeadLetterFailed",
                             f"dead-letter POST of {event['id']} failed: {result.error}", warning=True)

    def _post_dead_letters(self) -> None:
        """Events dead-lettered off the backlog go to the dead-letter URL one by one, in the background."""
        if not self.spec.dead_letter_url:
            self.dead_letters.clear()
        elif self._dead_letter_task is None or self._dead_letter_task.done():
            self._dead_letter_task = asyncio.create_task(self._drain_dead_letters(),
                                                         name=f"dead-letter-{self.spec.name}")

    async def _drain_dead_letters(self) -> None:
        while self.dead_letters:
            await self._post_dead_letter(self.dead_letters.popleft())

    def _remember(self, record: PendingRecord, result: str, attempts: int, started: float, error: str) -> None:
        self.last = {"eventId": record.event_id, "type": record.event_type, "instance": record.subject,
                     "result": result, "attempts": attempts, "durationMs": int((time.monotonic() - started) * 1000),
                     "error": error[:1000], "time": now_rfc3339()}
        self.publish()

    async def _settle(self, record: PendingRecord, result: str, attempts: int, started: float, error: str) -> None:
        if result == "DeadLettered":
            self.counts["deadLettered"] += 1
        if self.metrics is not None:
            self.metrics.invocations.labels(result=result).inc()
        self._remember(record, result, attempts, started, error)
        self.outbox.pending.pop(record.event_id, None)
        self.inherited.discard(record.event_id)
        self.outbox.touch()
        self.settled(record, result == "Succeeded")
        self.outbox.flush_soon()

    # ----- status
    def publish(self) -> None:
        meta = self.body["metadata"]
        if self.problem:
            ready = Condition("Ready", False, self.problem[0], self.problem[1])
        else:
            ready = Condition("Ready", True, "HandlerReady", f"{self.spec.function_name} can be invoked")
        status: dict[str, Any] = {
            **self.counts,
            "conditions": merge_conditions((self.body.get("status") or {}).get("conditions"), [ready],
                                           meta.get("generation"), now_rfc3339()),
            "observedGeneration": meta.get("generation"),
        }
        if self.last:
            status["lastInvocation"] = self.last
        if self.last_dead_letter:
            status["lastDeadLetter"] = self.last_dead_letter
        self.status.submit(resource_path("poolkeeper.dev/v1alpha1", "lifecyclehandlers", meta["namespace"],
                                         meta["name"], "status"), status, self.body.get("status"))

    async def close(self) -> None:
        tasks = [*self.workers.values(), *([self._dead_letter_task] if self._dead_letter_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _function_outcome(result: InvocationResult) -> Outcome:
    """A Python function's result as a delivery outcome: every failure may be retried."""
    return result.ok, result.error or "", True, None
