"""CloudEvents 1.0 for pool member transitions, their HTTP binary-mode encoding and HMAC signature.

The event id is derived from the transition, not generated, so every delivery of one transition
(retries, operator restarts, dead-lettering) carries the same id and receivers can de-duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

SPECVERSION = "1.0"
SIGNATURE_HEADER = "Poolkeeper-Signature"
TYPE_PREFIX = "dev.poolkeeper."
EVENT_TYPES: Mapping[str, str] = {
    "up": "dev.poolkeeper.instance.up",
    "draining": "dev.poolkeeper.instance.draining",
    "down": "dev.poolkeeper.instance.down",
    "registered": "dev.poolkeeper.member.registered",
    "deregistered": "dev.poolkeeper.member.deregistered",
}
# Namespace for uuid5 event ids; fixed forever, changing it would change every id.
_ID_NAMESPACE = uuid.UUID("6f1d3c1e-0b7a-5d38-9c43-7f5e2a1b9d04")


def event_id(*, handler_uid: str, pool_uid: str, instance_uid: str, event_type: str, sequence: int) -> str:
    """The deterministic id of one transition as delivered to one handler (a uuid5)."""
    # JSON keeps the parts unambiguous whatever characters they contain.
    name = json.dumps([handler_uid, pool_uid, instance_uid, event_type, sequence], separators=(",", ":"))
    return str(uuid.uuid5(_ID_NAMESPACE, name))


def rfc3339(moment: datetime) -> str:
    """`moment` in UTC as RFC 3339 with a `Z` suffix; naive datetimes are taken to be UTC."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    spec = "microseconds" if utc.microsecond else "seconds"
    return utc.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def subject_of(kind: str, namespace: str | None, name: str) -> str:
    """`Kind/namespace/name`, or `Kind/name` for cluster-scoped objects such as nodes."""
    return f"{kind}/{namespace}/{name}" if namespace and kind != "Node" else f"{kind}/{name}"


def build_event(
    *,
    handler_uid: str,
    pool_uid: str,
    pool_namespace: str,
    pool_name: str,
    instance: Mapping[str, Any],
    event_type: str,
    sequence: int,
    from_state: str,
    to_state: str,
    reason: str,
    time: datetime,
) -> dict[str, Any]:
    """A CloudEvents 1.0 (structured, JSON) dict for one transition of `instance` in a pool.

    `instance` needs kind, name and uid; namespace ("" for nodes), address, port and labels are
    optional; other keys are ignored. `sequence` numbers the transitions of the instance in the
    pool and goes into the id.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"event type must be one of {', '.join(EVENT_TYPES)}, got {event_type!r}")
    missing = [key for key in ("kind", "name", "uid") if not instance.get(key)]
    if missing:
        raise ValueError(f"instance is missing {', '.join(missing)}")
    kind, name = str(instance["kind"]), str(instance["name"])
    namespace = "" if kind == "Node" else str(instance.get("namespace") or "")
    data_instance: dict[str, Any] = {
        "kind": kind,
        "namespace": namespace,
        "name": name,
        "uid": str(instance["uid"]),
        "address": instance.get("address"),
        "port": instance.get("port"),
        "labels": dict(instance.get("labels") or {}),
    }
    return {
        "specversion": SPECVERSION,
        "id": event_id(
            handler_uid=handler_uid,
            pool_uid=pool_uid,
            instance_uid=data_instance["uid"],
            event_type=event_type,
            sequence=sequence,
        ),
        "type": EVENT_TYPES[event_type],
        "source": f"/namespaces/{pool_namespace}/targetpools/{pool_name}",
        "subject": subject_of(kind, namespace, name),
        "time": rfc3339(time),
        "datacontenttype": "application/json",
        "data": {
            "pool": {"namespace": pool_namespace, "name": pool_name, "uid": pool_uid},
            "instance": data_instance,
            "from": from_state,
            "to": to_state,
            "reason": reason,
        },
    }


def short_type(event: Mapping[str, Any]) -> str:
    """`up`, `draining`, ... for a poolkeeper event (the inverse of EVENT_TYPES)."""
    return str(event["type"]).rsplit(".", 1)[-1]


def _header_value(value: Any) -> str:
    """Percent-encode an attribute for an HTTP header as the CloudEvents HTTP binding requires.

    Space, `"`, `%` and everything outside printable ASCII are encoded (UTF-8 bytes as %XX).
    """
    out = []
    for byte in str(value).encode("utf-8"):
        out.append(chr(byte) if 0x21 <= byte <= 0x7E and byte not in (0x22, 0x25) else f"%{byte:02X}")
    return "".join(out)


def encode_data(event: Mapping[str, Any]) -> bytes:
    """The JSON body for `event`'s data: compact, sorted keys, UTF-8 (what gets signed)."""
    return json.dumps(event.get("data"), separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def binary_mode_http(event: Mapping[str, Any]) -> tuple[dict[str, str], bytes]:
    """HTTP headers and body carrying `event` in CloudEvents binary content mode."""
    headers = {
        f"ce-{attribute}": _header_value(event[attribute])
        for attribute in ("specversion", "type", "source", "id", "time", "subject")
        if event.get(attribute) is not None
    }
    headers["content-type"] = str(event.get("datacontenttype") or "application/json")
    return headers, encode_data(event)


def sign(body: bytes, key: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of body>`, the value of the Poolkeeper-Signature header."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(body: bytes, key: bytes, signature: str) -> bool:
    """Whether `signature` (a Poolkeeper-Signature value) is right for `body`; constant time."""
    return hmac.compare_digest(sign(body, key), signature)
