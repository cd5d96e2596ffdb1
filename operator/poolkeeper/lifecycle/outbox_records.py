"""What an outbox may hold, checked before anything is acted on: pure, no I/O.

An outbox steers deliveries (whom to call about which instance) and blocking gates (which
member is held out of rotation). It lives where tenants cannot write, but it is still checked
record by record against the handler it belongs to: a record that is malformed, or that names
another pool, namespace or handler, is dropped with a reason instead of acted on or raised.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from poolkeeper.core.cloudevents import EVENT_TYPES, SPECVERSION, event_id, subject_of
from poolkeeper.core.model import InstanceState
from poolkeeper.core.naming import member_name
from poolkeeper.core.transitions import DOWN, DRAINING, NONE, UP, Announced, Transition

MAX_BYTES = 1024 * 1024  # what a ConfigMap can hold; anything bigger was not written by the API server
# Counted before parsing: a megabyte of `{}` costs tens of MB as Python objects. A real record is
# at most 7 objects and lists, so this is far above anything MAX_PENDING + MAX_ANNOUNCED allow.
MAX_CONTAINERS = 50_000
MAX_PENDING = 2_000  # undelivered events; a healthy outbox has a handful
MAX_ANNOUNCED = 5_000  # instances the handler was told about (about 250 bytes each)
MAX_NAME = 253
KINDS = frozenset({"Pod", "Node", "Instance", "EC2"})
STATES = frozenset({NONE, UP, DRAINING, DOWN})
PENDING_KEYS = frozenset({"event", "event_type", "instance_uid", "member", "pool", "attempts", "order", "blocking",
                          "seq"})


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose outbox this is: records must belong to this handler, its namespace and its pool."""

    handler_uid: str
    namespace: str
    pool: str
    pool_uid: str | None = None  # None while the pool is not known (yet)
    kind: str | None = None  # the pool's source kind, when known (None too for a pool of several sources)
    cluster_id: str = ""  # the operator's --cluster-id, part of every member name


@dataclass(frozen=True, slots=True)
class AnnouncedEntry:
    """What a handler was last told about one instance: its state, sequence number, member and record.

    `instance` is the instance as the event described it (kind, namespace, name, uid, address,
    labels): what a `down` event says about an instance that is already gone.
    """

    state: str
    seq: int
    member: str
    instance: Mapping[str, Any]

    @property
    def announced(self) -> Announced:
        return Announced(self.state, self.seq)

    def to_wire(self) -> dict[str, Any]:
        return {"state": self.state, "seq": self.seq, "member": self.member, "instance": dict(self.instance)}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> AnnouncedEntry:
        """From a dict that check_announced accepted."""
        return cls(raw["state"], raw["seq"], raw.get("member", ""), dict(raw["instance"]))


@dataclass(frozen=True, slots=True)
class PendingRecord:
    """A delivery still owed: the CloudEvent (as it will be sent, id included) and how to route it.

    The wire form (to_wire) is the JSON object older operators wrote, so their outboxes load.
    """

    event: Mapping[str, Any]
    event_type: str
    instance_uid: str
    member: str
    pool: tuple[str, str]
    attempts: int
    order: int
    blocking: bool
    seq: int

    @property
    def event_id(self) -> str:
        return str(self.event["id"])

    @property
    def subject(self) -> str:
        return str(self.event.get("subject", ""))

    @property
    def from_state(self) -> str:
        return str(self.event["data"]["from"])

    def to_wire(self) -> dict[str, Any]:
        return {"event": self.event, "event_type": self.event_type, "instance_uid": self.instance_uid,
                "member": self.member, "pool": list(self.pool), "attempts": self.attempts, "order": self.order,
                "blocking": self.blocking, "seq": self.seq}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> PendingRecord:
        """From a dict that check_pending accepted."""
        pool = raw["pool"]
        return cls(raw["event"], raw["event_type"], raw["instance_uid"], raw["member"], (pool[0], pool[1]),
                   raw["attempts"], raw["order"], raw["blocking"], raw["seq"])


