"""CloudEvents built for transitions, their binary-mode HTTP form and signatures (pure)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolkeeper.core.cloudevents import (
    EVENT_TYPES,
    binary_mode_http,
    build_event,
    encode_data,
    event_id,
    rfc3339,
    short_type,
    sign,
    subject_of,
    verify,
)

TIME = datetime(2024, 5, 1, 12, 30, 45, tzinfo=UTC)
POD = {
    "kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "pod-uid",
    "address": "10.1.2.3", "port": 8080, "labels": {"app": "web"},
}
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?Z$")


def make(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "handler_uid": "handler-uid", "pool_uid": "pool-uid", "pool_namespace": "shop", "pool_name": "web",
        "instance": POD, "event_type": "up", "sequence": 3, "from_state": "down", "to_state": "up",
        "reason": "Ready", "time": TIME,
    }
    args.update(overrides)
    return build_event(**args)


def test_full_event_for_a_pod() -> None:
    event = make()
    assert event == {
        "specversion": "1.0",
        "id": event_id(handler_uid="handler-uid", pool_uid="pool-uid", instance_uid="pod-uid", event_type="up",
                       sequence=3),
        "type": "dev.poolkeeper.instance.up",
        "source": "/namespaces/shop/targetpools/web",
        "subject": "Pod/shop/web-1",
        "time": "2024-05-01T12:30:45Z",
        "datacontenttype": "application/json",
        "data": {
            "pool": {"namespace": "shop", "name": "web", "uid": "pool-uid"},
            "instance": dict(POD),
            "from": "down",
            "to": "up",
            "reason": "Ready",
        },
    }
    assert uuid.UUID(event["id"]).version == 5
    json.dumps(event)  # plain JSON all the way down


@pytest.mark.parametrize(("short", "full"), sorted(EVENT_TYPES.items()))
def test_types(short: str, full: str) -> None:
    event = make(event_type=short)
    assert event["type"] == full
    assert short_type(event) == short
    family = "instance" if short in ("up", "draining", "down") else "member"
    assert full == f"dev.poolkeeper.{family}.{short}"


def test_node_has_no_namespace_in_subject_or_data() -> None:
    node = {"kind": "Node", "namespace": "ignored", "name": "worker-1", "uid": "n1", "address": "10.0.0.9"}
    event = make(instance=node)
    assert event["subject"] == "Node/worker-1"
    assert event["data"]["instance"] == {
        "kind": "Node", "namespace": "", "name": "worker-1", "uid": "n1", "address": "10.0.0.9", "port": None,
        "labels": {},
    }


def test_instance_kind_and_extra_keys() -> None:
    event = make(instance={**POD, "kind": "Instance", "phase": "up"})
    assert event["subject"] == "Instance/shop/web-1"
    assert "phase" not in event["data"]["instance"]


def test_labels_are_copied() -> None:
    labels = {"app": "web"}
    event = make(instance={**POD, "labels": labels})
    labels["app"] = "changed"
    assert event["data"]["instance"]["labels"] == {"app": "web"}


@pytest.mark.parametrize("bad", ["UP", "ready", "", "instance.up"])
def test_unknown_event_type(bad: str) -> None:
    with pytest.raises(ValueError, match="event type must be one of"):
        make(event_type=bad)


@pytest.mark.parametrize("key", ["kind", "name", "uid"])
def test_instance_needs_identity(key: str) -> None:
    with pytest.raises(ValueError, match=f"missing {key}"):
        make(instance={k: v for k, v in POD.items() if k != key})


def test_id_is_the_same_for_every_delivery_of_a_transition() -> None:
    first = make(time=TIME, reason="Ready")
    again = make(time=TIME + timedelta(minutes=5), reason="retry", from_state="x", to_state="y")
    assert first["id"] == again["id"]


@pytest.mark.parametrize(
    "change",
    [{"handler_uid": "other"}, {"pool_uid": "other"}, {"instance": {**POD, "uid": "other"}},
     {"event_type": "down"}, {"sequence": 4}],
)
def test_id_changes_with_each_identity_part(change: dict[str, Any]) -> None:
    assert make(**change)["id"] != make()["id"]


def test_id_parts_are_not_ambiguous() -> None:
    a = event_id(handler_uid="a/b", pool_uid="c", instance_uid="i", event_type="up", sequence=1)
    b = event_id(handler_uid="a", pool_uid="b/c", instance_uid="i", event_type="up", sequence=1)
    assert a != b


ids = st.text(min_size=1, max_size=20)


@given(ids, ids, ids, st.sampled_from(sorted(EVENT_TYPES)), st.integers(min_value=0, max_value=2**63))
def test_id_is_a_pure_function(handler: str, pool: str, instance: str, kind: str, seq: int) -> None:
    args = {"handler_uid": handler, "pool_uid": pool, "instance_uid": instance, "event_type": kind, "sequence": seq}
    assert event_id(**args) == event_id(**args)
    assert event_id(**args) != event_id(**{**args, "sequence": seq + 1})


def test_time_formats() -> None:
    assert rfc3339(datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05Z"  # naive is UTC
    assert rfc3339(datetime(2024, 1, 2, 3, 4, 5, 120, tzinfo=UTC)) == "2024-01-02T03:04:05.000120Z"
    plus2 = timezone(timedelta(hours=2))
    assert rfc3339(datetime(2024, 1, 2, 1, 0, 0, tzinfo=plus2)) == "2024-01-01T23:00:00Z"


@given(st.datetimes(timezones=st.timezones()))
def test_time_is_always_rfc3339_utc(moment: datetime) -> None:
    text = rfc3339(moment)
    assert RFC3339_UTC.match(text)
    assert datetime.fromisoformat(text.replace("Z", "+00:00")) == moment.astimezone(UTC)


def test_subject_of() -> None:
    assert subject_of("Pod", "ns", "a") == "Pod/ns/a"
    assert subject_of("Node", "", "n") == "Node/n"
    assert subject_of("Node", "ns", "n") == "Node/n"


def test_binary_mode_headers_and_body() -> None:
    event = make()
    headers, body = binary_mode_http(event)
    assert headers == {
        "ce-specversion": "1.0",
        "ce-type": "dev.poolkeeper.instance.up",
        "ce-source": "/namespaces/shop/targetpools/web",
        "ce-id": event["id"],
        "ce-time": "2024-05-01T12:30:45Z",
        "ce-subject": "Pod/shop/web-1",
        "content-type": "application/json",
    }
    assert json.loads(body) == event["data"]
    assert body == encode_data(event)


def test_header_values_are_percent_encoded() -> None:
    event = {**make(), "subject": 'Pod/ns/a b"c%d\u00e9'}
    headers, _ = binary_mode_http(event)
    assert headers["ce-subject"] == "Pod/ns/a%20b%22c%25d%C3%A9"
    assert unquote(headers["ce-subject"]) == event["subject"]


@given(st.text())
def test_any_header_value_round_trips_as_printable_ascii(subject: str) -> None:
    headers, _ = binary_mode_http({**make(), "subject": subject})
    value = headers["ce-subject"]
    assert all(0x21 <= ord(ch) <= 0x7E for ch in value)
    assert unquote(value, errors="strict") == subject


def test_body_is_deterministic_and_utf8() -> None:
    event = make(reason="caf\u00e9 \u2615")
    _, body = binary_mode_http(event)
    assert body == binary_mode_http(json.loads(json.dumps(event)))[1]
    assert "caf\u00e9 \u2615".encode() in body


def test_signature_is_hmac_sha256_of_the_body() -> None:
    _, body = binary_mode_http(make())
    key = b"s3cret"
    signature = sign(body, key)
    assert signature == "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    assert verify(body, key, signature)
    assert not verify(body, b"other", signature)
    assert not verify(body + b" ", key, signature)
    assert not verify(body, key, "sha256=" + "0" * 64)


@given(st.binary(), st.binary(min_size=1))
def test_signature_always_verifies(body: bytes, key: bytes) -> None:
    signature = sign(body, key)
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", signature)
    assert verify(body, key, signature)


names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


@given(
    kind=st.sampled_from(["Pod", "Node", "Instance"]), namespace=names, name=names,
    event_type=st.sampled_from(sorted(EVENT_TYPES)), sequence=st.integers(min_value=0, max_value=10**9),
    port=st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
    labels=st.dictionaries(names, names, max_size=3),
)
def test_every_event_satisfies_the_cloudevents_contract(
    kind: str, namespace: str, name: str, event_type: str, sequence: int, port: int | None, labels: dict[str, str]
) -> None:
    instance = {"kind": kind, "namespace": namespace, "name": name, "uid": f"uid-{name}", "address": "10.0.0.1",
                "port": port, "labels": labels}
    event = make(instance=instance, event_type=event_type, sequence=sequence)
    for attribute in ("specversion", "id", "source", "type"):  # REQUIRED, non-empty strings
        assert isinstance(event[attribute], str) and event[attribute]
    assert event["specversion"] == "1.0"
    assert event["subject"] == (f"Node/{name}" if kind == "Node" else f"{kind}/{namespace}/{name}")
    assert RFC3339_UTC.match(event["time"])
    assert json.loads(json.dumps(event)) == event
    headers, body = binary_mode_http(event)
    assert json.loads(body) == event["data"]
    assert unquote(headers["ce-subject"]) == event["subject"]
