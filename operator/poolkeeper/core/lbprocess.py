"""Which HAProxy process answers the runtime API, and what a change of process means.

Servers added through the runtime API live only in the process that received them: a restart
or a reload (master-worker SIGUSR2, or `-sf <oldpid>`) starts a process that has only the
config file's servers, and HAProxy does not restore dynamic servers from a
`server-state-file` either (management guide, "add server"). Telling which process answers,
and when it changed, is how poolkeeper knows to put its servers back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from poolkeeper.core.retry import backoff_ceiling


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """One HAProxy process as `show info` names it: its pid and when it started."""

    pid: str
    started: str

    def __str__(self) -> str:
        return f"pid {self.pid or '?'}"


class ProcessChange(StrEnum):
    """Why the process behind the runtime API is another one; the value is the Event reason."""

    RELOADED = "Reloaded"  # the one we spoke to was soft-stopping: a new worker took over
    RESTARTED = "Restarted"  # it went away (or we could not tell): a fresh start


def identity_of(info: Mapping[str, str]) -> ProcessIdentity:
    """The process in a `show info` answer; Start_time_sec exists from HAProxy 2.4, Uptime_sec before."""
    return ProcessIdentity(info.get("Pid", ""), info.get("Start_time_sec") or "")


def is_stopping(info: Mapping[str, str]) -> bool:
    """A process that is soft-stopping after a reload still answers the sessions it has open,
    for itself: its servers are not the ones that serve new traffic."""
    return info.get("Stopping", "0").strip() not in ("", "0")


def process_change(previous: ProcessIdentity | None, current: ProcessIdentity,
                   *, left_stopping: bool) -> ProcessChange | None:
    """What happened between two answers; None when it is the same process (or the first answer).

    `left_stopping`: the probe found the old process soft-stopping and asked again on a new
    connection, which is what a reload looks like from the runtime API.
    """
    if previous is None or previous == current:
        return None
    if previous.pid == current.pid and not (previous.started and current.started):
        return None  # an older HAProxy without Start_time_sec: the pid alone decides
    return ProcessChange.RELOADED if left_stopping else ProcessChange.RESTARTED


def probe_delay(failures: int, interval: float, maximum: float = 5.0) -> float:
    """Seconds until the next probe: `interval` while HAProxy answers, growing while it does not.

    A probe that times out leaves one connection in the backlog of a process that accepts but
    never answers (stopped, or wedged); backing off keeps that build-up slow and bounded.
    """
    if failures <= 0:
        return interval
    return max(interval, backoff_ceiling(failures, interval, maximum))
