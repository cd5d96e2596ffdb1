"""Delivering one handler's events: in order per instance, concurrent across instances,
retried with backoff, dead-lettered at the end, counted in status."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from poolkeeper.core.conditions import Condition, merge_conditions
from poolkeeper.core.retry import backoff_delay
from poolkeeper.functions.http import check_url_allowed, deliver_http
from poolkeeper.functions.pool import FunctionPool
from poolkeeper.kube.api import ApiError, KubeApi, resource_path
from poolkeeper.kube.events import EventRecorder, now_rfc3339
from poolkeeper.kube.status import StatusWriter
from poolkeeper.lifecycle.outbox import Outbox
from poolkeeper.lifecycle.spec import HandlerSpec

log = logging.getLogger(__name__)

# Called when a delivery is settled: (record, succeeded) -> None; used to open blocking gates.
Settled = Callable[[dict[str, Any], bool], None]


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
        self.semaphore = asyncio.Semaphore(spec.max_concurrency)
        counts = body.get("status") or {}
        self.counts = {k: int(counts.get(k) or 0) for k in ("invocations", "succeeded", "failed", "deadLettered")}
        self.last: dict[str, Any] | None = counts.get("lastInvocation")
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

    # ----- queueing
    def enqueue(self, event_id: str) -> None:
        record = self.outbox.pending[event_id]
        uid = record["instance_uid"]
        queue = self.queues.setdefault(uid, deque())
        if event_id not in queue:
            queue.append(event_id)
        if uid not in self.workers:
            self.workers[uid] = asyncio.create_task(self._drain(uid), name=f"deliver-{self.spec.name}-{uid[:8]}")

    async def _drain(self, uid: str) -> None:
        """Deliver this instance's events one after the other: the next waits for the previous."""
        try:
            queue = self.queues[uid]
            while queue:
                event_id = queue[0]
                record = self.outbox.pending.get(event_id)
                if record is not None:
                    try:
                        await self._deliver(record)
                    except (TimeoutError, OSError, ApiError) as exc:
                        log.warning("delivery of %s stopped, kept in the outbox: %s", event_id, exc)
                        return
                queue.popleft()
        finally:
            self.workers.pop(uid, None)
            if not self.queues.get(uid):
                self.queues.pop(uid, None)

    async def _deliver(self, record: dict[str, Any]) -> None:
        spec = self.spec
        event = record["event"]
        error = ""
        started = time.monotonic()
        while True:
            attempt = int(record.get("attempts", 0)) + 1
            async with self.semaphore:
                ok, error, retryable, retry_after = await self._attempt(event, attempt)
            record["attempts"] = attempt
            self.counts["invocations"] += 1
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
        await self._dead_letter(event, error)
        await self._settle(record, "DeadLettered", record["attempts"], started, error)

    async def _attempt(self, event: dict[str, Any], attempt: int) -> tuple[bool, str, bool, float | None]:
        spec = self.spec
        if spec.function_type == "Python":
            result = await self.functions.invoke(self.handlers_dir, spec.python_handler, event, timeout=spec.timeout,
                                                 attempt=attempt, function_name=spec.python_handler,
                                                 namespace=spec.namespace)
            return result.ok, result.error or "", True, None
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
            async with self.http_slots:
                result = await deliver_http(self.http, spec.dead_letter_url, event, timeout=spec.timeout,
                                            secret=self.secret, allowed_cidrs=self.allowed_cidrs)
            if not result.ok:
                self.events.post(self.body, "DeadLetterFailed",
                                 f"dead-letter POST of {event['id']} failed: {result.error}", warning=True)

    def _remember(self, record: dict[str, Any], result: str, attempts: int, started: float, error: str) -> None:
        event = record["event"]
        self.last = {"eventId": event["id"], "type": record["event_type"], "instance": event.get("subject", ""),
                     "result": result, "attempts": attempts, "durationMs": int((time.monotonic() - started) * 1000),
                     "error": error[:1000], "time": now_rfc3339()}
        self.publish()

    async def _settle(self, record: dict[str, Any], result: str, attempts: int, started: float, error: str) -> None:
        if result == "DeadLettered":
            self.counts["deadLettered"] += 1
        if self.metrics is not None:
            self.metrics.invocations.labels(result=result).inc()
        self._remember(record, result, attempts, started, error)
        self.outbox.pending.pop(record["event"]["id"], None)
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
        self.status.submit(resource_path("poolkeeper.dev/v1alpha1", "lifecyclehandlers", meta["namespace"],
                                         meta["name"], "status"), status)

    async def close(self) -> None:
        for task in list(self.workers.values()):
            task.cancel()
        await asyncio.gather(*self.workers.values(), return_exceptions=True)

