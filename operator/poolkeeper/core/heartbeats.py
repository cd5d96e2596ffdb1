"""Heartbeat staleness, timed by the operator's own clock (no polling of the API).

The operator notes the monotonic time at which it saw each heartbeat change; after a restart
it falls back to `lastHeartbeatTime` (wall clock) for the first sighting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class HeartbeatSeen:
    value: str  # the lastHeartbeatTime string as written
    seen_at: float  # monotonic time the operator saw it change


def observe(previous: HeartbeatSeen | None, value: str | None, now_mono: float,
            now_wall: datetime, parsed: datetime | None) -> HeartbeatSeen | None:
    """Record a heartbeat; a first sighting is back-dated by the wall-clock age it already has."""
    if not value:
        return None
    if previous is not None and previous.value == value:
        return previous
    if previous is None and parsed is not None:
        age = max(0.0, (now_wall - parsed).total_seconds())
        return HeartbeatSeen(value, now_mono - age)
    return HeartbeatSeen(value, now_mono)


def expires_in(seen: HeartbeatSeen | None, timeout: float | None, now_mono: float) -> float | None:
    """Seconds until the heartbeat goes stale (<= 0: stale); None when no timeout applies."""
    if timeout is None:
        return None
    if seen is None:
        return 0.0
    return seen.seen_at + timeout - now_mono
