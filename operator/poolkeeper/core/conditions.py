"""Kubernetes-convention conditions: lastTransitionTime moves only when status flips."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: bool | None  # None -> "Unknown"
    reason: str
    message: str = ""


def _status_text(status: bool | None) -> str:
    return "Unknown" if status is None else ("True" if status else "False")


def merge_conditions(previous: Iterable[Mapping[str, Any]] | None, new: Iterable[Condition],
                     generation: int | None, now: str) -> list[dict[str, Any]]:
    """The condition list to write, keeping each unchanged condition's transition time."""
    old = {c.get("type"): c for c in previous or []}
    merged = []
    for cond in new:
        status = _status_text(cond.status)
        prior = old.get(cond.type)
        since = prior.get("lastTransitionTime") if prior and prior.get("status") == status else None
        entry: dict[str, Any] = {
            "type": cond.type, "status": status, "reason": cond.reason,
            "message": cond.message, "lastTransitionTime": since or now,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        merged.append(entry)
    return merged
