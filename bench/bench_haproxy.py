"""What the HAProxy adapter costs per call, on one persistent unix-socket connection.

Starts its own HAProxy (as the tests do) and prints a markdown table of median / p99 latency:

    .venv/bin/python bench/bench_haproxy.py [--iterations 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from poolkeeper.backends import ActionResult
from poolkeeper.backends.haproxy import HAProxyPool
from poolkeeper.backends.haproxy_client import HAProxyClient
from poolkeeper.core.model import AddMember, Admin, RemoveMember, SetAdmin
from poolkeeper.core.naming import member_name, pool_prefix
from poolkeeper_dev.haproxy import HAProxyProcess


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


def row(what: str, samples: list[float]) -> str:
    p99 = statistics.quantiles(samples, n=100)[98]
    return f"| {what} | {statistics.median(samples):.3f} | {p99:.3f} |"


def checked(results: list[ActionResult]) -> None:
    if not all(r.ok for r in results):
        raise RuntimeError(f"an action failed: {results}")


async def bench(iterations: int, workdir: Path) -> list[str]:
    proc = HAProxyProcess(workdir, ["bench"])
    proc.start()
    client = HAProxyClient(proc.admin_endpoint)
    pool = HAProxyPool(client, "bench", pool_prefix("bench", "pool"), None)
    name = member_name("bench", "pool", "uid")
    samples: dict[str, list[float]] = {"execute": [], "add": [], "read": [], "remove": []}

    async def add() -> None:
        checked(await pool.apply([AddMember(name, "127.0.0.2", 8080), SetAdmin(name, Admin.READY)]))

    async def remove() -> None:
        checked(await pool.apply([SetAdmin(name, Admin.DRAIN), RemoveMember(name, "bench")]))

    try:
        await client.info()  # connect outside the measurement
        for _ in range(iterations):
            samples["execute"].append(await timed(lambda: client.execute(["show version"])))
            samples["add"].append(await timed(add))
            samples["read"].append(await timed(pool.read_members))
            samples["remove"].append(await timed(remove))
    finally:
        await client.close()
        proc.stop()
    return [
        f"HAProxy 2.6 runtime API, {iterations} iterations, one persistent unix-socket connection (ms)",
        "",
        "| call | median | p99 |",
        "| --- | --- | --- |",
        row("`execute([\"show version\"])` (1 command)", samples["execute"]),
        row("`apply([AddMember, SetAdmin(READY)])` (2 commands)", samples["add"]),
        row("`apply([SetAdmin(DRAIN), RemoveMember])` (4 commands)", samples["remove"]),
        row("`read_members()` (1 member, 2 commands)", samples["read"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-haproxy-") as workdir:
        print("\n".join(asyncio.run(bench(args.iterations, Path(workdir)))))


if __name__ == "__main__":
    main()
