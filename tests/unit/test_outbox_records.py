"""Outbox validation (pure): what the operator built passes; anything forged, foreign or malformed is dropped."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from poolkeeper.core.cloudevents import build_event
from poolkeeper.core.model import InstanceState, Phase
from poolkeeper.core.naming import member_name
from poolkeeper.core.transitions import Transition
from poolkeeper.lifecycle import outbox_records
from poolkeeper.lifecycle.outbox_records import (
    MAX_BYTES,
    Scope,
    announced_entry,
    instance_record,
    parse_outbox,
    pending_record,
    summary,
)

HANDLER_UID, POOL_UID = "h-uid-1", "p-uid-1"
SCOPE = Scope(handler_uid=HANDLER_UID, namespace="team-a", pool="web", pool_uid=POOL_UID, kind="Pod")


def transition(namespace: str = "team-a", pool: str = "web", kind: str = "Pod", uid: str = "pod-uid-1",
               event_type: str = "up", seq: int = 1) -> Transition:
    inst = InstanceState(kind, "" if kind == "Node" else namespace, "web-0", uid, "192.0.2.1", {"app": "web"},
                         Phase.UP, "ready")
    return Transition(inst, member_name(namespace, pool, uid), event_type, "none", "up", seq, "ready")


def pending(t: Transition | None = None, *, handler_uid: str = HANDLER_UID, pool_uid: str = POOL_UID,
            namespace: str = "team-a", pool: str = "web", blocking: bool = False) -> dict[str, Any]:
    """A record exactly as LifecycleHandlers._record makes it."""
    t = t or transition()
    event = build_event(handler_uid=handler_uid, pool_uid=pool_uid, pool_namespace=namespace, pool_name=pool,
                        instance={**instance_record(t.instance), "port": 8080}, event_type=t.event_type,
                        sequence=t.seq, from_state=t.from_state, to_state=t.to_state, reason=t.reason,
                        time=datetime.now(UTC))
    return pending_record(event, t, (namespace, pool), blocking=blocking, order=1)


def entry(t: Transition) -> dict[str, Any]:
    """An announced entry as the outbox JSON holds it."""
    return announced_entry(t).to_wire()


def outbox(pending_records: list[Any], announced: dict[str, Any] | None = None) -> str:
    t = transition()
    return json.dumps({"announced": announced if announced is not None else
                       {POOL_UID: {t.instance.uid: entry(t)}}, "pending": pending_records})


def test_what_the_operator_writes_is_accepted() -> None:
    good = pending(blocking=True)
    parsed = parse_outbox(outbox([good]), SCOPE)
    assert parsed.dropped == []
    assert {k: r.to_wire() for k, r in parsed.pending.items()} == {good["event"]["id"]: good}  # same JSON back
    assert parsed.announced[POOL_UID]["pod-uid-1"].state == "up"
    assert parsed.announced[POOL_UID]["pod-uid-1"].to_wire() == entry(transition())


def test_node_pools_take_cluster_scoped_nodes() -> None:
    scope = Scope(HANDLER_UID, "team-a", "nodes", POOL_UID, "Node")
    t = transition(pool="nodes", kind="Node")
    parsed = parse_outbox(outbox([pending(t, pool="nodes")], {}), scope)
    assert parsed.dropped == [] and len(parsed.pending) == 1


def test_unknown_pool_uid_still_binds_namespace_and_pool_name() -> None:
    scope = Scope(HANDLER_UID, "team-a", "web")
    assert parse_outbox(outbox([pending()]), scope).dropped == []
    assert parse_outbox(outbox([pending(namespace="team-b")]), scope).dropped


@pytest.mark.parametrize("text", ['{"pending":[{}]}', '{"pending":[[]]}', "[]", '{"pending": {}}', "not json",
                                  '{"announced": []}', "[" * 20_000, '{"pending": [null, 1, "x"]}'])
def test_garbage_never_raises_and_is_dropped(text: str) -> None:
    parsed = parse_outbox(text, SCOPE)
    assert parsed.pending == {} and parsed.dropped
    assert all(not entries for entries in parsed.announced.values())


def mutate(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    record = copy.deepcopy(pending())
    target: Any = record
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return record


@pytest.mark.parametrize(("record", "reason"), [
    (pending(namespace="victim"), "pool"),                                 # another namespace's pool
    (pending(pool="other"), "pool"),                                       # another pool of the namespace
    (pending(pool_uid="someone-elses"), "pool uid"),
    (pending(handler_uid="another-handler"), "event id"),                  # copied from another handler's outbox
    (pending(transition(namespace="victim")), "namespace"),                # an instance of another namespace
    (pending(transition(kind="Node")), "kind"),                            # a Node in a Pod pool
    (mutate(("member",), member_name("victim", "web", "pod-uid-1")), "member"),
    (mutate(("event", "data", "instance", "namespace"), "victim"), "namespace"),
    (mutate(("event", "data", "instance", "name"), "kube-apiserver"), "subject"),
    (mutate(("event", "data", "instance", "address"), 12), "address"),
    (mutate(("event", "data", "instance", "labels"), {"a": 1}), "labels"),
    (mutate(("event", "id"), "chosen-id"), "event id"),
    (mutate(("event", "type"), "dev.poolkeeper.instance.down"), "type"),
    (mutate(("event_type",), "deleted"), "event_type"),
    (mutate(("seq",), "1"), "seq"),
    (mutate(("attempts",), True), "attempts"),
    (mutate(("blocking",), "yes"), "blocking"),
    (mutate(("pool",), "team-a/web"), "pool"),
    (mutate(("event",), "{}"), "event"),
    ({**pending(), "extra": 1}, "fields"),
])
def test_forged_or_malformed_records_are_dropped_with_a_reason(record: dict[str, Any], reason: str) -> None:
    good = pending(transition(uid="pod-uid-2"))
    parsed = parse_outbox(outbox([record, good]), SCOPE)
    assert list(parsed.pending) == [good["event"]["id"]]  # the good one next to it survives
    assert len(parsed.dropped) == 1 and reason in parsed.dropped[0], parsed.dropped


def test_blocking_only_for_up_and_draining() -> None:
    record = pending(transition(event_type="down"))
    record["blocking"] = True
    assert "block" in parse_outbox(outbox([record]), SCOPE).dropped[0]


@pytest.mark.parametrize(("announced", "reason"), [
    ({"other-pool-uid": {"pod-uid-1": entry(transition())}}, "not the handler's pool"),
    ({POOL_UID: {"pod-uid-9": entry(transition())}}, "does not match its key"),
    ({POOL_UID: {"pod-uid-1": {**entry(transition()), "seq": "1"}}}, "wrong type"),
    ({POOL_UID: {"pod-uid-1": entry(transition(namespace="victim"))}}, "namespace"),
    ({POOL_UID: []}, "not an object"),
])
def test_bad_announced_entries_are_dropped(announced: dict[str, Any], reason: str) -> None:
    parsed = parse_outbox(outbox([], announced), SCOPE)
    assert not parsed.announced.get(POOL_UID)
    assert len(parsed.dropped) == 1 and reason in parsed.dropped[0], parsed.dropped


def test_size_and_count_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = json.dumps({"pending": [], "padding": "x" * MAX_BYTES})
    assert "cap" in parse_outbox(huge, SCOPE).dropped[0]
    tiny_objects = '{"pending":[' + ",".join(["{}"] * 60_000) + "]}"  # small on the wire, huge in memory
    assert "objects and lists" in parse_outbox(tiny_objects, SCOPE).dropped[0]
    monkeypatch.setattr(outbox_records, "MAX_PENDING", 4)
    monkeypatch.setattr(outbox_records, "MAX_ANNOUNCED", 2)
    many = [pending(transition(uid=f"u-{i}")) for i in range(7)]
    announced = {POOL_UID: {f"u-{i}": entry(transition(uid=f"u-{i}")) for i in range(3)}}
    parsed = parse_outbox(outbox(many, announced), SCOPE)
    assert len(parsed.pending) == 4 and len(parsed.announced[POOL_UID]) == 2
    assert parsed.dropped == ["announced 'u-2': over the record cap", "3 pending records over the cap of 4: dropped"]


def test_summary_is_one_bounded_line() -> None:
    line = summary([f"pending record {i}: bad" for i in range(50)])
    assert line.startswith("dropped 50 outbox record(s)") and "(and 47 more)" in line and len(line) <= 1000
