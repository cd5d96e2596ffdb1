"""EventRecorder: the first Event is posted at once, repeats are counted in few writes, many
different messages of one reason are combined (client-go's EventCorrelator), and a failed
write starts a new Event instead of being lost for good."""

from __future__ import annotations

import asyncio
from typing import Any

from poolkeeper.kube.api import ApiError
from poolkeeper.kube.events import COMBINED, REPEAT_WINDOW, SIMILAR_LIMIT, EventRecorder


class FakeApi:
    """Keeps the Events as the API server would: POST creates, PATCH merges into one."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.fail_patches = 0

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("POST")
        self.events[body["metadata"]["name"]] = dict(body)
        return body

    async def patch(self, path: str, body: dict[str, Any], content_type: str = "") -> dict[str, Any]:
        self.calls.append("PATCH")
        if self.fail_patches:
            self.fail_patches -= 1
            raise ApiError(404, "NotFound", "the Event expired")
        event = self.events[path.rsplit("/", 1)[1]]
        event.update(body)
        return event


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(name: str = "web", uid: str = "uid-1") -> dict[str, Any]:
    return {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "TargetPool",
            "metadata": {"name": name, "namespace": "shop", "uid": uid, "resourceVersion": "7"}}


def shown(api: FakeApi) -> list[tuple[str, str, int]]:
    """(reason, message, count) of every Event, as `kubectl describe` lists them."""
    return sorted((e["reason"], e["message"], e["count"]) for e in api.events.values())


async def settle(recorder: EventRecorder) -> None:
    for _ in range(5):
        await asyncio.sleep(0)
    await recorder.flush()


async def test_the_first_occurrence_is_posted_at_once_and_repeats_are_counted_in_one_write() -> None:
    api = FakeApi()
    recorder = EventRecorder(api, flush_seconds=60.0)  # type: ignore[arg-type]
    recorder.post(pool(), "Registered", "added to be_web: Pod/shop/a")
    for _ in range(5):
        await asyncio.sleep(0)
    assert api.calls == ["POST"], "posted without waiting for the flush interval"
    for _ in range(20):
        recorder.post(pool(), "Registered", "added to be_web: Pod/shop/a")
    await settle(recorder)
    assert api.calls == ["POST", "PATCH"]
    assert shown(api) == [("Registered", "added to be_web: Pod/shop/a", 21)]


async def test_repeats_are_written_at_most_once_per_flush_interval() -> None:
    api = FakeApi()
    recorder = EventRecorder(api, flush_seconds=0.05)  # type: ignore[arg-type]
    for _ in range(30):
        recorder.post(pool(), "Deregistered", "removed from be_web: Pod/shop/a")
        await asyncio.sleep(0.01)
    await settle(recorder)
    assert shown(api) == [("Deregistered", "removed from be_web: Pod/shop/a", 30)]
    assert 2 <= len(api.calls) <= 10, api.calls  # 0.3 s of repeats: about one write per 0.05 s, not 30


async def test_many_different_messages_of_one_reason_are_combined() -> None:
    api = FakeApi()
    recorder = EventRecorder(api, flush_seconds=0.0)  # type: ignore[arg-type]
    total = SIMILAR_LIMIT + 15
    for i in range(total):
        recorder.post(pool(), "Registered", f"added to be_web: Pod/shop/p-{i}")
        await asyncio.sleep(0)
    await settle(recorder)
    events = shown(api)
    own = [e for e in events if not e[1].startswith(COMBINED)]
    combined = [e for e in events if e[1].startswith(COMBINED)]
    assert len(own) == SIMILAR_LIMIT and all(count == 1 for _, _, count in own)
    assert combined == [("Registered", f"{COMBINED}added to be_web: Pod/shop/p-{total - 1}", total - SIMILAR_LIMIT)]
    # a message already posted on its own is still counted there
    recorder.post(pool(), "Registered", "added to be_web: Pod/shop/p-0")
    await settle(recorder)
    assert ("Registered", "added to be_web: Pod/shop/p-0", 2) in shown(api)


async def test_objects_reasons_and_types_keep_their_own_events() -> None:
    api = FakeApi()
    recorder = EventRecorder(api, flush_seconds=0.0)  # type: ignore[arg-type]
    recorder.post(pool("a", "uid-a"), "Registered", "same words")
    recorder.post(pool("b", "uid-b"), "Registered", "same words")
    recorder.post(pool("a", "uid-a"), "Deregistered", "same words")
    recorder.post(pool("a", "uid-a"), "Registered", "same words", warning=True)
    await settle(recorder)
    assert api.calls == ["POST"] * 4
    assert sorted(e["type"] for e in api.events.values()) == ["Normal", "Normal", "Normal", "Warning"]
    assert {e["involvedObject"]["uid"] for e in api.events.values()} == {"uid-a", "uid-b"}


async def test_after_the_repeat_window_a_new_event_is_posted() -> None:
    api, clock = FakeApi(), Clock()
    recorder = EventRecorder(api, flush_seconds=0.0, clock=clock)  # type: ignore[arg-type]
    recorder.post(pool(), "Registered", "added")
    await settle(recorder)
    clock.now += REPEAT_WINDOW + 1
    recorder.post(pool(), "Registered", "added")
    await settle(recorder)
    assert api.calls == ["POST", "POST"]
    assert shown(api) == [("Registered", "added", 1), ("Registered", "added", 1)]


async def test_a_failed_count_update_starts_a_new_event() -> None:
    api = FakeApi()
    recorder = EventRecorder(api, flush_seconds=0.0)  # type: ignore[arg-type]
    recorder.post(pool(), "Registered", "added")
    await settle(recorder)
    api.fail_patches = 1  # e.g. the Event expired in the API server (its TTL)
    recorder.post(pool(), "Registered", "added")
    await settle(recorder)
    recorder.post(pool(), "Registered", "added")
    await settle(recorder)
    assert api.calls == ["POST", "PATCH", "POST"]
    assert shown(api) == [("Registered", "added", 1), ("Registered", "added", 1)]


async def test_count_updates_of_one_object_share_a_budget() -> None:
    api = FakeApi()
    recorder = EventRecorder(api, flush_seconds=0.0, burst=2, refill=20.0)  # type: ignore[arg-type]
    messages = [f"added to be_web: Pod/shop/p-{i}" for i in range(5)]
    for message in messages:
        recorder.post(pool(), "Registered", message)
    await asyncio.sleep(0.01)
    assert api.calls == ["POST"] * 5, "new Events are not held back by the budget"
    for _ in range(30):  # 0.3 s of every Event repeating
        for message in messages:
            recorder.post(pool(), "Registered", message)
        await asyncio.sleep(0.01)
    patches_meanwhile = api.calls.count("PATCH")
    assert patches_meanwhile <= 2 + 0.35 * 20 + 1, api.calls
    await settle(recorder)
    assert shown(api) == sorted(("Registered", m, 31) for m in messages), "nothing is lost, only written later"