@dataclass(slots=True)
class Parsed:
    """The records that passed, and one line per record (or whole outbox) dropped."""

    announced: dict[str, dict[str, AnnouncedEntry]] = field(default_factory=dict)
    pending: dict[str, PendingRecord] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class OutboxEncoder:
    """The outbox's JSON text, each record encoded once and kept until it changes.

    A write re-encodes only the records that changed since the last one (records are frozen:
    a change is a new object) and joins the rest, so writing a full outbox (up to 900 KiB) costs
    one join instead of a json.dumps of everything on the event loop (about 60 ms for 1,000
    pending events on the 2-core dev machine), every time any event is recorded or settled.
    The text is exactly what json.dumps gives for {"announced": ..., "pending": [...]}.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[PendingRecord, str]] = {}
        self._announced: dict[tuple[str, str], tuple[AnnouncedEntry, str]] = {}
        self.encoded = 0  # records encoded rather than taken from the cache (for tests)

    def pending_text(self, record: PendingRecord) -> str:
        """The JSON of one pending record (its share of the outbox, less the comma)."""
        cached = self._pending.get(record.event_id)
        if cached is not None and cached[0] is record:
            return cached[1]
        text = _dumps(record.to_wire())
        self.encoded += 1
        self._pending[record.event_id] = (record, text)
        return text

    def _announced_text(self, key: tuple[str, str], entry: AnnouncedEntry) -> str:
        """`"instance uid":{entry}`: one announced entry with its key."""
        cached = self._announced.get(key)
        if cached is not None and cached[0] is entry:
            return cached[1]
        text = f"{_dumps(key[1])}:{_dumps(entry.to_wire())}"
        self.encoded += 1
        self._announced[key] = (entry, text)
        return text

    def render(self, announced: Mapping[str, Mapping[str, AnnouncedEntry]],
               pending: Mapping[str, PendingRecord]) -> str:
        """The outbox JSON; afterwards the cache holds only what this text holds."""
        pools = []
        for pool_uid, entries in announced.items():
            parts = ",".join([self._announced_text((pool_uid, uid), e) for uid, e in entries.items()])
            pools.append(f"{_dumps(pool_uid)}:{{{parts}}}")
        records = [self.pending_text(r) for r in pending.values()]
        if len(self._pending) > len(pending):
            self._pending = {key: self._pending[key] for key in pending}
        if len(self._announced) > sum(len(entries) for entries in announced.values()):
            self._announced = {(p, uid): self._announced[(p, uid)] for p, entries in announced.items()
                               for uid in entries}
        return f'{{"announced":{{{",".join(pools)}}},"pending":[{",".join(records)}]}}'


def instance_record(inst: InstanceState) -> dict[str, Any]:
    return {"kind": inst.kind, "namespace": inst.namespace, "name": inst.name, "uid": inst.uid,
            "address": inst.address, "labels": dict(inst.labels)}


def announced_entry(t: Transition) -> AnnouncedEntry:
    """What the handler was told about the instance of `t`, as the outbox keeps it."""
    return AnnouncedEntry(t.to_state, t.seq, t.member, instance_record(t.instance))


def new_pending(event: Mapping[str, Any], t: Transition, pool: tuple[str, str], *, blocking: bool,
                order: int) -> PendingRecord:
    """A delivery still owed for transition `t`; only `up` and `draining` hooks can block."""
    return PendingRecord(event, t.event_type, t.instance.uid, t.member, pool, 0, order,
                         blocking and t.event_type in (UP, DRAINING), t.seq)


def pending_record(event: dict[str, Any], t: Transition, pool: tuple[str, str], *, blocking: bool,
                   order: int) -> dict[str, Any]:
    """The wire form of new_pending (exactly the fields check_pending accepts)."""
    return new_pending(event, t, pool, blocking=blocking, order=order).to_wire()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short_str(value: Any, limit: int = MAX_NAME) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def check_instance(record: Any, scope: Scope) -> str | None:
    """Why an instance record is unacceptable for `scope`, or None."""
    if not isinstance(record, dict):
        return "instance is not an object"
    kind, namespace = record.get("kind"), record.get("namespace")
    if kind not in KINDS or (scope.kind is not None and kind != scope.kind):
        return f"instance kind {kind!r} is not the pool's"
    if not _short_str(record.get("name")) or not _short_str(record.get("uid"), 128):
        return "instance name or uid is missing or not a string"
    expected_namespace = "" if kind == "Node" else scope.namespace
    if (namespace or "") != expected_namespace:
        return f"instance namespace {namespace!r} is not the handler's namespace"
    address = record.get("address")
    if address is not None and not _short_str(address, 256):
        return "instance address is not a string"
    labels = record.get("labels")
    if labels is not None and not (isinstance(labels, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
        return "instance labels are not a map of strings"
    port = record.get("port")
    if port is not None and not _is_int(port):
        return "instance port is not an integer"
    return None


def _check_member(member: Any, scope: Scope, instance_uid: str) -> str | None:
    """A member name is derived from pool and instance: one naming another pool's server is refused."""
    if not isinstance(member, str):
        return "member is not a string"
    own = member_name(scope.namespace, scope.pool, instance_uid, cluster_id=scope.cluster_id)
    if member and not member.startswith(own):
        return f"member {member!r} is not this pool's server for the instance"
    return None


