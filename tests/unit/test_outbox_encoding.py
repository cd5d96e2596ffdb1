"""The outbox's JSON is encoded record by record and kept: a write costs what changed, not the backlog."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from poolkeeper.core.cloudevents import build_event
from poolkeeper.core.model import InstanceState, Phase
from poolkeeper.core.naming import member_name
from poolkeeper.core.transitions import Transition
from poolkeeper.lifecycle.outbox_records import (
    AnnouncedEntry,
    OutboxEncoder,
    PendingRecord,
    Scope,
    announced_entry,
    instance_record,
    new_pending,
    parse_outbox,
)

NS, POOL, POOL_UID, HANDLER_UID = "team-a", "web", "pool-uid", "handler-uid"
SCOPE = Scope(handler_uid=HANDLER_UID, namespace=NS, pool=POOL, pool_uid=POOL_UID, kind="Pod")


def transition(index: int, seq: int = 1) -> Transition:
    # a non-ASCII label value and a quote: the text must escape exactly as json.dumps does
    inst = InstanceState("Pod", NS, f"web-{index}", f"pod-uid-{index}", f"192.0.2.{index % 250 + 1}",
                         {"app": "web", "owner": 'Zoë "z"'}, Phase.UP, "pod ready")
    return Transition(inst, member_name(NS, POOL, inst.uid), "up", "none", "up", seq, "pod ready")


def pending(index: int, seq: int = 1) -> PendingRecord:
    t = transition(index, seq)
    event = build_event(handler_uid=HANDLER_UID, pool_uid=POOL_UID, pool_namespace=NS, pool_name=POOL,
                        instance={**instance_record(t.instance), "port": 8080}, event_type="up", sequence=seq,
                        from_state="none", to_state="up", reason="pod ready", time=datetime(2026, 1, 1, tzinfo=UTC))
    return new_pending(event, t, (NS, POOL), blocking=False, order=index)


def outbox(n: int) -> tuple[dict[str, dict[str, AnnouncedEntry]], dict[str, PendingRecord]]:
    announced = {POOL_UID: {f"pod-uid-{i}": announced_entry(transition(i)) for i in range(n)}}
    records = [pending(i) for i in range(n)]
    return announced, {r.event_id: r for r in records}


def full_dumps(announced: dict[str, dict[str, AnnouncedEntry]], records: dict[str, PendingRecord]) -> str:
    """What the outbox held before the encoder: one json.dumps of everything."""
    data: dict[str, Any] = {"announced": {p: {u: e.to_wire() for u, e in es.items()} for p, es in announced.items()},
                            "pending": [r.to_wire() for r in records.values()]}
    return json.dumps(data, separators=(",", ":"))


def test_the_text_is_what_json_dumps_gives_and_loads_back() -> None:
    announced, records = outbox(5)
    text = OutboxEncoder().render(announced, records)
    assert text == full_dumps(announced, records)
    parsed = parse_outbox(text, SCOPE)
    assert parsed.dropped == [] and parsed.pending == records and parsed.announced == announced


def test_an_empty_outbox() -> None:
    assert OutboxEncoder().render({}, {}) == full_dumps({}, {})
    assert OutboxEncoder().render({POOL_UID: {}}, {}) == full_dumps({POOL_UID: {}}, {})


def test_a_write_encodes_only_what_changed_since_the_last() -> None:
    announced, records = outbox(500)
    encoder = OutboxEncoder()
    encoder.render(announced, records)
    assert encoder.encoded == 1000  # 500 announced entries, 500 pending records
    for _ in range(3):
        encoder.render(announced, records)
    assert encoder.encoded == 1000  # unchanged: nothing encoded again
    first = next(iter(records))
    records[first] = replace(records[first], attempts=1)  # attempted: a new record object
    new = pending(500)
    records[new.event_id] = new
    announced[POOL_UID]["pod-uid-500"] = announced_entry(transition(500))
    text = encoder.render(announced, records)
    assert encoder.encoded == 1003
    assert text == full_dumps(announced, records)


def test_what_left_the_outbox_leaves_the_cache() -> None:
    announced, records = outbox(20)
    encoder = OutboxEncoder()
    encoder.render(announced, records)
    for key in list(records)[:15]:
        del records[key]
    del announced[POOL_UID]["pod-uid-0"]
    assert encoder.render(announced, records) == full_dumps(announced, records)
    assert len(encoder._pending) == 5 and len(encoder._announced) == 19
    again = pending(0)  # back with the same id: encoded afresh, not taken from a stale entry
    records[again.event_id] = again
    assert encoder.render(announced, records) == full_dumps(announced, records)


def test_sizes_for_shedding_come_from_the_same_text() -> None:
    announced, records = outbox(3)
    encoder = OutboxEncoder()
    text = encoder.render(announced, records)
    sizes = sum(len(encoder.pending_text(r)) + 1 for r in records.values())
    without = encoder.render(announced, {})
    assert len(text) - len(without) == sizes - 1  # n records, n - 1 commas between them
