"""Decode only what the operator reads of a Pod or a Node.

At 100,000 pods, decoding list pages and watch events was half of a cold start's CPU: a pod's
JSON is mostly fields no pool looks at (managedFields, containers, volumes, tolerations). With a
schema, msgspec walks over those without building them and hands back plain dicts with the
fields below, so the code that reads them (sources.convert) is the same for both paths. A
payload that does not fit the schema (a field of an unexpected type) is decoded whole instead:
never lost. Every other kind is decoded whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypedDict, TypeVar

import msgspec

Decode = Callable[[bytes], Any]
_whole = msgspec.json.Decoder()
encode: Callable[[Any], bytes] = msgspec.json.Encoder().encode  # a request body (several times json.dumps' speed)
# keys sorted: equal content, same bytes (what a status write is compared by)
canonical: Callable[[Any], bytes] = msgspec.json.Encoder(order="sorted").encode


def decode(data: bytes) -> Any:
    """Any JSON payload, whole."""
    return _whole.decode(data) if data else None


class _Condition(TypedDict, total=False):
    type: Any
    status: Any


class _Gate(TypedDict, total=False):
    conditionType: Any


class _Address(TypedDict, total=False):
    type: Any
    address: Any


class _Metadata(TypedDict, total=False):
    name: Any
    namespace: Any
    uid: Any
    resourceVersion: Any
    labels: Any
    deletionTimestamp: Any


class _PodSpec(TypedDict, total=False):
    readinessGates: list[_Gate] | None
    nodeName: Any


class _PodStatus(TypedDict, total=False):
    phase: Any
    podIP: Any
    conditions: list[_Condition] | None


class _Object(TypedDict, total=False):
    kind: Any
    apiVersion: Any
    metadata: _Metadata


class Pod(_Object, total=False):
    spec: _PodSpec
    status: _PodStatus


class _NodeSpec(TypedDict, total=False):
    unschedulable: Any
    providerID: Any


class _NodeStatus(TypedDict, total=False):
    addresses: list[_Address] | None
    conditions: list[_Condition] | None


class Node(_Object, total=False):
    spec: _NodeSpec
    status: _NodeStatus


_ListMeta = TypedDict("_ListMeta", {"resourceVersion": Any, "continue": Any}, total=False)
Item = TypeVar("Item")


class _Page(TypedDict, Generic[Item], total=False):
    kind: Any
    apiVersion: Any
    metadata: _ListMeta
    items: list[Item] | None


class _Event(TypedDict, Generic[Item], total=False):
    type: Any
    object: Item


class Schema:
    """Decoders of one kind's list pages and watch events, reading only the fields of `item`."""

    def __init__(self, item: type) -> None:
        self._page = msgspec.json.Decoder(_Page[item])  # type: ignore[valid-type]
        self._event = msgspec.json.Decoder(_Event[item])  # type: ignore[valid-type]
        self.fallbacks = 0  # payloads decoded whole because they did not fit

    def page(self, data: bytes) -> Any:
        try:
            return self._page.decode(data)
        except msgspec.ValidationError:
            self.fallbacks += 1
            return decode(data)

    def event(self, data: bytes) -> Any:
        """A watch event; an ERROR event's object is a Status, not the kind: decoded whole."""
        try:
            event = self._event.decode(data)
        except msgspec.ValidationError:
            self.fallbacks += 1
            return decode(data)
        return decode(data) if event.get("type") == "ERROR" else event


POD, NODE = Schema(Pod), Schema(Node)
