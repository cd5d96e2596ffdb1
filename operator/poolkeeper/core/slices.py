"""Packing endpoints into EndpointSlices (pure): stable placement, at most N per slice.

An endpoint stays in the slice it is already in, new ones fill slices with room first, and
a slice left empty is deleted, so one member changing rewrites one slice, not all of them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_PER_SLICE = 100


@dataclass
class SliceLayout:
    """Slice name -> endpoints it should hold; `new` slices have no name yet."""

    existing: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    new: list[list[dict[str, Any]]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)


def address_type(address: str) -> str:
    return "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"


def layout(current: Mapping[str, Sequence[Mapping[str, Any]]], wanted: Mapping[str, dict[str, Any]],
           key_of: Any, limit: int = MAX_PER_SLICE) -> SliceLayout:
    """`current`: slice name -> endpoints; `wanted`: member key -> endpoint; `key_of(ep)` -> key."""
    result = SliceLayout()
    placed: set[str] = set()
    for slice_name in sorted(current):
        kept: list[dict[str, Any]] = []
        for ep in current[slice_name]:
            key = key_of(ep)
            if key in wanted and key not in placed and len(kept) < limit:
                kept.append(wanted[key])
                placed.add(key)
        if not kept:
            result.delete.append(slice_name)
            continue
        result.existing[slice_name] = kept
        if kept != list(current[slice_name]):
            result.changed.add(slice_name)
    pending = [wanted[k] for k in sorted(wanted) if k not in placed]
    for slice_name in sorted(result.existing):
        room = limit - len(result.existing[slice_name])
        if room > 0 and pending:
            result.existing[slice_name].extend(pending[:room])
            pending = pending[room:]
            result.changed.add(slice_name)
    while pending:
        result.new.append(pending[:limit])
        pending = pending[limit:]
    _consolidate(result, len(wanted), limit)
    return result


def _consolidate(result: SliceLayout, total: int, limit: int) -> None:
    """Fold the smallest slices into the others while more slices exist than the endpoints need."""
    needed = -(-total // limit)
    while len(result.existing) + len(result.new) > needed and result.existing:
        smallest = min(result.existing, key=lambda n: (len(result.existing[n]), n))
        moving = result.existing.pop(smallest)
        result.changed.discard(smallest)
        for name in sorted(result.existing, key=lambda n: (-len(result.existing[n]), n)):
            room = limit - len(result.existing[name])
            if room > 0 and moving:
                result.existing[name].extend(moving[:room])
                moving = moving[room:]
                result.changed.add(name)
        for chunk in result.new:
            room = limit - len(chunk)
            if room > 0 and moving:
                chunk.extend(moving[:room])
                moving = moving[room:]
        if moving:  # could not fit after all: keep it
            result.existing[smallest] = moving
            result.changed.add(smallest)
            break
        result.delete.append(smallest)
