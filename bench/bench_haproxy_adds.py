"""HAProxy alone: how fast it takes N `add server` commands on one runtime-API connection.

    .venv/bin/python bench/bench_haproxy_adds.py [--servers 10000] [--runs 3]

Starts its own HAProxy (as the tests do), then for each way of sending, adds N servers to an
empty backend (HAProxy restarted before every run, like the refill after a restart) and times
it until every answer is read:

- one by one: a command, wait for its prompt, the next;
- pipelined: every line written at once, the N prompt-terminated answers read back;
- pipelined in chunks of K lines (the writer waits for a chunk's answers before the next);
- K commands per line separated by `;` (HAProxy 2.6 still answers each with its own prompt).

Also times `show servers state` of the full backend (what a read-back costs). Prints a markdown
table of medians over the runs; nothing is written.

    .venv/bin/python bench/bench_haproxy_adds.py --apply [--servers 10000] [--runs 3]

times instead the adapter itself: `HAProxyPool.apply` of N members (AddMember + SetAdmin READY,
the refill after a restart) on a freshly restarted HAProxy, wall time and HAProxy's own CPU
time (which load from other work on the machine changes least). Run it with
`PYTHONPATH=<other tree>/operator:<other tree>/devtools` to time another version's adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from poolkeeper_dev.haproxy import HAProxyProcess

PROMPT = b"\n> "
BACKEND = "bench"


def add_commands(count: int, ids: bool = False) -> list[str]:
    """`ids`: each with `id N` (what the adapter sends: HAProxy then does not search for a free id)."""
    return [f"add server {BACKEND}/s{i:05d} 127.{50 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}:8080 "
            + (f"id {(1 << 24) + i} " if ids else "") + "pool-max-conn -1 pool-purge-delay 5s" for i in range(count)]


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Conn:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=64 * 1024 * 1024)
        conn = cls(reader, writer)
        await conn.send(["prompt", "set timeout cli 600"])
        return conn

    async def send(self, lines: list[str], answers: int | None = None) -> list[bytes]:
        """`answers`: how many prompts to read (HAProxy 2.6 prompts after each `;`-separated command too)."""
        self.writer.write("".join(f"{line}\n" for line in lines).encode())
        await self.writer.drain()
        return [await self.reader.readuntil(PROMPT) for _ in range(len(lines) if answers is None else answers)]

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def checked(answers: list[bytes], expected: int) -> None:
    ok = sum(a.count(b"New server registered.") for a in answers)
    if ok != expected:
        bad = next(a for a in answers if b"New server registered." not in a)
        raise RuntimeError(f"{ok} of {expected} servers added; e.g. {bad[:200]!r}")


async def one_by_one(conn: Conn, commands: list[str]) -> None:
    answers = [(await conn.send([c]))[0] for c in commands]
    checked(answers, len(commands))


def chunked(size: int) -> Callable[[Conn, list[str]], Awaitable[None]]:
    async def run(conn: Conn, commands: list[str]) -> None:
        answers: list[bytes] = []
        for start in range(0, len(commands), size):
            answers += await conn.send(commands[start:start + size])
        checked(answers, len(commands))
    return run


def joined(per_line: int) -> Callable[[Conn, list[str]], Awaitable[None]]:
    async def run(conn: Conn, commands: list[str]) -> None:
        lines = [";".join(commands[i:i + per_line]) for i in range(0, len(commands), per_line)]
        checked(await conn.send(lines, len(commands)), len(commands))
    return run


def with_ids(how: Callable[[Conn, list[str]], Awaitable[None]]) -> Callable[[Conn, list[str]], Awaitable[None]]:
    async def run(conn: Conn, commands: list[str]) -> None:
        await how(conn, add_commands(len(commands), ids=True))
    return run


async def timed_run(proc: HAProxyProcess, commands: list[str],
                    how: Callable[[Conn, list[str]], Awaitable[None]]) -> tuple[float, float, float]:
    """(seconds to add every server, HAProxy's CPU seconds meanwhile, seconds for one `show servers
    state` of them) on a fresh HAProxy."""
    await asyncio.to_thread(proc.restart)
    assert proc.pid is not None
    conn = await Conn.open(proc.admin_socket)
    try:
        cpu, started = cpu_seconds(proc.pid), time.perf_counter()
        await how(conn, commands)
        added = time.perf_counter() - started
        cpu = cpu_seconds(proc.pid) - cpu
        started = time.perf_counter()
        (state,) = await conn.send([f"show servers state {BACKEND}"])
        read = time.perf_counter() - started
        if state.count(b"\n") < len(commands):
            raise RuntimeError("`show servers state` shows fewer servers than were added")
        return added, cpu, read
    finally:
        await conn.close()


async def bench(servers: int, runs: int, workdir: Path) -> list[str]:
    proc = HAProxyProcess(workdir, [BACKEND])
    proc.start()
    commands = add_commands(servers)
    ways: list[tuple[str, Callable[[Conn, list[str]], Awaitable[None]]]] = [
        ("one by one (wait for each answer)", one_by_one),
        ("pipelined, all in one write", chunked(servers)),
        ("pipelined, all in one write, each with `id`", with_ids(chunked(servers))),
        ("pipelined, chunks of 100", chunked(100)),
        ("pipelined, chunks of 1,000", chunked(1000)),
        ("10 per line (`;`), all in one write", joined(10)),
        ("100 per line (`;`), all in one write", joined(100)),
    ]
    rows = []
    reads: list[float] = []
    try:
        for label, how in ways:
            samples, cpus = [], []
            for _ in range(runs):
                added, cpu, read = await timed_run(proc, commands, how)
                samples.append(added)
                cpus.append(cpu)
                reads.append(read)
            median = statistics.median(samples)
            rows.append(f"| {label} | {median:.3f} | {statistics.median(cpus):.2f} | {median / servers * 1e6:.1f} | "
                        f"{os.getloadavg()[0]:.2f} |")
    finally:
        proc.stop()
    load = os.getloadavg()
    return [
        f"HAProxy 2.6 alone: {servers:,} `add server` on one unix-socket connection in prompt mode, "
        f"median of {runs} runs each on a freshly restarted HAProxy (load average {load[0]:.2f})",
        "",
        "| how | seconds | HAProxy CPU seconds | µs per server | load average after |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"`show servers state` of the {servers:,} servers: median {statistics.median(reads) * 1000:.0f} ms.",
    ]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_apply(servers: int, runs: int, workdir: Path) -> list[str]:
    from poolkeeper.backends.haproxy import HAProxyPool  # the tree on the path is the one measured
    from poolkeeper.backends.haproxy_client import HAProxyClient
    from poolkeeper.core.model import Action, AddMember, Admin, SetAdmin
    from poolkeeper.core.naming import member_name, pool_prefix

    actions: list[Action] = []
    for i in range(servers):
        name = member_name("bench", "pool", f"uid-{i}")
        actions += [AddMember(name, f"127.{50 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 8080),
                    SetAdmin(name, Admin.READY)]
    proc = HAProxyProcess(workdir, [BACKEND])
    proc.start()
    rows = []
    try:
        for run in range(runs):
            await asyncio.to_thread(proc.restart)
            assert proc.pid is not None
            client = HAProxyClient(proc.admin_endpoint, timeout=300)  # the old client bounds the whole batch
            try:
                await client.info()
                pool = HAProxyPool(client, BACKEND, pool_prefix("bench", "pool"), None)
                load, haproxy_cpu, started = os.getloadavg()[0], cpu_seconds(proc.pid), time.perf_counter()
                results = await pool.apply(actions)
                wall = time.perf_counter() - started
                failed = sum(not r.ok for r in results)
                rows.append(f"| {run + 1} | {wall:.2f} | {cpu_seconds(proc.pid) - haproxy_cpu:.2f} | {failed} | "
                            f"{load:.2f} |")
            finally:
                await client.close()
    finally:
        proc.stop()
    import poolkeeper
    return [f"`HAProxyPool.apply` of {servers:,} members (AddMember + SetAdmin READY) into an empty backend, "
            f"code from {Path(poolkeeper.__file__).parent.parent.parent}", "",
            "| run | wall s | HAProxy CPU s | failed | load average (1 min) |", "| --- | --- | --- | --- | --- |",
            *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--servers", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--apply", action="store_true", help="time HAProxyPool.apply instead of raw commands")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-haproxy-adds-") as workdir:
        work = bench_apply if args.apply else bench
        print("\n".join(asyncio.run(work(args.servers, args.runs, Path(workdir)))))


if __name__ == "__main__":
    main()
