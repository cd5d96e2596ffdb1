"""The Kubernetes scalability envelope (issue 10 section 3): one operator replica in a big cluster.

    .venv/bin/python bench/bench_envelope.py [--dir /tmp/pk-envelope] [--quick] [--no-write]

A fresh control plane with its own etcd in --dir, a real HAProxy with one backend per pool, and
the operator as a subprocess. The cluster holds --nodes Node objects and --pods pods: --pools
TargetPools of --pool-size running, Ready pods each (loopback addresses, HAProxy backends),
spread over --namespaces namespaces, plus filler pods no pool selects (created, never scheduled
or run: objects only, as the operator sees them through its watch), and --handlers
LifecycleHandlers, half Python, half HTTP (to a server in this process).

1. The operator starts with the first 10 pools only; --rounds rounds of --transitions readiness
   flips of their pods at --rate/s, each once the CPUs are quiet: operator CPU per 1,000
   transitions at 10 pools (the rounds' median).
2. The other pools are created; the same flips again: CPU per 1,000 transitions at all pools.
3. Idle CPU over --idle seconds (longer than the 30 s resync period).
4. Cold start: operator stopped, pool status wiped, started again: time until every pool is
   Ready with every member active. --cold-starts N repeats it (medians reported); --baseline DIR
   alternates each cold start with one of another checkout's operator (DIR/operator and
   DIR/devtools on PYTHONPATH) on the same cluster, so the two are compared side by side in one
   run; --cold-only skips phases 1 to 3 (the cluster is built, every pool made Ready, then the
   cold starts); --py-spy adds one profiled cold start per variant first (not in the medians).
Memory: the operator's VmHWM (peak RSS) and its function workers' PSS, sampled every 0.5 s
over the whole run (both operator processes, the cold start included), at their peak.
The benchmark's own CPU (the load generator and the pollers) is reported beside the operator's.

Prints a markdown section and writes it into docs/benchmarks.md (between its own markers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from bench_operator import (
    GROUP_PATH,
    LB_NAME,
    Kube,
    cpu_seconds,
    create_namespace,
    descendants,
    fresh_cluster_dir,
    log,
    memory_kib,
    pod_body,
    pod_path,
    pool_body,
    pool_path,
    prepare_cluster,
    readiness,
    ready_condition,
    running_status,
    servers_in_rotation,
    wait_until,
)
from bench_sidebyside import api_writes
from quiet import QUIET_BUSY, wait_until_quiet
from run_all import ENVELOPE_HEADING, section_of

from poolkeeper.backends.haproxy_client import HAProxyClient
from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.shipped_python import described, shipped_python

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
LABEL = "bench.poolkeeper.dev/set"
SMALL = 10  # pools in the "10 pools" measurement
QUIET_WAIT_S = 30.0  # at most, before a round of flips: 100,000 pods keep the API server busier than a small cluster
LB_BACKENDS = 64  # a LoadBalancer lists at most 64 backends (CRD): pools j use LoadBalancer j // 64
TARGET_MB, TARGET_COLD_S, TARGET_CPU_S, TARGET_RATIO = 250.0, 15.0, 1.0, 1.5


class ManyBackendsHAProxy(HAProxyProcess):
    """1,000 frontend listeners need a higher maxconn than HAProxy derives by default, and 16
    LoadBalancer objects on one HAProxy hold 16 runtime-API connections: more than the stats
    socket's default limit of 10 (`stats maxconn`), beyond which sessions are refused."""

    def _render(self) -> str:
        return super()._render().replace("global\n", "global\n    maxconn 8000\n    stats maxconn 200\n", 1)


@dataclass
class Layout:
    namespaces: list[str]
    pools: list[tuple[str, str, str]]  # (namespace, pool, backend)
    members: list[tuple[str, str, str, str]]  # (namespace, pod, pool, ip)
    fillers: list[tuple[str, str, str]]  # (namespace, pod, node)
    nodes: list[str]


def layout(args: argparse.Namespace) -> Layout:
    namespaces = [f"env-{i:03d}" for i in range(args.namespaces)]
    pools = [(namespaces[j % len(namespaces)], f"pool-{j:04d}", f"be_{j:04d}") for j in range(args.pools)]
    members = [(ns, f"{pool}-{i:02d}", pool, f"127.{100 + j // 250}.{j % 250}.{i + 1}")
               for j, (ns, pool, _) in enumerate(pools) for i in range(args.pool_size)]
    nodes = [f"node-{i:04d}" for i in range(args.nodes)]
    fillers = [(namespaces[k % len(namespaces)], f"filler-{k:06d}", nodes[k % len(nodes)])
               for k in range(max(0, args.pods - len(members)))]
    return Layout(namespaces, pools, members, fillers, nodes)


