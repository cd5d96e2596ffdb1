"""The handler backlog and where handlers hear transitions, without a cluster.

LifecycleHandlers runs for real (outbox, runtimes, gates, the supersede rule); the API server,
status writer, Event recorder and work queue are small fakes, and a receiver that never answers
is a delivery attempt that never returns.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from poolkeeper.controller.store import Store
from poolkeeper.core.addresses import DEFAULT_POLICY
from poolkeeper.core.model import InstanceState, Phase
from poolkeeper.core.naming import member_name
from poolkeeper.core.planner import desired_members
from poolkeeper.core.poolspec import PoolSpec, parse_pool
from poolkeeper.core.transitions import Transition, supersede
from poolkeeper.kube.api import ApiError
from poolkeeper.kube.status import StatusBody
from poolkeeper.lifecycle import LifecycleHandlers, outbox
from poolkeeper.lifecycle.delivery import HandlerRuntime
from poolkeeper.lifecycle.errors import OutboxError

NS = "team-a"


class FakeApi:
    """Keeps what was written; `fail` makes writes fail like an API server refusing them."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.fail = False

    async def get_or_none(self, path: str) -> dict[str, Any] | None:
        return self.objects.get(path)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            raise ApiError(500, "InternalError", "etcdserver: request is too large")
        if path not in self.objects:
            raise ApiError(404, "NotFound", "not found")
        self.objects[path] = body
        return body

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.objects[f"{path}/{body['metadata']['name']}"] = body
        return body


class FakeStatus:
    def __init__(self) -> None:
        self.last: dict[str, dict[str, Any]] = {}

    def submit(self, path: str, status: StatusBody, observed: Any = None) -> None:
        self.last[path] = status() if callable(status) else status


class FakeEvents:
    def __init__(self) -> None:
        self.posted: list[tuple[str, str]] = []

    def post(self, obj: Any, reason: str, message: str, *, warning: bool = False) -> None:
        self.posted.append((reason, message))


class FakeQueue:
    def __init__(self) -> None:
        self.added: list[Any] = []

    def add(self, key: Any) -> None:
        self.added.append(key)


async def never_answers(self: HandlerRuntime, event: dict[str, Any], attempt: int) -> tuple[bool, str, bool, None]:
    await asyncio.Future()  # never done: a receiver that accepts and never answers
    raise AssertionError("unreachable")


POOL_BODY = {"metadata": {"namespace": NS, "name": "web", "uid": "pool-uid"},
             "spec": {"source": {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}}, "port": 8080,
                      "backend": {"type": "EndpointSlice", "endpointSlice": {"serviceName": "web"}}}}
SPEC: PoolSpec = parse_pool(POOL_BODY)


def handler_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": NS, "name": name, "uid": f"uid-{name}", "generation": 1},
            "spec": {"poolRef": {"name": "web"}, "events": spec.pop("events", ["up", "down", "registered"]),
                     "function": {"type": "HTTP", "http": {"url": "http://127.0.0.1:9/hook"}},
                     "timeoutSeconds": 1, **spec}}


@pytest.fixture()
async def lifecycle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[LifecycleHandlers]:
    monkeypatch.setattr(HandlerRuntime, "_attempt", never_answers)
    store = Store()
    store.pools[SPEC.key] = POOL_BODY
    lh = LifecycleHandlers(store, FakeApi(), FakeStatus(), FakeEvents(), FakeQueue(),  # type: ignore[arg-type]
                           handlers_dir=tmp_path, allowed_cidrs=None, workers=1, outbox_namespace="poolkeeper-system")
    lh._started = True  # no worker processes: these handlers are HTTP ones
    yield lh
    for runtime in list(lh.runtimes.values()):
        await runtime.close()
    await lh.http.close()


def pod(index: int, ready: bool = True, address: str | None = None) -> InstanceState:
    return InstanceState("Pod", NS, f"web-{index}", f"pod-uid-{index}", address or f"192.0.2.{index + 1}",
                         {"app": "web"}, Phase.UP if ready else Phase.DOWN, "pod ready" if ready else "pod not ready")


