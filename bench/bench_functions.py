"""Benchmark handler invocation: FunctionPool call latency at a fixed rate, HTTP delivery throughput.

    .venv/bin/python bench/bench_functions.py [--repeats 3] [--out docs/benchmarks-functions.md]

(1) 2,000 invocations issued open-loop at 200/s through a FunctionPool of the default size; the
    function returns time.time() on entry, so latency = entry - the moment invoke() was called.
(2) 3,000 deliver_http() POSTs, 32 at a time, to an aiohttp receiver in its own process.
It runs itself (and so the function workers) on the interpreter the image ships (shipped_python).
Each is repeated; the table reports the median over repeats (and the range).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from poolkeeper.functions.http import deliver_http, make_http_session, parse_cidrs
from poolkeeper.functions.invoke_cli import sample_event
from poolkeeper.functions.pool import FunctionPool, default_size
from poolkeeper_dev.shipped_python import described, shipped_python

LOOPBACK = parse_cidrs(["127.0.0.0/8"])  # the receiver is on loopback: allowed explicitly

REPO = Path(__file__).resolve().parent.parent
TARGET_P99_MS = 10.0
ON_SHIPPED = "POOLKEEPER_BENCH_ON_SHIPPED_PYTHON"  # set once this script runs on the image's interpreter
HANDLER = "import time\n\ndef handle(event, context):\n    return time.time()\n"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rss_mb(pid: int) -> tuple[float, float | None]:
    """(RSS, PSS) of a process in MiB; PSS shares copy-on-write pages fairly between processes."""
    rss = pss = None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    try:
        with open(f"/proc/{pid}/smaps_rollup") as smaps:
            for line in smaps:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss or 0.0, pss


async def invocation_latency(handlers: str, count: int, rate: float) -> dict[str, Any]:
    """Latencies (ms) from invoke() to the function's first line, and of the whole call."""
    event = sample_event(event="up", kind="Pod", namespace="bench", name="web-1", pool="web",
                         address="127.0.0.1", port=8080)
    entry: list[float] = []
    total: list[float] = []
    failures = 0
    async with FunctionPool() as pool:
        for _ in range(pool.size * 2):  # warm every worker's module cache
            await pool.invoke(handlers, "bench.handle", event, timeout=5)

        async def one() -> None:
            nonlocal failures
            issued = time.time()
            result = await pool.invoke(handlers, "bench.handle", event, timeout=5)
            if not result.ok:
                failures += 1
                return
            entry.append((result.value - issued) * 1000)
            total.append(result.duration_ms)

        tasks = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
        memory = [rss_mb(pid) for pid in pool.worker_pids()]
    return {
        "size": pool.size, "entry": entry, "total": total, "failures": failures,
        "achieved_rate": count / elapsed, "memory": memory,
    }