# ----------------------------------------------------------------------------- measuring
def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def counter_total(text: str, name: str) -> float:
    """The sum over labels of one Prometheus counter in a /metrics answer."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class MemorySampler:
    """Peak operator VmHWM and peak sum of its children's PSS, over every operator process."""

    operator: OperatorProcess
    hwm_kib: int = 0
    children_kib: int = 0
    children: int = 0
    total_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        proc = self.operator.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            hwm = memory_kib(proc.pid).get("VmHWM", 0)
            kids = descendants(proc.pid)
        except OSError:
            return
        pss = sum(pss_kib(c) for c in kids)
        self.hwm_kib = max(self.hwm_kib, hwm)
        self.children_kib = max(self.children_kib, pss)
        self.children = max(self.children, len(kids))
        self.total_kib = max(self.total_kib, hwm + pss)

    def run(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def start(self) -> None:
        threading.Thread(target=self.run, name="memory-sampler", daemon=True).start()

    def stop(self) -> None:
        self.sample()
        self._stop.set()


async def run_many(items: Sequence[Any], worker: Callable[[Any], Awaitable[None]], concurrency: int,
                   what: str) -> float:
    """Apply `worker` to every item, `concurrency` at a time; returns the seconds it took."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    started, errors = time.monotonic(), []

    async def one() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            for attempt in range(5):
                try:
                    await worker(item)
                    break
                except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                    if attempt == 4:
                        errors.append(f"{item}: {exc}")
                    await asyncio.sleep(0.5 * (attempt + 1))

    async def progress() -> None:
        while True:
            await asyncio.sleep(30)
            log(f"  {what}: {len(items) - queue.qsize()} of {len(items)}")

    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(one() for _ in range(concurrency)))
    finally:
        reporter.cancel()
    if errors:
        raise RuntimeError(f"{len(errors)} {what} failed, e.g. {errors[0]}")
    took = time.monotonic() - started
    log(f"{what}: {len(items)} in {took:.1f} s ({len(items) / took:.0f}/s)")
    return took


# ----------------------------------------------------------------------------- building the cluster
async def populate(kube: Kube, lay: Layout, args: argparse.Namespace) -> dict[str, float]:
    for namespace in lay.namespaces:
        await create_namespace(kube, namespace)

    async def node(name: str) -> None:
        await kube.call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": {"kubernetes.io/hostname": name, LABEL: "envelope"}}}, ok=(201, 409))

    async def member(item: tuple[str, str, str, str]) -> None:
        namespace, name, pool, ip = item
        await kube.call("POST", pod_path(namespace), pod_body(namespace, name, {"app": pool}), ok=(201, 409))
        await kube.patch_status(pod_path(namespace, name), running_status(ip))

    async def filler(item: tuple[str, str, str]) -> None:
        namespace, name, node_name = item
        body = pod_body(namespace, name, {"app": f"filler-{hash(name) % 20}", "tier": "filler"})
        body["spec"]["nodeName"] = node_name
        await kube.call("POST", pod_path(namespace), body, ok=(201, 409))

    took = {"nodes": await run_many(lay.nodes, node, args.concurrency, "Nodes created")}
    took["members"] = await run_many(lay.members, member, args.concurrency, "pool pods created and Ready")
    took["fillers"] = await run_many(lay.fillers, filler, args.concurrency, "filler pods created")
    return took


async def create_pools(kube: Kube, pools: Sequence[tuple[str, str, str]], concurrency: int) -> float:
    async def one(item: tuple[str, str, str]) -> None:
        namespace, pool, backend = item
        body = pool_body(pool, pool, backend, {LABEL: "envelope"})
        body["spec"]["backend"]["haproxy"]["loadBalancerRef"]["name"] = f"{LB_NAME}-{int(pool[5:]) // LB_BACKENDS}"
        await kube.call("POST", pool_path(namespace), body, ok=(201, 409))
    return await run_many(pools, one, concurrency, "TargetPools created")


async def create_handlers(kube: Kube, lay: Layout, args: argparse.Namespace, hook_url: str) -> None:
    """Handlers on pools SMALL.. (the flipped pools have none: the CPU measured is the pool path)."""
    targets = lay.pools[SMALL:SMALL + args.handlers]

    async def one(index_item: tuple[int, tuple[str, str, str]]) -> None:
        index, (namespace, pool, _) = index_item
        function = ({"type": "Python", "python": {"handler": "envelope.handle"}} if index % 2 == 0
                    else {"type": "HTTP", "http": {"url": hook_url}})
        body = {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LifecycleHandler",
                "metadata": {"name": f"lh-{pool}"},
                "spec": {"poolRef": {"name": pool}, "events": ["up", "down"], "function": function}}
        await kube.call("POST", f"{GROUP_PATH}/namespaces/{namespace}/lifecyclehandlers", body, ok=(201, 409))
    await run_many(list(enumerate(targets)), one, args.concurrency, "LifecycleHandlers created")


async def pools_ready(kube: Kube, pools: Sequence[tuple[str, str, str]], size: int) -> tuple[int, int]:
    """(pools Ready with every member active, pools listed) among `pools`."""
    wanted = {(ns, name) for ns, name, _ in pools}
    items = (await kube.get(f"{GROUP_PATH}/targetpools?labelSelector={LABEL}%3Denvelope"))["items"]
    ready = sum(1 for p in items if (p["metadata"]["namespace"], p["metadata"]["name"]) in wanted
                and ready_condition(p) and (p.get("status") or {}).get("active") == size)
    return ready, len(wanted)


async def wait_pools_ready(kube: Kube, pools: Sequence[tuple[str, str, str]], size: int, limit: float,
                           poll: float = 0.5) -> float:
    started = time.monotonic()

    async def done() -> bool:
        ready, wanted = await pools_ready(kube, pools, size)
        return ready == wanted
    await wait_until(done, limit, f"{len(pools)} pools Ready with {size} active", interval=poll)
    return time.monotonic() - started


async def watch_pools_ready(kube: Kube, pools: Sequence[tuple[str, str, str]], size: int, limit: float) -> float:
    """Seconds until every pool of `pools` is Ready with `size` active, seen through one list and
    then a watch: an observer that re-lists 1,000 pools with their status 4 times a second would
    load the API server the cold start writes those statuses to."""
    started = time.monotonic()
    wanted = {(ns, name) for ns, name, _ in pools}
    path = f"{GROUP_PATH}/targetpools"
    query = f"labelSelector={LABEL}%3Denvelope"
    listing = await kube.get(f"{path}?{query}")
    ready = {key for p in listing["items"] if (key := (p["metadata"]["namespace"], p["metadata"]["name"])) in wanted
             and ready_condition(p) and (p.get("status") or {}).get("active") == size}
    version = listing["metadata"]["resourceVersion"]
    deadline = started + limit
    while ready != wanted:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"timed out after {limit:g} s: {len(ready)} of {len(wanted)} pools Ready")
        url = f"{kube.server}{path}?{query}&watch=1&allowWatchBookmarks=true&resourceVersion={version}" \
              f"&timeoutSeconds={max(1, int(remaining))}"
        async with kube.session.get(url, timeout=aiohttp.ClientTimeout(total=remaining + 5)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"watching TargetPools: HTTP {resp.status}")
            async for line in resp.content:
                event = json.loads(line)
                obj = event.get("object") or {}
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if event.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
                    continue
                key = (obj["metadata"].get("namespace"), obj["metadata"].get("name"))
                if event["type"] != "DELETED" and ready_condition(obj) and \
                        (obj.get("status") or {}).get("active") == size:
                    if key in wanted:
                        ready.add(key)
                else:
                    ready.discard(key)
                if ready == wanted:
                    break
    return time.monotonic() - started


# ----------------------------------------------------------------------------- phases
WRITES_KEY = "writes: "  # a flips result's API write counts, by "VERB resource[/subresource]"
OWN_WRITES = "PATCH pods/status"


def written_by(counts: dict[str, Any], per: float = 1.0) -> str:
    """The API writes in a flips result, most first: "PATCH targetpools/status 0.10, POST events 0.05"."""
    writes = sorted(((k.removeprefix(WRITES_KEY), v / per) for k, v in counts.items()
                     if k.startswith(WRITES_KEY) and v > 0), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.2f}" if per != 1.0 else f"{k} {v:.0f}" for k, v in writes)


async def flip_rounds(kube: Kube, operator: OperatorProcess, haproxy: HAProxyProcess, lay: Layout,
                      args: argparse.Namespace, label: str) -> dict[str, Any]:
    """args.rounds rounds of `flips`, each once the machine is quiet (the tail of creating 990 pools,
    or of the round before, is not counted): CPU per 1,000 is the rounds' median, the rest summed."""
    rounds = []
    for index in range(args.rounds):
        busy = await asyncio.to_thread(wait_until_quiet, QUIET_BUSY, QUIET_WAIT_S, log)
        log(f"{label}, round {index + 1} of {args.rounds}: the CPUs were {busy:.0%} busy before it")
        rounds.append(await flips(kube, operator, haproxy, lay, args, f"{label} round {index + 1}"))
    summed: dict[str, Any] = {key: sum(r.get(key, 0.0) for r in rounds) for key in {k for r in rounds for k in r}}
    summed["per_1000"] = statistics.median(r["per_1000"] for r in rounds)
    summed["rounds"] = [r["per_1000"] for r in rounds]
    return summed


async def flips(kube: Kube, operator: OperatorProcess, haproxy: HAProxyProcess, lay: Layout,
                args: argparse.Namespace, label: str) -> dict[str, float]:
    """Readiness flips of the first SMALL pools' pods at args.rate; CPU of the operator and of us."""
    pods = [m for m in lay.members if m[2] in {p for _, p, _ in lay.pools[:SMALL]}]
    state = {m[1]: True for m in pods}
    spy = None
    if args.py_spy:  # a sampling profile of the operator over the flips (collapsed stacks, flamegraph.pl's input)
        spy = await asyncio.create_subprocess_exec(
            args.py_spy, "record", "-p", str(operator.pid), "-r", "250", "--format", "raw",
            "-o", str(args.dir / f"profile-{label.replace(' ', '-')}.txt"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.sleep(1.0)
    metrics0 = await asyncio.to_thread(operator.metrics)
    writes0 = await api_writes(kube)
    cpu0, own0, wall0 = cpu_seconds(operator.pid), process_cpu(), time.monotonic()
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.1
    tasks = []
    errors = 0

    async def send(namespace: str, name: str, ready: bool) -> None:
        nonlocal errors
        try:
            await kube.patch_status(pod_path(namespace, name), {"status": {"conditions": readiness(ready)}})
        except (RuntimeError, aiohttp.ClientError, TimeoutError):
            errors += 1

    for i in range(args.transitions):
        pause = start + i / args.rate - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)
        namespace, name, _, _ = pods[i % len(pods)]
        state[name] = not state[name]
        tasks.append(asyncio.create_task(send(namespace, name, state[name])))
    await asyncio.gather(*tasks)
    sent = time.monotonic() - wall0
    # back to all Ready, then wait until HAProxy agrees (so every transition was processed)
    for namespace, name, _, _ in pods:
        if not state[name]:
            await send(namespace, name, True)
    client = HAProxyClient(haproxy.admin_endpoint)
    try:
        backends = [b for _, _, b in lay.pools[:SMALL]]

        async def all_in() -> bool:
            return bool(await servers_in_rotation(client, backends) == len(pods))
        await wait_until(all_in, 120, f"{len(pods)} servers back in rotation", interval=0.05)
    finally:
        await client.close()
    cpu, own, wall = cpu_seconds(operator.pid) - cpu0, process_cpu() - own0, time.monotonic() - wall0
    metrics1 = await asyncio.to_thread(operator.metrics)
    counts = {name: counter_total(metrics1, f"poolkeeper_{name}_total")
              - counter_total(metrics0, f"poolkeeper_{name}_total") for name in ("reconciles", "backend_actions")}
    total = args.transitions + sum(1 for v in state.values() if not v)  # the flips and the writes back to Ready
    writes = {k: v - writes0.get(k, 0.0) for k, v in (await api_writes(kube)).items()}
    writes[OWN_WRITES] = writes.get(OWN_WRITES, 0.0) - (total - errors)  # the benchmark's own writes that landed
    counts.update({f"{WRITES_KEY}{k}": v for k, v in writes.items() if v > 0})
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        await asyncio.wait_for(spy.wait(), 30)
    log(f"{label}: {total} transitions in {sent:.1f} s, operator CPU {cpu:.2f} s "
        f"({cpu / total * 1000:.2f} s per 1,000), benchmark CPU {own:.2f} s, {errors} write errors, "
        f"{counts['reconciles']:.0f} reconciles, {counts['backend_actions']:.0f} HAProxy actions, "
        f"API writes besides the flips: {written_by(counts) or 'none'}")
    return {"transitions": total, "cpu": cpu, "per_1000": cpu / total * 1000, "own_cpu": own, "wall": wall,
            "sent_in": sent, "errors": errors, **counts}


async def wipe_status(kube: Kube, pools: Sequence[tuple[str, str, str]], concurrency: int) -> None:
    async def one(item: tuple[str, str, str]) -> None:
        namespace, pool, _ = item
        await kube.patch_status(pool_path(namespace, pool), {"status": None}, merge=True)
    await run_many(pools, one, concurrency, "pool statuses wiped")


async def hook_server() -> tuple[web.AppRunner, str, list[int]]:
    calls = [0]

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        calls[0] += 1
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/hook", calls


async def create_load_balancers(kube: Kube, haproxy: ManyBackendsHAProxy) -> None:
    """One HAProxy, several LoadBalancer objects: pools j use LoadBalancer j // LB_BACKENDS."""
    for index in range(0, len(haproxy.backends), LB_BACKENDS):
        await kube.create(f"{GROUP_PATH}/loadbalancers", {
            "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer",
            "metadata": {"name": f"{LB_NAME}-{index // LB_BACKENDS}"},
            "spec": {"type": "HAProxy", "haproxy": {"endpoint": haproxy.admin_endpoint, "backends": [
                {"name": b} for b in haproxy.backends[index:index + LB_BACKENDS]]},
                "allowedTargetCIDRs": ["127.0.0.0/8"]}})


def on_fresh_cluster(args: argparse.Namespace, lay: Layout,
                     body: Callable[[Cluster, ManyBackendsHAProxy], Coroutine[Any, Any, T]]) -> T:
    """`body` run on a fresh control plane in args.dir and one HAProxy with a backend per pool of `lay`."""
    fresh_cluster_dir(args.dir)
    cluster = Cluster(args.dir)
    haproxy = ManyBackendsHAProxy(args.dir / "haproxy", backends=[b for _, _, b in lay.pools])
    try:
        log(f"starting a control plane in {args.dir}")
        prepare_cluster(cluster)
        haproxy.start(timeout=60.0)
        return asyncio.run(body(cluster, haproxy))
    finally:
        haproxy.stop()
        cluster.down()


async def phases(cluster: Cluster, haproxy: HAProxyProcess, operator: OperatorProcess, sampler: MemorySampler,
                 lay: Layout, args: argparse.Namespace) -> dict[str, Any]:
    kube = Kube(cluster.kubeconfig)
    runner, hook_url, calls = await hook_server()
    out: dict[str, Any] = {"hook_url": hook_url}
    try:
        await create_load_balancers(kube, haproxy)
        out["populate"] = await populate(kube, lay, args)
        await create_pools(kube, lay.pools[:SMALL], args.concurrency)
        await create_handlers(kube, lay, args, hook_url)
        await asyncio.to_thread(operator.start, False)
        sampler.start()
        await asyncio.to_thread(operator.wait_ready, 300.0)
        out["first_ready"] = await wait_pools_ready(kube, lay.pools[:SMALL], args.pool_size, 300)
        log(f"operator up: {SMALL} pools Ready after {time.monotonic() - operator.spawned_at:.1f} s")
        if not args.cold_only:
            await asyncio.sleep(2)
            out["small"] = await flip_rounds(kube, operator, haproxy, lay, args, f"{SMALL} pools")
        started = time.monotonic()
        cpu0 = cpu_seconds(operator.pid)
        await create_pools(kube, lay.pools[SMALL:], args.concurrency)
        await wait_pools_ready(kube, lay.pools, args.pool_size, 1200, poll=1.0)
        out["scale_up"] = {"wall": time.monotonic() - started, "cpu": cpu_seconds(operator.pid) - cpu0}
        log(f"all {len(lay.pools)} pools Ready {out['scale_up']['wall']:.1f} s after their creation began")
        if not args.cold_only:
            await asyncio.sleep(5)
            out["large"] = await flip_rounds(kube, operator, haproxy, lay, args, f"{len(lay.pools)} pools")
            cpu0, own0 = cpu_seconds(operator.pid), process_cpu()
            await asyncio.sleep(args.idle)
            out["idle"] = {"seconds": args.idle, "cpu": cpu_seconds(operator.pid) - cpu0, "own": process_cpu() - own0}
            log(f"idle: operator {out['idle']['cpu']:.2f} s CPU over {args.idle:g} s")
        out["memory_before_cold"] = memory_kib(operator.pid)
        out["colds"] = await cold_starts(kube, operator, lay, args)
        mine = [c for c in out["colds"] if c["variant"] == THIS and not c["profiled"]]
        out["cold"] = {"seconds": statistics.median(c["seconds"] for c in mine),
                       "own": statistics.median(c["own"] for c in mine)}
        await asyncio.sleep(2)
        out["memory_after_cold"] = memory_kib(operator.pid)
        out["hook_calls"] = calls[0]
    finally:
        await runner.cleanup()
        await kube.close()
    return out


THIS, BASE = "this", "baseline"


def variants(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """The operator code of each cold start: this checkout's, and --baseline's if given."""
    return [(THIS, None), *([(BASE, args.baseline)] if args.baseline else [])]


async def start_from(operator: OperatorProcess, source: Path | None) -> None:
    """Start the operator from another checkout's code (`source`), or from this one's (None)."""
    if source is not None:  # ahead of the venv's editable install of this checkout
        os.environ["PYTHONPATH"] = f"{source / 'operator'}:{source / 'devtools'}"
    else:
        os.environ.pop("PYTHONPATH", None)
    try:
        await asyncio.to_thread(operator.start, False)
    finally:
        os.environ.pop("PYTHONPATH", None)


async def cold_start(kube: Kube, operator: OperatorProcess, lay: Layout, args: argparse.Namespace,
                     variant: tuple[str, Path | None], profile: bool) -> dict[str, Any]:
    """Stop the operator, wipe every pool's status, start `variant`'s operator: seconds until
    every pool is Ready with every member active, until /readyz, and the new process's memory."""
    name, source = variant
    await asyncio.to_thread(operator.stop)
    await wipe_status(kube, lay.pools, args.concurrency)
    await asyncio.sleep(0.5)
    own0 = process_cpu()
    sampler = MemorySampler(operator)
    await start_from(operator, source)
    spawned = operator.spawned_at
    sampler.start()
    spy = None
    if profile:
        spy = await asyncio.create_subprocess_exec(
            args.py_spy, "record", "-p", str(operator.pid), "-r", "200", "--nonblocking", "--format", "raw",
            "-o", str(args.dir / f"profile-cold-{name}-{operator.starts}.txt"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    readyz: list[float] = []

    async def watch_readyz() -> None:
        await wait_until(lambda: asyncio.to_thread(operator.ready_once), 600, "/readyz", interval=0.05)
        readyz.append(time.monotonic() - spawned)
    watcher = asyncio.create_task(watch_readyz())
    try:
        if args.cold_poll > 0:
            await wait_pools_ready(kube, lay.pools, args.pool_size, 600, poll=args.cold_poll)
        else:
            await watch_pools_ready(kube, lay.pools, args.pool_size, 600)
        seconds, own = time.monotonic() - spawned, process_cpu() - own0
        await asyncio.wait_for(watcher, 30)
    finally:
        watcher.cancel()
    cpu = cpu_seconds(operator.pid)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        await asyncio.wait_for(spy.wait(), 60)
    await asyncio.sleep(2)
    sampler.stop()
    result = {"variant": name, "profiled": profile, "seconds": seconds, "readyz": readyz[0] if readyz else None,
              "cpu": cpu, "own": own, "hwm_mb": sampler.hwm_kib * 1024 / 1e6,
              "workers_mb": sampler.children_kib * 1024 / 1e6, "total_mb": sampler.total_kib * 1024 / 1e6,
              "load": os.getloadavg()[0], "log": str(operator.log_path)}
    log(f"cold start ({name}{', profiled' if profile else ''}): every pool Ready {seconds:.1f} s after the "
        f"process was spawned (/readyz {result['readyz'] or 0:.1f} s), operator CPU {cpu:.1f} s, memory peak "
        f"{result['total_mb']:.0f} MB ({result['hwm_mb']:.0f} + {result['workers_mb']:.0f}), load {result['load']:.1f}")
    return result


async def cold_starts(kube: Kube, operator: OperatorProcess, lay: Layout,
                      args: argparse.Namespace) -> list[dict[str, Any]]:
    """--cold-starts rounds; with --baseline each round runs both variants, in alternating order."""
    out = []
    if args.py_spy:
        for variant in variants(args):
            out.append(await cold_start(kube, operator, lay, args, variant, profile=True))
    for index in range(args.cold_starts):
        order = variants(args)
        for variant in order if index % 2 == 0 else order[::-1]:
            out.append(await cold_start(kube, operator, lay, args, variant, profile=False))
    return out


def cold_table(colds: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Medians per variant of the cold starts (profiled ones left out), and each run."""
    rows = ["| operator | cold starts | to every pool Ready (median) | to /readyz | operator CPU | memory peak "
            "(VmHWM + workers' PSS) | each run (s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, _ in variants(args):
        runs = [c for c in colds if c["variant"] == name and not c["profiled"]]
        if not runs:
            continue
        med = {k: statistics.median(c[k] or 0.0 for c in runs) for k in ("seconds", "readyz", "cpu", "total_mb",
                                                                          "hwm_mb", "workers_mb")}
        label = "this checkout" if name == THIS else f"baseline ({args.baseline})"
        each = ", ".join(f"{c['seconds']:.1f}" for c in runs)
        rows.append(f"| {label} | {len(runs)} | {med['seconds']:.1f} s | {med['readyz']:.1f} s | {med['cpu']:.1f} s "
                    f"| {med['total_mb']:.0f} MB ({med['hwm_mb']:.0f} + {med['workers_mb']:.0f}) | "
                    f"{each} |")
    loads = ", ".join(f"{c['load']:.1f}" for c in colds if not c["profiled"])
    return "\n".join([*rows, "", f"Load average (1 min) after each cold start: {loads}."])


# ----------------------------------------------------------------------------- report
def render(out: dict[str, Any], sampler: MemorySampler, lay: Layout, args: argparse.Namespace,
           load: tuple[tuple[float, ...], tuple[float, ...]], total: float, api_cpu: dict[str, float]) -> str:
    if args.cold_only:
        return "\n".join([
            f"Cold starts at {len(lay.members) + len(lay.fillers):,} pods, {len(lay.nodes):,} Nodes, "
            f"{len(lay.pools):,} pools, {args.handlers} LifecycleHandlers (load average {load[0][0]:.1f} at the "
            f"start, {load[1][0]:.1f} at the end; whole run {total / 60:.1f} min):", "",
            cold_table(out["colds"], args), ""])
    small, large = out["small"], out["large"]
    ratio = large["per_1000"] / small["per_1000"] if small["per_1000"] else float("inf")
    mb = sampler.total_kib * 1024 / 1e6
    cold = out["cold"]["seconds"]
    idle = out["idle"]["cpu"] / out["idle"]["seconds"]
    pods = len(lay.members) + len(lay.fillers)
    full = args.pods >= 100_000 and args.nodes >= 5_000 and args.pools >= 1_000
    size = ("the full size of issue 10" if full else "**a reduced size** (not the issue's full 100,000 pods / "
            "5,000 Nodes / 1,000 pools)")
    def each(rounds: dict[str, Any]) -> str:
        return f"{len(rounds['rounds'])} round{'s' if len(rounds['rounds']) > 1 else ''}: " + ", ".join(
            f"{r:.2f}" for r in rounds["rounds"])
    rows = [
        ("operator CPU per 1,000 transitions, 10 pools (median of the rounds)",
         f"{small['per_1000']:.2f} s ({small['transitions']} transitions at {args.rate:g}/s in {each(small)})",
         f"<= {TARGET_CPU_S:g} s", small["per_1000"] <= TARGET_CPU_S),
        (f"operator CPU per 1,000 transitions, {len(lay.pools):,} pools (median of the rounds)",
         f"{large['per_1000']:.2f} s ({large['transitions']} transitions in {each(large)})",
         f"<= {TARGET_CPU_S:g} s", large["per_1000"] <= TARGET_CPU_S),
        (f"ratio {len(lay.pools):,} pools / 10 pools", f"{ratio:.2f}x", f"<= {TARGET_RATIO:g}x",
         ratio <= TARGET_RATIO),
        ("memory at peak: operator VmHWM + function workers' PSS",
         f"{mb:.0f} MB ({sampler.hwm_kib * 1024 / 1e6:.0f} + {sampler.children_kib * 1024 / 1e6:.0f} MB, "
         f"{sampler.children} worker processes at most)", f"<= {TARGET_MB:g} MB", mb <= TARGET_MB),
        ("cold start to every pool Ready (status wiped, HAProxy keeps its servers), median of "
         f"{args.cold_starts}", f"{cold:.1f} s",
         f"<= {TARGET_COLD_S:g} s", cold <= TARGET_COLD_S),
        (f"idle CPU (over {out['idle']['seconds']:g} s, a resync period included)",
         f"{idle * 100:.2f}% of a core", "near zero", idle < 0.02),
    ]
    verdict = {True: "met", False: "**missed**"}
    table = "\n".join(f"| {a} | {b} | {c} | {verdict[d]} |" for a, b, c, d in rows)
    poller = (f"it lists every pool every {args.cold_poll:g} s" if args.cold_poll > 0
              else "it lists the pools once, then watches them")
    observer = (f"benchmark process CPU (load generator + pollers): {small['own_cpu']:.2f} s beside the operator's "
                f"{small['cpu']:.2f} s at 10 pools, {large['own_cpu']:.2f} s beside {large['cpu']:.2f} s at "
                f"{len(lay.pools):,} pools, {out['idle']['own']:.2f} s while idle, {out['cold']['own']:.2f} s during "
                f"the cold start ({poller})")
    return "\n".join([
        ENVELOPE_HEADING,
        "",
        f"`bench/bench_envelope.py` at {size}: {pods:,} pods ({len(lay.members):,} Ready in {len(lay.pools):,} "
        f"TargetPools of {args.pool_size} over {len(lay.namespaces)} namespaces, {len(lay.fillers):,} that no pool "
        f"selects, created unscheduled: objects only), {len(lay.nodes):,} Node objects, {args.handlers} "
        f"LifecycleHandlers ({(args.handlers + 1) // 2} Python, {args.handlers // 2} HTTP) on pools that are not "
        f"flipped, one HAProxy with {len(lay.pools):,} backends "
        f"(behind {-(-len(lay.pools) // LB_BACKENDS)} LoadBalancer objects of at most 64 backends each). "
        "A fresh control plane with its own etcd. "
        f"The operator on {described()}, "
        f"{os.cpu_count()} CPUs shared with the API server, etcd and other "
        f"work on the machine (load average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end). "
        f"Whole run {total / 60:.1f} min.",
        "",
        "| measure | value | target | |",
        "| --- | --- | --- | --- |",
        table,
        "",
        cold_table(out["colds"], args),
        "",
        f"- {observer}.",
        f"- kube-apiserver / etcd CPU over the whole run: {api_cpu.get('kube-apiserver', 0):.0f} s / "
        f"{api_cpu.get('etcd', 0):.0f} s.",
        f"- Creating the cluster: {len(lay.nodes):,} Nodes in {out['populate']['nodes']:.0f} s, "
        f"{len(lay.members):,} pool pods (create + Ready status) in {out['populate']['members']:.0f} s, "
        f"{len(lay.fillers):,} filler pods in {out['populate']['fillers']:.0f} s ({args.concurrency} requests "
        "in flight).",
        f"- Adding {len(lay.pools) - SMALL:,} pools to a running operator: every pool Ready after "
        f"{out['scale_up']['wall']:.1f} s (creation included), operator CPU {out['scale_up']['cpu']:.1f} s.",
        f"- Operator memory: VmRSS {out['memory_before_cold'].get('VmRSS', 0) / 1000:.0f} MB before the cold start, "
        f"{out['memory_after_cold'].get('VmRSS', 0) / 1000:.0f} MB after it; HTTP handler calls received: "
        f"{out['hook_calls']}.",
        f"- Per transition: {small['reconciles'] / small['transitions']:.2f} reconciles and "
        f"{small['backend_actions'] / small['transitions']:.2f} HAProxy actions at 10 pools, "
        f"{large['reconciles'] / large['transitions']:.2f} and {large['backend_actions'] / large['transitions']:.2f} "
        f"at {len(lay.pools):,} pools (from the operator's metrics). API writes per transition besides the "
        f"benchmark's own pod status PATCH (the API server's `apiserver_request_total`; the operator's Lease "
        f"renewals included): {written_by(small, small['transitions']) or 'none'} at 10 pools; "
        f"{written_by(large, large['transitions']) or 'none'} at {len(lay.pools):,} pools.",
        "- Transitions: readiness flips (status PATCHes) of the pods of the first 10 pools, paced; CPU is the "
        "operator's utime + stime from /proc from the first write until HAProxy shows every server back in "
        f"rotation, per round; each round starts once the CPUs are under {QUIET_BUSY:.0%} busy (at most "
        f"{QUIET_WAIT_S:.0f} s of waiting), so the tail of creating the pools or of the round before is not counted. "
        "Memory is sampled every 0.5 s over the whole run (both operator processes).",
        "",
    ])


def write_document(section: str) -> None:
    """Replace (or append) this section of docs/benchmarks.md; the other sections stay as they are."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    old = section_of(text, ENVELOPE_HEADING)
    text = text.replace(old.strip(), section.strip()) if old else text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")
    log(f"wrote {DOC.relative_to(REPO)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pk-envelope"), help="control plane folder (wiped)")
    parser.add_argument("--pods", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=5_000)
    parser.add_argument("--pools", type=int, default=1_000)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--handlers", type=int, default=100)
    parser.add_argument("--transitions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="readiness flips per second")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --transitions per pool count, each once the machine is quiet (median reported)")
    parser.add_argument("--concurrency", type=int, default=48, help="API requests in flight while populating")
    parser.add_argument("--idle", type=float, default=35.0)
    parser.add_argument("--cold-poll", type=float, default=0.25,
                        help="how often the cold start's observer lists every pool; 0: one list, then a watch")
    parser.add_argument("--py-spy", default=None, help="path of py-spy: profile the operator during the flips "
                        "and one extra cold start per variant")
    parser.add_argument("--cold-starts", type=int, default=1, help="cold starts (per variant); medians reported")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout whose operator alternates with this one's in the cold starts")
    parser.add_argument("--cold-only", action="store_true",
                        help="only build the cluster and measure cold starts (writes nothing)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="a small run to try the script (not for the docs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pods, args.nodes, args.pools, args.namespaces, args.handlers = 2_000, 100, 80, 8, 10
        args.transitions, args.idle, args.rounds = 300, 5.0, 1
        args.no_write = True
    if args.cold_only:
        args.no_write = True
    if args.pools < SMALL:
        parser.error(f"--pools must be at least {SMALL}")
    started, load_start = time.monotonic(), os.getloadavg()
    lay = layout(args)
    args.dir = args.dir.resolve()
    if args.dir.exists():
        Cluster(args.dir).down()
        shutil.rmtree(args.dir)
    cluster = Cluster(args.dir)
    haproxy = ManyBackendsHAProxy(args.dir / "haproxy", backends=[b for _, _, b in lay.pools])
    handlers = args.dir / "handlers"
    operator = OperatorProcess(cluster.kubeconfig, args.dir / "logs", handlers_dir=handlers, python=shipped_python(),
                               extra_args=("--http-allowed-cidrs", "127.0.0.0/8"))
    sampler = MemorySampler(operator)
    api_cpu: dict[str, float] = {}
    try:
        log(f"starting a control plane in {args.dir}")
        prepare_cluster(cluster)
        handlers.mkdir(parents=True, exist_ok=True)
        (handlers / "envelope.py").write_text("def handle(event, context):\n    return None\n")
        haproxy.start(timeout=60.0)  # a frontend port taken meanwhile: it moves to fresh ports itself
        out = asyncio.run(phases(cluster, haproxy, operator, sampler, lay, args))
        api_cpu = {name: cpu_seconds(pid) for name, pid in cluster.state["pids"].items()
                   if name in ("kube-apiserver", "etcd")}
    except BaseException:
        if operator.proc is not None:
            log(f"operator log tail ({operator.log_path}):\n{operator.log_tail()}")
        raise
    finally:
        sampler.stop()
        operator.stop()
        haproxy.stop()
        cluster.down()
    section = render(out, sampler, lay, args, (load_start, os.getloadavg()), time.monotonic() - started, api_cpu)
    print(section)
    if not args.no_write:
        write_document(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
