"""Backoff bounds and Retry-After parsing (pure)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolkeeper.core.retry import backoff_ceiling, backoff_delay, retry_after_seconds

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
any_rand = st.one_of(st.floats(min_value=0, max_value=1, exclude_max=True), st.floats())


def test_first_delay_is_between_half_initial_and_initial() -> None:
    assert backoff_delay(1, 2.0, 60.0, rand=lambda: 0.0) == 1.0
    assert backoff_delay(1, 2.0, 60.0, rand=lambda: 0.5) == 1.5
    assert backoff_delay(1, 2.0, 60.0, rand=lambda: 1.0) == 2.0


def test_ceiling_doubles_until_the_maximum() -> None:
    assert [backoff_ceiling(a, 1.0, 10.0) for a in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_maximum_below_initial_caps_from_the_start() -> None:
    assert backoff_ceiling(1, 5.0, 3.0) == 3.0
    assert backoff_delay(1, 5.0, 3.0, rand=lambda: 0.0) == 1.5


def test_huge_attempts_do_not_overflow() -> None:
    assert backoff_ceiling(10**9, 1.0, 60.0) == 60.0
    assert backoff_delay(10**9, 3.0, 60.0, rand=lambda: 0.99) <= 60.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 2.0])
def test_bad_random_values_are_clamped(bad: float) -> None:
    assert 2.0 <= backoff_delay(3, 1.0, 60.0, rand=lambda: bad) <= 4.0


@pytest.mark.parametrize(
    ("attempt", "initial", "maximum"),
    [(0, 1.0, 2.0), (-1, 1.0, 2.0), (1, 0.0, 2.0), (1, -1.0, 2.0), (1, float("nan"), 2.0), (1, 1.0, 0.0),
     (1, 1.0, float("inf"))],
)
def test_invalid_arguments_are_rejected(attempt: int, initial: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(attempt, initial, maximum)


def test_default_randomness_stays_in_bounds() -> None:
    delays = [backoff_delay(2, 1.0, 10.0) for _ in range(200)]
    assert all(1.0 <= d <= 2.0 for d in delays)
    assert len(set(delays)) > 1


@given(st.integers(min_value=1, max_value=5000), positive, positive, any_rand)
def test_delay_bounds(attempt: int, initial: float, maximum: float, r: float) -> None:
    ceiling = backoff_ceiling(attempt, initial, maximum)
    delay = backoff_delay(attempt, initial, maximum, rand=lambda: r)
    assert ceiling / 2 <= delay <= ceiling
    assert min(initial, maximum) / 2 <= delay <= maximum
    assert math.isfinite(delay)


@given(st.integers(min_value=1, max_value=2000), positive, positive)
def test_ceiling_never_decreases(attempt: int, initial: float, maximum: float) -> None:
    assert backoff_ceiling(attempt, initial, maximum) <= backoff_ceiling(attempt + 1, initial, maximum)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("-1", None),
        ("1.5", None),
        ("1e3", None),
        ("soon", None),
        ("\uff15", None),  # a full-width digit: not delta-seconds
        ("Wed, 01 May 2024 12:00:30 GMT", 30.0),
        ("Wednesday, 01-May-24 12:01:00 GMT", 60.0),
        ("Wed May  1 12:00:10 2024", 10.0),  # asctime: no zone, so UTC
        ("Wed, 01 May 2024 13:00:05 +0100", 5.0),
        ("Tue, 30 Apr 2024 12:00:00 GMT", 0.0),  # in the past
        ("Wed, 01 May 2024 25:00:00 GMT", None),
        ("Wed, 01 May 99999 12:00:00 GMT", None),
    ],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    assert retry_after_seconds(value, NOW) == expected


def test_retry_after_with_naive_or_other_zone_now() -> None:
    header = "Wed, 01 May 2024 12:00:30 GMT"
    assert retry_after_seconds(header, NOW.replace(tzinfo=None)) == 30.0
    assert retry_after_seconds(header, NOW.astimezone(timezone(timedelta(hours=-7)))) == 30.0


def test_absurd_delta_stays_finite() -> None:
    value = retry_after_seconds("9" * 500, NOW)
    assert value is not None and math.isfinite(value) and value > 1e300


@given(st.integers(min_value=0, max_value=10**12))
def test_any_delta_seconds(n: int) -> None:
    assert retry_after_seconds(str(n), NOW) == float(n)


@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)))
def test_any_http_date(moment: datetime) -> None:
    moment = moment.replace(microsecond=0, tzinfo=UTC)
    expected = max(0.0, (moment - NOW).total_seconds())
    assert retry_after_seconds(format_datetime(moment, usegmt=True), NOW) == expected


@given(st.text())
def test_never_raises_and_never_negative(value: str) -> None:
    result = retry_after_seconds(value, NOW)
    assert result is None or (math.isfinite(result) and result >= 0)
