"""Retry timing: exponential backoff with equal jitter, and HTTP Retry-After parsing.

Equal jitter (half fixed, half random) rather than full jitter so that a retry never fires
almost immediately after a failure, while concurrent retries of many events still spread out.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# 2.0 ** 1024 overflows; any exponent past this is capped by `maximum` anyway.
_MAX_EXPONENT = 1023


def backoff_ceiling(attempt: int, initial: float, maximum: float) -> float:
    """The un-jittered delay before try `attempt + 1`: min(maximum, initial * 2 ** (attempt - 1))."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not (initial > 0 and math.isfinite(initial)):
        raise ValueError(f"initial must be a positive finite number, got {initial}")
    if not (maximum > 0 and math.isfinite(maximum)):
        raise ValueError(f"maximum must be a positive finite number, got {maximum}")
    # Multiplying by a huge power of two gives inf rather than raising; min() then caps it.
    return min(maximum, initial * 2.0 ** min(attempt - 1, _MAX_EXPONENT))


def backoff_delay(
    attempt: int, initial: float, maximum: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed try number `attempt` (attempt 1 = the delay before the 2nd try).

    With c = backoff_ceiling(attempt, initial, maximum) the result is c/2 + rand() * c/2, so:

    * it always lies in [c/2, c], hence in [min(initial, maximum) / 2, maximum];
    * attempt 1 gives a delay in [min(initial, maximum) / 2, min(initial, maximum)];
    * the ceiling doubles per attempt until it reaches `maximum`.

    `rand` should return a value in [0, 1); values outside [0, 1] are clamped so a bad source of
    randomness can never produce a delay outside those bounds.
    """
    ceiling = backoff_ceiling(attempt, initial, maximum)
    r = rand()
    r = 0.0 if math.isnan(r) else min(1.0, max(0.0, r))
    return ceiling / 2 + r * (ceiling / 2)


def retry_after_seconds(header_value: str | None, now: datetime) -> float | None:
    """Seconds a server asked us to wait via Retry-After, or None if absent or unparseable.

    Accepts both forms of RFC 9110 section 10.2.3: delta-seconds (only digits) and an HTTP-date
    (IMF-fixdate, RFC 850 or asctime). A date in the past gives 0.0. Naive datetimes (`now`, or a
    date without a zone) are taken to be UTC. The result is always finite and >= 0; callers cap
    it with their own maximum.
    """
    if header_value is None:
        return None
    value = header_value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return min(float(value), sys.float_info.max)  # finite even for absurdly long values
    try:
        when = parsedate_to_datetime(value)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if when is None:  # type: ignore[comparison-overlap]  # older Pythons returned None
        return None
    return max(0.0, (_as_utc(when) - _as_utc(now)).total_seconds())


def _as_utc(moment: datetime) -> datetime:
    """`moment` as an aware UTC datetime (naive means UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