def change(lh: LifecycleHandlers, inst: InstanceState) -> None:
    """What the informer callback does: the store first, then the event path."""
    lh.store.put_instance(inst)
    lh.instance_changed(SPEC, inst, DEFAULT_POLICY)


def desired(lh: LifecycleHandlers) -> dict[str, Any]:
    members, _ = desired_members(namespace=NS, pool="web", sources=SPEC.sources, port=SPEC.port,
                                 instances=lh.store.instances_of("Pod", NS))
    return members


def outbox_json(lh: LifecycleHandlers, runtime: HandlerRuntime) -> dict[str, Any]:
    body = lh.api.objects[runtime.outbox.path]  # type: ignore[attr-defined]
    return dict(json.loads(body["data"][outbox.DATA_KEY]))


async def add_handler(lh: LifecycleHandlers, name: str, **spec: Any) -> HandlerRuntime:
    body = handler_body(name, **spec)
    await lh.handler_changed((NS, name), body, deleted=False)
    await lh.prepare(SPEC, desired(lh))  # the reconcile that follows a new handler
    return lh.runtimes[(NS, name)]


# ---------------------------------------------------------------- the rule (pure)
def state(event_type: str, from_state: str, seq: int) -> Transition:
    return Transition(pod(0), member_name(NS, "web", "pod-uid-0"), event_type, from_state, event_type, seq, "r")


@pytest.mark.parametrize(("older", "older_from", "new", "expected"), [
    ("down", "up", state("up", "down", 3), None),                             # up -> down -> up: nothing changed
    ("up", "down", state("down", "up", 3), None),                             # down -> up -> down
    ("up", "none", state("down", "up", 2), None),                             # came and went, never heard of
    ("draining", "up", state("down", "draining", 3), ("up", "down")),         # up -> draining -> down: up -> down
    ("registered", "up", replace(state("up", "up", 3), event_type="deregistered"), None),  # cancel out
])
def test_a_newer_event_supersedes_an_undelivered_one(older: str, older_from: str, new: Transition,
                                                     expected: tuple[str, str] | None) -> None:
    goes, instead = supersede(older, older_from, new)
    assert goes
    assert (instead.from_state, instead.to_state) == expected if instead else expected is None
    if instead is not None:
        assert instead.seq == new.seq  # the id (from the sequence) is the one the newer event was made with


def test_states_and_members_do_not_supersede_each_other() -> None:
    assert supersede("registered", "up", state("down", "up", 3)) == (False, state("down", "up", 3))


# ---------------------------------------------------------------- with the runtime
async def test_a_receiver_that_never_answers_costs_its_own_events_never_the_pool(
        lifecycle: LifecycleHandlers) -> None:
    lh = lifecycle
    runtime = await add_handler(lh, "stuck", maxPendingEvents=6)
    for i in range(8):
        change(lh, pod(i))
    await asyncio.sleep(0.05)  # the first event of each instance is now being attempted
    for _ in range(20):  # every instance flaps behind its stuck first event
        for i in range(8):
            change(lh, pod(i, ready=False))
            change(lh, pod(i, ready=True))
    assert await lh.prepare(SPEC, desired(lh)) is False  # never raises, never holds
    assert len(runtime.outbox.pending) <= 6
    assert runtime.counts["deadLettered"] >= 2  # 8 undelivered `up`s over a bound of 6
    assert runtime.last_dead_letter is not None and runtime.last_dead_letter["reason"] == "BacklogFull"
    assert any(reason == "BacklogFull" for reason, _ in lh.events.posted)  # type: ignore[attr-defined]
    status = lh.status.last[next(iter(lh.status.last))]  # type: ignore[attr-defined]
    assert status["deadLettered"] == runtime.counts["deadLettered"] and status["lastDeadLetter"]["reason"]
    await asyncio.sleep(0.3)  # the background write
    assert len(outbox_json(lh, runtime)["pending"]) <= 6