def _receiver_main(port_out: Any) -> None:
    """A minimal CloudEvents receiver (runs in its own process)."""
    from aiohttp import web

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_out.send(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(serve())


async def http_throughput(port: int, count: int, concurrency: int, secret: bytes | None) -> dict[str, Any]:
    """Deliveries per second and per-delivery latency against the receiver."""
    event = sample_event(event="up", kind="Pod", namespace="bench", name="web-1", pool="web",
                         address="127.0.0.1", port=8080)
    url = f"http://127.0.0.1:{port}/hook"
    latencies: list[float] = []
    failures = 0
    gate = asyncio.Semaphore(concurrency)
    async with make_http_session() as session:
        for _ in range(concurrency):  # open the keep-alive connections first
            await deliver_http(session, url, event, timeout=10, secret=secret, allowed_cidrs=LOOPBACK)

        async def one() -> None:
            nonlocal failures
            async with gate:
                result = await deliver_http(session, url, event, timeout=10, secret=secret, allowed_cidrs=LOOPBACK)
            if result.ok:
                latencies.append(result.duration_ms)
            else:
                failures += 1

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        elapsed = time.monotonic() - started
    return {"rate": count / elapsed, "latencies": latencies, "failures": failures}


def median_of(runs: list[dict[str, Any]], metric: Callable[[dict[str, Any]], float]) -> tuple[float, float, float]:
    values = [metric(run) for run in runs]
    return statistics.median(values), min(values), max(values)


def row(label: str, stats: tuple[float, float, float], unit: str, note: str = "") -> str:
    median, low, high = stats
    return f"| {label} | {median:,.2f} {unit} | {low:,.2f} - {high:,.2f} | {note} |"


def render(latency_runs: list[dict[str, Any]], http_runs: list[dict[str, Any]],
           signed_runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    p99 = median_of(latency_runs, lambda r: percentile(r["entry"], 99))
    plain_rate = median_of(http_runs, lambda r: r["rate"])
    signed_rate = median_of(signed_runs, lambda r: r["rate"])
    rss = [m[0] for run in latency_runs for m in run["memory"]]
    pss = [m[1] for run in latency_runs for m in run["memory"] if m[1] is not None]
    failures = sum(r["failures"] for r in latency_runs + http_runs + signed_runs)
    lines = [
        "## Handler functions",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), {described()}, "
        f"{platform.system()}; shared with other work. Median of {args.repeats} runs (range = min - max).",
        "",
        "| Measure | Median | Range | Notes |",
        "|---|---|---|---|",
        row("invoke → function entered, p50", median_of(latency_runs, lambda r: percentile(r["entry"], 50)), "ms",
            f"{args.invocations:,} calls at {args.rate:g}/s, pool of {latency_runs[0]['size']} workers"),
        row("invoke → function entered, p99", p99, "ms",
            f"target < {TARGET_P99_MS:g} ms: p99 is {p99[0] / TARGET_P99_MS:.2f}x the target"),
        row("invoke → function entered, max", median_of(latency_runs, lambda r: max(r["entry"])), "ms", ""),
        row("invoke → result back, p99", median_of(latency_runs, lambda r: percentile(r["total"], 99)), "ms",
            "whole round trip incl. JSON result"),
        row("achieved invocation rate", median_of(latency_runs, lambda r: r["achieved_rate"]), "/s", ""),
        row("HTTP deliveries", plain_rate, "/s",
            f"{args.deliveries:,} POSTs, {args.concurrency} concurrent, receiver in another process"),
        row("HTTP deliveries, HMAC-signed", signed_rate, "/s", f"{signed_rate[0] / plain_rate[0]:.2f}x unsigned"),
        row("HTTP delivery latency, p99", median_of(http_runs, lambda r: percentile(r["latencies"], 99)), "ms",
            f"at concurrency {args.concurrency}"),
        "",
        f"Worker memory: RSS {statistics.median(rss):.1f} MiB per worker"
        + (f", PSS {statistics.median(pss):.1f} MiB (copy-on-write pages from the forkserver shared)" if pss else "")
        + f". Failed calls/deliveries: {failures}.",
        "",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace, handlers: str) -> str:
    latency_runs = []
    for _ in range(args.repeats):
        latency_runs.append(await invocation_latency(handlers, args.invocations, args.rate))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    receiver = ctx.Process(target=_receiver_main, args=(child,), daemon=True)
    receiver.start()
    try:
        port = parent.recv()
        http_runs: list[dict[str, Any]] = []
        signed_runs: list[dict[str, Any]] = []
        for i in range(args.repeats):
            for secret in (None, b"bench-secret") if i % 2 == 0 else (b"bench-secret", None):  # fair order
                measured = await http_throughput(port, args.deliveries, args.concurrency, secret)
                (http_runs if secret is None else signed_runs).append(measured)
    finally:
        receiver.kill()
        receiver.join()
    return render(latency_runs, http_runs, signed_runs, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--invocations", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--deliveries", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks-functions.md")
    args = parser.parse_args(argv)
    if not os.environ.get(ON_SHIPPED):  # the function workers run on the interpreter the image ships
        python = shipped_python()
        path = os.pathsep.join(str(REPO / folder) for folder in ("operator", "devtools"))
        env = {**os.environ, ON_SHIPPED: "1", "PYTHONPATH": path}
        os.execve(python, [python, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)], env)
    print(f"pool size {default_size()}; running {args.repeats} repeats...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as handlers:
        Path(handlers, "bench.py").write_text(HANDLER)
        table = asyncio.run(run(args, handlers))
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