def check_announced(instance_uid: str, entry: Any, scope: Scope) -> str | None:
    """Why one announced entry (what the handler was last told about an instance) is unacceptable."""
    if not isinstance(entry, dict):
        return "entry is not an object"
    if entry.get("state") not in STATES or not _is_int(entry.get("seq")) or entry["seq"] < 0:
        return "state or seq has the wrong type"
    problem = check_instance(entry.get("instance"), scope)
    if problem:
        return problem
    if entry["instance"]["uid"] != instance_uid:
        return "instance uid does not match its key"
    return _check_member(entry.get("member"), scope, instance_uid)


def check_pending(record: Any, scope: Scope) -> str | None:
    """Why one pending delivery is unacceptable: every field typed, and bound to this handler and pool."""
    if not isinstance(record, dict):
        return "record is not an object"
    if set(record) != PENDING_KEYS:
        return "record has missing or unknown fields"
    event_type, instance_uid, seq = record["event_type"], record["instance_uid"], record["seq"]
    if event_type not in EVENT_TYPES or not _short_str(instance_uid, 128) or not _is_int(seq) or seq < 1:
        return "event_type, instance_uid or seq has the wrong type"
    if not (_is_int(record["attempts"]) and record["attempts"] >= 0 and _is_int(record["order"])
            and isinstance(record["blocking"], bool)):
        return "attempts, order or blocking has the wrong type"
    if record["blocking"] and event_type not in (UP, DRAINING):
        return "only up and draining hooks can block"
    if record["pool"] != [scope.namespace, scope.pool]:
        return f"pool {record['pool']!r} is not the handler's pool"
    problem = _check_event(record["event"], event_type, instance_uid, seq, scope)
    return problem or _check_member(record["member"], scope, instance_uid)


