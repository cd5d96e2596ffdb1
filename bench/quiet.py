"""How busy this machine's CPUs are, and waiting until they are quiet before a measurement.

A benchmark started while the previous one's control plane is still being torn down (etcd
and the API server exiting, their files removed, the 1-minute load average still at 3) measures
that tear-down too. The load average cannot tell: it lags by minutes. /proc/stat can.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

QUIET_BUSY = 0.25  # of all CPUs: what a machine idling between benchmarks stays under
QUIET_SAMPLE_S = 2.0
QUIET_TIMEOUT_S = 90.0


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (the first line of /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_fraction(seconds: float = QUIET_SAMPLE_S) -> float:
    """The share of all CPUs' time spent busy over the next `seconds`."""
    busy0, total0 = cpu_times()
    time.sleep(seconds)
    busy1, total1 = cpu_times()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_until_quiet(threshold: float = QUIET_BUSY, timeout: float = QUIET_TIMEOUT_S,
                     say: Callable[[str], None] | None = None) -> float:
    """Wait until the CPUs were busy less than `threshold` over one sample; return that last
    sample. After `timeout` it gives up and returns the busy share as it is (the report shows it)."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    deadline = time.monotonic() + timeout
    busy = busy_fraction()
    while busy >= threshold and time.monotonic() < deadline:
        busy = busy_fraction()
    if busy >= threshold:
        say(f"the CPUs are still {busy:.0%} busy after {timeout:.0f} s: measuring anyway")
    return busy
