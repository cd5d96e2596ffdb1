"""Sharding pools across replicas (issue 10 section 4): transitions/s with 1 and 2 replicas.

    .venv/bin/python bench/bench_shards.py [--dir /tmp/pk-shards] [--quick] [--no-write]

A fresh control plane in --dir, one HAProxy with --pools backends behind one LoadBalancer, and
--pool-size status-only pods per pool (Ready, loopback addresses nothing serves; no health
checks, no handlers). Three setups get the same load, one after the other in one run, the
setups alternating --repeat times:

- `single`: `--shards 1`, one replica (without --leader-elect: a lone replica needs no Lease);
- `S shards, 1 replica`: `--shards S`, one replica holding every shard;
- `S shards, 2 replicas`: `--shards S`, two replicas holding about half each.

With --pin each replica is pinned to one core (replica i to CPU i), every thread of it.
The load: --transitions readiness flips (status PATCHes) of every pool's pods, --concurrency
writes in flight, as fast as the API server takes them; then every pod back to Ready. Measured
from the first write until HAProxy shows every server in rotation again: so every transition was
processed (a pool's events that arrive together are coalesced into one reconcile, as always).
transitions/s = transitions / that time; CPU = the replicas' utime + stime from /proc.

Prints a markdown section and writes it into docs/scaling.md (between its own markers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from bench_envelope import process_cpu, run_many
from bench_operator import (
    GROUP_PATH,
    LB_NAME,
    Kube,
    cpu_seconds,
    create_namespace,
    fresh_cluster_dir,
    log,
    pod_body,
    pod_path,
    pool_body,
    pool_path,
    prepare_cluster,
    readiness,
    running_status,
    servers_in_rotation,
    wait_until,
)

from poolkeeper.backends.haproxy_client import HAProxyClient
from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.shipped_python import described, shipped_python

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "scaling.md"
BEGIN, END = "<!-- bench_shards: begin -->", "<!-- bench_shards: end -->"
NAMESPACE = "shards"


@dataclass(frozen=True)
class Setup:
    name: str
    shards: int
    replicas: int


@dataclass
class Run:
    setup: Setup
    transitions: int
    sent_in: float
    wall: float
    cpu: list[float]  # per replica
    errors: int
    own_cpu: float

    @property
    def rate(self) -> float:
        return self.transitions / self.wall

    @property
    def per_1000(self) -> float:
        return sum(self.cpu) / self.transitions * 1000

    @property
    def per_busiest_cpu(self) -> float:
        """Transitions per CPU-second of the busiest replica: the rate at which it would fill its core."""
        return self.transitions / max(self.cpu)


def pin(proc: OperatorProcess, cpu: int) -> None:
    """Every thread of the replica on one core (threads made later inherit it)."""
    for tid in os.listdir(f"/proc/{proc.pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def shards_held(proc: OperatorProcess) -> int:
    found = re.search(r"^poolkeeper_shards_held (\S+)$", proc.metrics(), re.MULTILINE)
    return int(float(found.group(1))) if found else 0


async def all_in_rotation(haproxy: HAProxyProcess, backends: Sequence[str], expected: int, limit: float) -> None:
    client = HAProxyClient(haproxy.admin_endpoint)
    try:
        async def done() -> bool:
            return bool(await servers_in_rotation(client, backends) == expected)
        await wait_until(done, limit, f"{expected} servers in rotation", interval=0.02)
    finally:
        await client.close()


async def start_replicas(cluster: Cluster, setup: Setup, args: argparse.Namespace, index: int) -> list[OperatorProcess]:
    extra = () if setup.shards == 1 else ("--shards", str(setup.shards))  # one replica needs no Lease
    python = shipped_python()
    procs = [OperatorProcess(cluster.kubeconfig, args.dir / "logs" / f"{index}-{r}", extra_args=extra, python=python)
             for r in range(setup.replicas)]
    cores = os.cpu_count() or 1
    for r, proc in enumerate(procs):
        await asyncio.to_thread(proc.start, False)
        if args.pin:
            pin(proc, r % cores)
    for proc in procs:
        await asyncio.to_thread(proc.wait_ready, 120.0)
    if setup.shards > 1:
        share = -(-setup.shards // setup.replicas)

        async def balanced() -> bool:
            held = [await asyncio.to_thread(shards_held, p) for p in procs]
            return sum(held) == setup.shards and max(held) <= share
        await wait_until(balanced, 90, f"{setup.replicas} replica(s) holding {setup.shards} shards evenly",
                         interval=0.5)
    return procs


async def flips(kube: Kube, haproxy: HAProxyProcess, procs: list[OperatorProcess], pods: list[tuple[str, str]],
                backends: list[str], setup: Setup, args: argparse.Namespace) -> Run:
    state = {name: True for name, _ in pods}
    order = [pods[i % len(pods)][0] for i in range(args.transitions)]
    writes: list[tuple[str, bool]] = []
    for name in order:
        state[name] = not state[name]
        writes.append((name, state[name]))
    writes += [(name, True) for name, ready in state.items() if not ready]  # back to all Ready
    errors = 0

    async def send(item: tuple[str, bool]) -> None:
        nonlocal errors
        try:
            await kube.patch_status(pod_path(NAMESPACE, item[0]), {"status": {"conditions": readiness(item[1])}})
        except (RuntimeError, aiohttp.ClientError, TimeoutError):
            errors += 1

    cpu0, own0, wall0 = [cpu_seconds(p.pid) for p in procs], process_cpu(), time.monotonic()
    queue: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
    for item in writes:
        queue.put_nowait(item)

    async def writer() -> None:
        while not queue.empty():
            await send(queue.get_nowait())
    await asyncio.gather(*(writer() for _ in range(args.concurrency)))
    sent = time.monotonic() - wall0
    await all_in_rotation(haproxy, backends, len(pods), 300)
    wall = time.monotonic() - wall0
    run = Run(setup, len(writes), sent, wall, [cpu_seconds(p.pid) - c for p, c in zip(procs, cpu0, strict=True)],
              errors, process_cpu() - own0)
    log(f"{setup.name}: {run.transitions} transitions in {wall:.2f} s ({run.rate:.0f}/s; written in {sent:.2f} s), "
        f"operator CPU {' + '.join(f'{c:.2f}' for c in run.cpu)} s ({run.per_1000:.2f} s per 1,000), "
        f"{errors} write errors, load average {os.getloadavg()[0]:.2f}")
    return run


async def phases(cluster: Cluster, haproxy: HAProxyProcess, args: argparse.Namespace) -> list[Run]:
    kube = Kube(cluster.kubeconfig)
    backends = list(haproxy.backends)
    pods = [(f"{b}-{i:02d}", f"127.{100 + j // 250}.{j % 250}.{i + 1}")
            for j, b in enumerate(backends) for i in range(args.pool_size)]
    runs: list[Run] = []
    try:
        await create_namespace(kube, NAMESPACE)
        await kube.create(f"{GROUP_PATH}/loadbalancers", {
            "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": LB_NAME},
            "spec": {"type": "HAProxy", "allowedTargetCIDRs": ["127.0.0.0/8"],
                     "haproxy": {"endpoint": haproxy.admin_endpoint, "backends": [{"name": b} for b in backends]}}})

        async def member(item: tuple[str, str]) -> None:
            name, ip = item
            await kube.call("POST", pod_path(NAMESPACE), pod_body(NAMESPACE, name, {"app": name.rsplit("-", 1)[0]}),
                            ok=(201, 409))
            await kube.patch_status(pod_path(NAMESPACE, name), running_status(ip))

        async def pool(backend: str) -> None:
            await kube.call("POST", pool_path(NAMESPACE), pool_body(backend, backend, backend), ok=(201, 409))
        await run_many(pods, member, 32, "pods created and Ready")
        await run_many(backends, pool, 32, "TargetPools created")
        setups = [Setup("single (--shards 1)", 1, 1), Setup(f"{args.shards} shards, 1 replica", args.shards, 1),
                  Setup(f"{args.shards} shards, 2 replicas", args.shards, 2)]
        for repeat in range(args.repeat):
            for index, setup in enumerate(setups):
                procs = await start_replicas(cluster, setup, args, repeat * len(setups) + index)
                try:
                    await all_in_rotation(haproxy, backends, len(pods), 120)
                    await asyncio.sleep(args.settle)
                    runs.append(await flips(kube, haproxy, procs, pods, backends, setup, args))
                finally:
                    for proc in procs:
                        await asyncio.to_thread(proc.stop)
    finally:
        await kube.close()
    return runs


def render(runs: list[Run], args: argparse.Namespace, load: tuple[float, float], total: float) -> str:
    def median(values: Sequence[float]) -> float:
        return statistics.median(values)
    setups = list(dict.fromkeys(r.setup for r in runs))
    rows: list[str] = []
    base_ceiling = 0.0
    for setup in setups:
        mine = [r for r in runs if r.setup == setup]
        rate = median([r.rate for r in mine])
        per_replica = " / ".join(f"{median([r.cpu[i] for r in mine]):.1f}" for i in range(setup.replicas))
        ceiling = median([r.per_busiest_cpu for r in mine])
        base_ceiling = base_ceiling or ceiling
        rows.append(f"| {setup.name} | {rate:.0f} ({', '.join(f'{r.rate:.0f}' for r in mine)}) | "
                    f"{median([r.wall for r in mine]):.1f} s (written in {median([r.sent_in for r in mine]):.1f} s) | "
                    f"{median([r.per_1000 for r in mine]):.2f} | {per_replica} | {ceiling:.0f} "
                    f"({ceiling / base_ceiling:.2f}x) |")
    errors = sum(r.errors for r in runs)
    return "\n".join([
        BEGIN,
        f"`bench/bench_shards.py`: {args.pools} pools of {args.pool_size} pods over one HAProxy, "
        f"{runs[0].transitions} readiness transitions per run ({args.concurrency} writes in flight, as fast as the "
        f"API server takes them), {args.repeat} runs per setup, setups alternating; medians (each run in "
        f"brackets). {'Each replica pinned to its own core (taskset). ' if args.pin else ''}"
        f"The operator on {described()}, "
        f"{os.cpu_count()} CPUs shared with the API server, etcd, HAProxy and the "
        f"load generator; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end; whole run "
        f"{total / 60:.1f} min; {errors} write errors.",
        "",
        "| setup | transitions/s achieved | first write to all in rotation | operator CPU s per 1,000 "
        "transitions (all replicas) | CPU s per replica | transitions per CPU-second of the busiest replica "
        "(vs single) |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "The achieved rate is bounded by how fast the API server takes the load's writes on this machine (the "
        "writes take about as long as the whole run), not by the operator; the last column is the operator's "
        "ceiling on this load: the transitions of the run over the CPU seconds of the busiest replica, i.e. the "
        "rate at which that replica would fill one core (derived from measured CPU, not a measured rate).",
        END,
    ])


def write_document(section: str) -> None:
    text = DOC.read_text()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)
    log(f"wrote {DOC.relative_to(REPO)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pk-shards"), help="control plane folder (wiped)")
    parser.add_argument("--pools", type=int, default=48, help="at most 64 (one LoadBalancer)")
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--transitions", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between setup and load")
    parser.add_argument("--pin", action="store_true", help="pin replica i to CPU i")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/scaling.md")
    parser.add_argument("--quick", action="store_true", help="a small run to try the script (not for the docs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pools, args.transitions, args.repeat, args.no_write = 8, 300, 1, True
    started, load_start = time.monotonic(), os.getloadavg()[0]
    args.dir = args.dir.resolve()
    fresh_cluster_dir(args.dir)
    cluster = Cluster(args.dir)
    haproxy = HAProxyProcess(args.dir / "haproxy", backends=[f"be-{j:03d}" for j in range(args.pools)])
    runs: list[Run] = []
    try:
        log(f"starting a control plane in {args.dir}")
        prepare_cluster(cluster)
        haproxy.start(timeout=30.0)
        runs = asyncio.run(phases(cluster, haproxy, args))
    finally:
        haproxy.stop()
        cluster.down()
    section = render(runs, args, (load_start, os.getloadavg()[0]), time.monotonic() - started)
    print(section)
    if not args.no_write:
        write_document(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