def _check_event(event: Any, event_type: str, instance_uid: str, seq: int, scope: Scope) -> str | None:
    """The CloudEvent must be the one the operator would build for this record."""
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        return "event is not an object with data"
    data = event["data"]
    pool = data.get("pool")
    if not isinstance(pool, dict) or pool.get("namespace") != scope.namespace or pool.get("name") != scope.pool:
        return "event names another pool"
    pool_uid = pool.get("uid")
    if not _short_str(pool_uid, 128) or (scope.pool_uid is not None and pool_uid != scope.pool_uid):
        return f"event pool uid {pool_uid!r} is not the pool's"
    instance = data.get("instance")
    problem = check_instance(instance, scope)
    if problem:
        return f"event {problem}"
    if instance["uid"] != instance_uid:
        return "event instance uid does not match the record"
    if event.get("id") != event_id(handler_uid=scope.handler_uid, pool_uid=str(pool_uid), instance_uid=instance_uid,
                                   event_type=event_type, sequence=seq):
        return "event id was not made for this handler, pool and instance"
    expected = {"specversion": SPECVERSION, "type": EVENT_TYPES[event_type],
                "source": f"/namespaces/{scope.namespace}/targetpools/{scope.pool}",
                "subject": subject_of(instance["kind"], instance.get("namespace"), instance["name"])}
    if any(event.get(k) != v for k, v in expected.items()):
        return "event type, source or subject does not match the record"
    if not all(isinstance(event.get(k), str) for k in ("time", "datacontenttype")) or \
            not all(isinstance(data.get(k), str) for k in ("from", "to", "reason")):
        return "event time or data fields have the wrong type"
    return None


def parse_outbox(text: str | None, scope: Scope) -> Parsed:
    """The acceptable records of an outbox's JSON text; never raises on bad input."""
    out = Parsed()
    if not text:
        return out
    if len(text) > MAX_BYTES:
        out.dropped.append(f"the outbox is {len(text)} bytes, over the {MAX_BYTES} byte cap: all dropped")
        return out
    containers = text.count("{") + text.count("[")
    if containers > MAX_CONTAINERS:
        out.dropped.append(f"the outbox holds about {containers} objects and lists, over the cap of "
                           f"{MAX_CONTAINERS}: all dropped")
        return out
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        out.dropped.append(f"the outbox is not valid JSON ({type(exc).__name__}): all dropped")
        return out
    if not isinstance(data, dict):
        out.dropped.append("the outbox is not a JSON object: all dropped")
        return out
    _take_announced(data.get("announced"), scope, out)
    _take_pending(data.get("pending"), scope, out)
    return out


def _take_announced(raw: Any, scope: Scope, out: Parsed) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        out.dropped.append("announced is not an object: dropped")
        return
    count = 0
    for pool_uid, entries in raw.items():
        if scope.pool_uid is not None and pool_uid != scope.pool_uid:
            out.dropped.append(f"announced entries for pool uid {pool_uid!r}, not the handler's pool: dropped")
            continue
        if not isinstance(entries, dict):
            out.dropped.append(f"announced[{pool_uid!r}] is not an object: dropped")
            continue
        kept: dict[str, AnnouncedEntry] = {}
        for instance_uid, entry in entries.items():
            count += 1
            problem = "over the record cap" if count > MAX_ANNOUNCED else check_announced(instance_uid, entry, scope)
            if problem:
                out.dropped.append(f"announced {instance_uid!r}: {problem}")
            else:
                kept[instance_uid] = AnnouncedEntry.from_wire(entry)
        out.announced[pool_uid] = kept


def _take_pending(raw: Any, scope: Scope, out: Parsed) -> None:
    if raw is None:
        return
    if not isinstance(raw, list):
        out.dropped.append("pending is not a list: dropped")
        return
    if len(raw) > MAX_PENDING:
        out.dropped.append(f"{len(raw) - MAX_PENDING} pending records over the cap of {MAX_PENDING}: dropped")
    for index, record in enumerate(raw[:MAX_PENDING]):
        problem = check_pending(record, scope)
        if problem:
            out.dropped.append(f"pending record {index}: {problem}")
        else:
            out.pending[record["event"]["id"]] = PendingRecord.from_wire(record)


def summary(dropped: list[str], limit: int = 3) -> str:
    """One Event-sized line for what was dropped."""
    shown = "; ".join(dropped[:limit])
    more = f" (and {len(dropped) - limit} more)" if len(dropped) > limit else ""
    return f"dropped {len(dropped)} outbox record(s) that failed validation: {shown}{more}"[:1000]