async def test_flaps_behind_a_stuck_event_collapse_to_what_changed(lifecycle: LifecycleHandlers) -> None:
    lh = lifecycle
    runtime = await add_handler(lh, "flaps", events=["up", "down"])
    change(lh, pod(0))
    await asyncio.sleep(0.05)
    head = next(iter(runtime.outbox.pending.values()))
    assert head.event_id in runtime.in_flight
    for _ in range(50):
        change(lh, pod(0, ready=False))
        change(lh, pod(0, ready=True))
    assert list(runtime.outbox.pending) == [head.event_id]  # up, then 50 x (down, up): nothing to tell
    change(lh, pod(0, ready=False))
    records = list(runtime.outbox.pending.values())
    assert [r.event_type for r in records] == ["up", "down"] and records[1].from_state == "up"
    assert records[1].seq == 102  # sequence numbers only grow: the id was never used before
    assert runtime.counts["deadLettered"] == 0


async def test_the_outbox_never_outgrows_a_configmap(lifecycle: LifecycleHandlers,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lh = lifecycle
    monkeypatch.setattr(outbox, "BYTE_BUDGET", 12_000)
    runtime = await add_handler(lh, "big", events=["up"])
    for i in range(40):
        change(lh, pod(i))
    await lh.prepare(SPEC, desired(lh))
    await runtime.outbox.persist()
    text = lh.api.objects[runtime.outbox.path]["data"][outbox.DATA_KEY]  # type: ignore[attr-defined]
    assert len(text) <= 12_000
    assert runtime.counts["deadLettered"] > 0 and len(runtime.outbox.pending) < 40


async def test_only_a_blocking_handlers_outbox_holds_the_backend(lifecycle: LifecycleHandlers) -> None:
    lh = lifecycle
    await add_handler(lh, "audit")
    change(lh, pod(0))
    lh.api.fail = True  # type: ignore[attr-defined]
    await lh.prepare(SPEC, desired(lh))  # a non-blocking outbox that can't be written: the backend goes on
    await lh.handler_changed((NS, "gate"), handler_body("gate", blocking=True, events=["up"]), deleted=False)
    change(lh, pod(1))
    with pytest.raises(OutboxError):  # a blocking hook's record must be written before the backend acts
        await lh.prepare(SPEC, desired(lh))


async def test_the_reconcile_starts_nothing_the_event_path_told(lifecycle: LifecycleHandlers) -> None:
    lh = lifecycle
    runtime = await add_handler(lh, "once", events=["up", "down"])
    change(lh, pod(0))
    change(lh, pod(1))
    before = dict(runtime.outbox.pending)
    assert len(before) == 2  # told on the event path, before any reconcile
    await lh.prepare(SPEC, desired(lh))
    assert runtime.outbox.pending == before


async def test_the_reconcile_tells_what_no_instance_event_reported(lifecycle: LifecycleHandlers) -> None:
    lh = lifecycle
    runtime = await add_handler(lh, "resync", events=["up", "down"])
    change(lh, pod(0))
    await asyncio.sleep(0.05)  # `up` is being delivered
    lh.store.drop_instance("Pod", NS, "web-0")  # gone while no informer callback reached the handlers
    await lh.prepare(SPEC, desired(lh))
    types = [r.event_type for r in runtime.outbox.pending.values()]
    assert types == ["up", "down"]


async def test_events_from_an_earlier_operator_are_never_superseded(lifecycle: LifecycleHandlers) -> None:
    """It may have sent `up` before it died, its success unrecorded: `down` must follow, not cancel it."""
    lh = lifecycle
    runtime = await add_handler(lh, "before", events=["up", "down"])
    change(lh, pod(0))
    await runtime.outbox.persist()
    restarted = LifecycleHandlers(lh.store, lh.api, lh.status, lh.events, lh.queue, handlers_dir=lh.handlers_dir,
                                  allowed_cidrs=None, workers=1, outbox_namespace="poolkeeper-system")
    restarted._started = True
    try:
        await restarted.handler_changed((NS, "before"), handler_body("before", events=["up", "down"]), deleted=False)
        again = restarted.runtimes[(NS, "before")]
        await again.close()  # nothing delivers: the loaded `up` waits, unattempted
        lh.store.drop_instance("Pod", NS, "web-0")  # gone while no operator ran
        await restarted.prepare(SPEC, desired(restarted))
        assert [(r.event_type, r.from_state) for r in again.outbox.pending.values()] == [("up", "none"),
                                                                                         ("down", "up")]
    finally:
        await restarted.http.close()


async def test_an_event_is_sent_only_once_the_outbox_owing_it_is_written(lifecycle: LifecycleHandlers) -> None:
    """Sent before, it could be lost with the `down` that must follow, were the operator to die first."""
    lh = lifecycle
    runtime = await add_handler(lh, "durable", events=["up", "down"])
    lh.api.fail = True  # type: ignore[attr-defined]
    change(lh, pod(0))
    await asyncio.sleep(0.2)
    assert not runtime.in_flight
    lh.api.fail = False  # type: ignore[attr-defined]
    for _ in range(40):
        await asyncio.sleep(0.05)
        if runtime.in_flight:
            break
    assert runtime.in_flight and outbox_json(lh, runtime)["pending"]


async def test_a_draining_waits_for_the_outbox_and_a_later_down_does_not(lifecycle: LifecycleHandlers) -> None:
    """Sent before it is written, a `draining` followed by a crash and the pod's deletion would be
    followed by a `down` derived from the written `up`. A `down` (or `up`) after the first event
    goes at once: the restart re-derives it from the written state, under the same id."""
    lh = lifecycle
    runtime = await add_handler(lh, "drains", events=["up", "draining", "down"])
    change(lh, pod(0))
    change(lh, pod(1))
    for _ in range(40):  # the first events: written, then sent
        await asyncio.sleep(0.05)
        if len(runtime.in_flight) == 2:
            break
    assert len(runtime.in_flight) == 2
    runtime.outbox.pending.clear()  # both delivered (the receiver answered)
    runtime.in_flight.clear()
    for task in list(runtime.workers.values()):
        task.cancel()
    await asyncio.sleep(0)
    lh.api.fail = True  # type: ignore[attr-defined]
    change(lh, replace(pod(0), phase=Phase.DRAINING, reason="pod terminating"))
    change(lh, pod(1, ready=False))
    await asyncio.sleep(0.3)
    sent = {runtime.outbox.pending[event_id].event_type for event_id in runtime.in_flight}
    assert sent == {"down"}, "the down went at once, the draining waits for its write"
    lh.api.fail = False  # type: ignore[attr-defined]
    for _ in range(40):
        await asyncio.sleep(0.05)
        if len(runtime.in_flight) == 2:
            break
    assert {runtime.outbox.pending[e].event_type for e in runtime.in_flight} == {"down", "draining"}
    assert any(record["event_type"] == "draining" for record in outbox_json(lh, runtime)["pending"])


async def test_a_reconcile_writes_an_unwritten_draining_before_the_backend_acts(lifecycle: LifecycleHandlers) -> None:
    """Otherwise the drained server could go, the pod be deleted and the operator die before the
    write: the restart, knowing only `up`, would send `down` and the `draining` would be lost."""
    lh = lifecycle
    runtime = await add_handler(lh, "drains", events=["up", "draining", "down"])
    change(lh, pod(0))
    await runtime.outbox.persist()
    assert not runtime.outbox.dirty
    change(lh, replace(pod(0), phase=Phase.DRAINING, reason="pod terminating"))
    assert runtime.outbox.dirty
    await lh.prepare(SPEC, desired(lh))  # the reconcile that would take the server out
    assert not runtime.outbox.dirty
    assert [r["event"]["type"].rsplit(".", 1)[-1] for r in outbox_json(lh, runtime)["pending"]][-1:] == ["draining"]
    change(lh, pod(1))  # an `up` elsewhere: the next reconcile does not wait for its write
    writes: list[str] = []
    persist = runtime.outbox.persist

    async def counted() -> None:
        writes.append("write")
        await persist()

    runtime.outbox.persist = counted  # type: ignore[method-assign]
    await lh.prepare(SPEC, desired(lh))
    assert writes == [] and runtime.outbox.dirty
