"""Which HAProxy process answers, and what a change of process means (core.lbprocess, no I/O)."""

from __future__ import annotations

import pytest

from poolkeeper.core.lbprocess import (
    ProcessChange,
    ProcessIdentity,
    identity_of,
    is_stopping,
    probe_delay,
    process_change,
)

A = ProcessIdentity("100", "1796205584")


def test_identity_is_the_pid_and_the_start_time() -> None:
    info = {"Pid": "100", "Start_time_sec": "1796205584", "Uptime_sec": "7", "Stopping": "0"}
    assert identity_of(info) == A
    assert identity_of({"Pid": "100", "Uptime_sec": "7"}) == ProcessIdentity("100", "")  # HAProxy < 2.4
    assert identity_of({}) == ProcessIdentity("", "")
    assert str(A) == "pid 100"


@pytest.mark.parametrize(("value", "stopping"), [("1", True), ("0", False), ("", False), (" 1 ", True)])
def test_stopping_is_the_soft_stop_flag(value: str, stopping: bool) -> None:
    assert is_stopping({"Stopping": value}) is stopping


def test_no_stopping_field_means_running() -> None:
    assert is_stopping({"Pid": "100"}) is False


@pytest.mark.parametrize(("previous", "current", "left_stopping", "expected"), [
    (None, A, False, None),  # the first answer: nothing to compare
    (None, A, True, None),
    (A, A, False, None),  # the same process, whatever the uptime
    (A, ProcessIdentity("101", "1796205590"), True, ProcessChange.RELOADED),  # we left a stopping worker
    (A, ProcessIdentity("101", "1796205590"), False, ProcessChange.RESTARTED),  # it went away, a new one came
    (A, ProcessIdentity("100", "1796209999"), False, ProcessChange.RESTARTED),  # pid reused by a new start
    (ProcessIdentity("100", ""), ProcessIdentity("100", ""), False, None),  # HAProxy < 2.4: pid only
    (ProcessIdentity("100", ""), ProcessIdentity("200", ""), False, ProcessChange.RESTARTED),
    (ProcessIdentity("100", ""), A, False, None),  # one side cannot tell the start time: the pid decides
])
def test_process_change(previous: ProcessIdentity | None, current: ProcessIdentity, left_stopping: bool,
                        expected: ProcessChange | None) -> None:
    assert process_change(previous, current, left_stopping=left_stopping) is expected


def test_a_change_names_the_event_reason() -> None:
    assert [c.value for c in ProcessChange] == ["Reloaded", "Restarted"]


def test_probes_run_every_interval_while_haproxy_answers() -> None:
    assert probe_delay(0, 1.0) == 1.0


def test_probes_back_off_while_haproxy_does_not_answer_and_stay_bounded() -> None:
    delays = [probe_delay(n, 1.0, maximum=5.0) for n in range(1, 12)]
    assert delays == sorted(delays)
    assert delays[0] == 1.0 and delays[-1] == 5.0
    assert all(1.0 <= d <= 5.0 for d in delays)


def test_a_maximum_below_the_interval_never_probes_faster_than_the_interval() -> None:
    assert probe_delay(3, 2.0, maximum=0.5) == 2.0
