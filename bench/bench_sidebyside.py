"""Side by side on one control plane: poolkeeper, the EndpointSlice controller, a bare watch, a poller; bursts.

    .venv/bin/python bench/bench_sidebyside.py [--dir /tmp/pk-sidebyside] [--no-write] [--quick]
        [--variants plain,checks,handler,checking]
    .venv/bin/python bench/bench_sidebyside.py --only refill [--refills 3] [--big 10000]   # that point alone

One fresh control plane (etcd, kube-apiserver, kube-controller-manager with its EndpointSlice
controller at the default batch period 0), a real HAProxy and the operator as a subprocess.

1. Latency, side by side: twin pods (bound to a Node, so the EndpointSlice controller counts them)
   are flipped ready / not ready together by status PATCHes: `svc-*` are selected by a Service
   (EndpointSlice controller -> EndpointSlices), `pk-*` by a TargetPool on an HAProxy backend
   (poolkeeper -> server in / out of rotation). In the same run a bare pod watch (the floor) and a
   polling peer (lists the `pk-*` pods every second, sets its own HAProxy backend through the
   runtime API) see the same `pk-*` writes. Every time is counted from the moment the PATCH was
   sent. Each observer runs in its own process and reports its CPU. --rounds times (every variant
   once per round, medians reported) at 50/s and 500/s, plain,
   with health checks on the pool and with an HTTP LifecycleHandler on it. At 50/s real HTTP
   traffic runs through HAProxy to real servers on the pods' addresses: the user-visible figure is
   a Ready write -> the first request that server answers.
2. The highest sustained transition rate at which poolkeeper's p99 stays under 50 ms.
3. Bursts: 1,000 pods of one pool turn Ready within one second; the same 1,000 deleted at once;
   10,000 servers in one backend after HAProxy restarted empty.

Prints a markdown section (progress on stderr) and writes it into docs/benchmarks.md, keeping the
other sections. Only 127.0.0.0/8 addresses are contacted; the Service's pods get documentation
addresses (nothing routes to them: this control plane has no kube-proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from bench_operator import (
    GROUP_PATH,
    LB_NAME,
    Flip,
    Kube,
    Observer,
    analyse,
    censored_percentile,
    cpu_seconds,
    create_namespace,
    environment,
    fresh_cluster_dir,
    in_rotation,
    log,
    ms,
    now_rfc3339,
    percentile,
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
from run_all import DOC, SIDEBYSIDE_HEADING, replace_section

from poolkeeper.backends.haproxy_client import HAProxyClient
from poolkeeper.core.naming import member_name, pool_prefix
from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.ports import free_port
from poolkeeper_dev.shipped_python import shipped_python
from poolkeeper_dev.traffic import LoadGenerator

REPO = Path(__file__).resolve().parent.parent
POOL, SERVICE = "pk", "svc"  # the pool's pods are labelled app=pk, the Service's app=svc
POLL_PREFIX = "poll-"
TARGET_ES_RATIO, TARGET_WATCH_RATIO = 0.5, 2.0
TARGET_BURST_S, TARGET_BIG_S, TARGET_RATE, SUSTAINED_P99_S = 2.0, 5.0, 500.0, 0.050
RATES = (50.0, 500.0)
UV_RATE = 10.0  # the user-visible pool: few pods, so traffic reaches a newly ready one soon
CONTROL = ("kube-apiserver", "etcd", "kube-controller-manager")
VARIANTS = {"plain": "no health checks, no handler",
            "checks": "health checks (the CRD's defaults: every 2 s, rise 2, fall 3)",
            "handler": "an HTTP LifecycleHandler (up, draining, down) to a local receiver"}
# the checks variant as it was before initialState Up became the default: with --variants, or in a full
# run's user-visible part only
EXTRA_VARIANTS = {"checking": "health checks as in *checks*, with `initialState: Checking` (a new server "
                              "waits for its first passing check)"}
CHECKED = ("checks", "checking")
ALL_VARIANTS = {**VARIANTS, **EXTRA_VARIANTS}


# ----------------------------------------------------------------------------- helper processes
Args = tuple[Any, ...]


class Helper(Protocol):
    def start(self) -> None: ...
    def stop(self) -> dict[str, Any]: ...
    def kill(self) -> None: ...


class Child:
    """A spawned process `target(*args, started, stop, conn)` that sends one result dict when stopped."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.started, self.stop_event = ctx.Event(), ctx.Event()
        self.recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=target, name=name, daemon=True,
                                   args=(*args, self.started, self.stop_event, send))

    def start(self) -> None:
        self.process.start()
        if not self.started.wait(60):
            raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        if not self.recv.poll(60):
            raise RuntimeError(f"{self.name} sent no result")
        result: dict[str, Any] = self.recv.recv()
        self.process.join(10)
        return result

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


async def until_stopped(stop: EventType) -> None:
    """Wait for the parent's stop signal (a process-shared event) without blocking the loop."""
    await asyncio.to_thread(stop.wait)


def ready_of(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def slice_members(item: dict[str, Any]) -> dict[str, bool]:
    """pod name -> ready for one EndpointSlice (`ready` unset means ready, as the API says)."""
    out = {}
    for endpoint in item.get("endpoints") or []:
        ref = endpoint.get("targetRef") or {}
        if ref.get("kind") == "Pod":
            out[ref["name"]] = (endpoint.get("conditions") or {}).get("ready") is not False
    return out


def watcher_main(kubeconfig: str, path: str, slices: bool, started: EventType, stop: EventType,
                 conn: Connection) -> None:
    """A watch of pods (bare watch: the floor) or of EndpointSlices, in its own process.

    Records (arrival time, pod, 0 if ready else 1) whenever a pod's readiness as this watch sees it
    changes; 0/1 are HAProxy-like admin states so bench_operator.analyse can match them.
    """
    asyncio.run(_watch(kubeconfig, path, slices, started, stop, conn))


async def _watch(kubeconfig: str, path: str, slices: bool, started: EventType, stop: EventType,
                 conn: Connection) -> None:
    kube = Kube(Path(kubeconfig))
    cpu_before = process_cpu()
    changes: list[tuple[float, str, int]] = []
    members: dict[str, dict[str, bool]] = {}  # object name -> pod -> ready
    state: dict[str, bool] = {}
    events = 0

    def apply(kind: str, obj: dict[str, Any], at: float) -> None:
        name = obj["metadata"]["name"]
        if slices:
            members[name] = {} if kind == "DELETED" else slice_members(obj)
        else:
            members[name] = {} if kind == "DELETED" else {name: ready_of(obj)}
        pods = {pod for m in members.values() for pod in m} | set(state)
        for pod in pods:
            ready = any(m.get(pod, False) for m in members.values())
            if state.get(pod) != ready:  # the listing's states too: the start of every pod's timeline
                changes.append((at, pod, 0 if ready else 1))
                state[pod] = ready

    listing = await kube.get(path)
    for item in listing["items"]:
        apply("ADDED", item, time.monotonic())
    url = f"{kube.server}{path}&watch=1&timeoutSeconds=3600&resourceVersion={listing['metadata']['resourceVersion']}"

    async def consume() -> None:
        nonlocal events
        async with kube.session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"watch {path}: HTTP {resp.status}")
            started.set()
            async for line in resp.content:
                at = time.monotonic()
                event = json.loads(line)
                events += 1
                apply(event["type"], event["object"], at)

    task = asyncio.create_task(consume())
    await asyncio.wait([task, asyncio.create_task(until_stopped(stop))], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await kube.close()
    conn.send({"changes": changes, "events": events, "cpu": process_cpu() - cpu_before})
    conn.close()


def poller_main(kubeconfig: str, path: str, socket_path: str, backend: str, port: int, period: float,
                started: EventType, stop: EventType, conn: Connection) -> None:
    """The polling peer: list the pods every `period`, put their servers in or out of rotation."""
    asyncio.run(_poll(kubeconfig, path, socket_path, backend, port, period, started, stop, conn))


async def _poll(kubeconfig: str, path: str, socket_path: str, backend: str, port: int, period: float,
                started: EventType, stop: EventType, conn: Connection) -> None:
    kube = Kube(Path(kubeconfig))
    client = HAProxyClient(f"unix://{socket_path}")
    cpu_before = process_cpu()
    known: dict[str, bool] = {}
    lists = 0
    due = time.monotonic()
    while not stop.is_set():
        commands = []
        for pod in (await kube.get(path))["items"]:
            name, ready = pod["metadata"]["name"], ready_of(pod)
            server = f"{backend}/{POLL_PREFIX}{name}"
            if name not in known:
                commands.append(f"add server {server} {pod['status']['podIP']}:{port}")
            if known.get(name) != ready:
                commands.append(f"set server {server} state {'ready' if ready else 'drain'}")
            known[name] = ready
        if commands:
            await client.execute(commands)
        lists += 1
        started.set()
        due += period
        await asyncio.to_thread(stop.wait, max(0.0, due - time.monotonic()))
    await client.close()
    await kube.close()
    conn.send({"lists": lists, "cpu": process_cpu() - cpu_before})
    conn.close()


def servers_main(addresses: list[str], port: int, receiver_port: int, started: EventType, stop: EventType,
                 conn: Connection) -> None:
    """HTTP servers on the pods' addresses (what HAProxy sends traffic and checks to) and the handler receiver.

    Records when each address answered `GET /`, and every event POSTed to the receiver.
    """
    asyncio.run(_serve(addresses, port, receiver_port, started, stop, conn))


async def _serve(addresses: list[str], port: int, receiver_port: int, started: EventType, stop: EventType,
                 conn: Connection) -> None:
    cpu_before = process_cpu()
    hits: dict[str, list[float]] = {a: [] for a in addresses}
    deliveries: list[tuple[float, str, str]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address, local_port = writer.get_extra_info("sockname")[:2]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                at = time.monotonic()
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1] if " " in lines[0] else ""
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                if local_port == receiver_port:  # a binary-mode CloudEvent: attributes in headers, data the body
                    data = json.loads(body or b"{}")
                    deliveries.append((at, headers.get("ce-subject", ""), str(data.get("to"))))
                elif target == "/":
                    hits[address].append(at)
                answer = f"{address}:{local_port}".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:  # the process is stopping: end quietly (asyncio logs a cancelled callback)
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(handle, a, port, backlog=512) for a in addresses]
    servers.append(await asyncio.start_server(handle, "127.0.0.1", receiver_port))
    started.set()
    await until_stopped(stop)
    for server in servers:
        server.close()
    conn.send({"hits": hits, "deliveries": deliveries, "cpu": process_cpu() - cpu_before})
    conn.close()


def traffic_main(url: str, rate: float, started: EventType, stop: EventType, conn: Connection) -> None:
    """Real HTTP traffic through HAProxy (poolkeeper_dev.traffic.LoadGenerator), in its own process."""
    cpu_before = process_cpu()
    load = LoadGenerator(url, connections=8, rate=rate).start(duration=3600)
    started.set()
    stop.wait()
    report = load.stop()
    conn.send({"ok": report.ok, "failed": report.failed, "failures": report.failures[:5],
               "cpu": process_cpu() - cpu_before, "elapsed": report.elapsed})
    conn.close()


# ----------------------------------------------------------------------------- the twin sets
@dataclass
class Rig:
    """One variant's twins at one rate: a namespace with a TargetPool on `backend` and a Service, and their pods.

    Each variant has its own pool from the start: changing a pool's health check replaces its servers one by
    one (each drained for the pool's deregistration delay), which would still be under way during a run.
    """

    variant: str
    rate: float
    namespace: str
    backend: str
    poll_backend: str
    uids: dict[str, str] = field(default_factory=dict)  # pk pod -> uid
    servers: dict[str, str] = field(default_factory=dict)  # pk pod -> poolkeeper's server name (read from HAProxy)
    ips: dict[str, str] = field(default_factory=dict)  # pk pod -> address
    twins: dict[str, str] = field(default_factory=dict)  # pk pod -> svc pod


def labelled(path: str, app: str) -> str:
    return f"{path}?labelSelector=app%3D{app}"


def slices_path(namespace: str) -> str:
    return labelled(f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", "x").replace(
        "app%3Dx", f"kubernetes.io%2Fservice-name%3D{SERVICE}")


async def ready_in_slices(kube: Kube, namespace: str) -> int:
    items = (await kube.get(slices_path(namespace)))["items"]
    return sum(ready for item in items for ready in slice_members(item).values())


async def create_pods(kube: Kube, pods: Sequence[tuple[str, str, dict[str, str], str, bool]],
                      concurrency: int = 32) -> dict[str, str]:
    """Create (namespace, name, labels, ip, ready) pods, Running; returns name -> uid."""
    uids: dict[str, str] = {}
    queue = list(pods)

    async def worker() -> None:
        while queue:
            namespace, name, labels, ip, ready = queue.pop()
            created = await kube.create(pod_path(namespace), pod_body(namespace, name, labels))
            uids[name] = created["metadata"]["uid"]
            await kube.patch_status(pod_path(namespace, name), running_status(ip, ready))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return uids


def targeted_pool(namespace: str, name: str, app: str, backend: str, port: int) -> tuple[str, dict[str, Any]]:
    body = pool_body(name, app, backend)
    body["spec"]["port"] = port
    return pool_path(namespace), body


def rig_names(variant: str, rate: float) -> tuple[str, str, str]:
    """Namespace, poolkeeper's HAProxy backend and the polling peer's, of one rig."""
    return f"sbs-{variant}-{int(rate)}", f"be_{variant}{int(rate)}", f"be_poll_{variant}{int(rate)}"


def pod_ip(rig_index: int, pod_index: int) -> str:
    """The address of a rig's pk pod: one /16 per rig, where the servers process listens."""
    return f"127.{20 + rig_index}.{pod_index // 250}.{pod_index % 250 + 1}"


async def make_rig(kube: Kube, variant: str, rate: float, index: int, size: int, port: int, receiver: str) -> Rig:
    rig = Rig(variant, rate, *rig_names(variant, rate))
    await create_namespace(kube, rig.namespace)
    await kube.create(f"/api/v1/namespaces/{rig.namespace}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVICE},
        "spec": {"selector": {"app": SERVICE}, "ports": [{"port": 80, "targetPort": port, "protocol": "TCP"}]}})
    path, pool = targeted_pool(rig.namespace, POOL, POOL, rig.backend, port)
    if variant in CHECKED:
        pool["spec"]["backend"]["haproxy"]["healthCheck"] = {"intervalSeconds": 2, "rise": 2, "fall": 3}
    if variant == "checking":
        pool["spec"]["backend"]["haproxy"]["healthCheck"]["initialState"] = "Checking"
    await kube.create(path, pool)
    if variant == "handler":
        await kube.create(f"{GROUP_PATH}/namespaces/{rig.namespace}/lifecyclehandlers", {
            "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LifecycleHandler", "metadata": {"name": "audit"},
            "spec": {"poolRef": {"name": POOL}, "events": ["up", "draining", "down"],
                     "function": {"type": "HTTP", "http": {"url": receiver}}}})
    doc_net = ("198.51.100", "203.0.113")[index % 2]  # the svc twins' addresses repeat across namespaces
    specs = []
    for i in range(size):
        pk, svc = f"pk-{i:03d}", f"svc-{i:03d}"
        rig.ips[pk], rig.twins[pk] = pod_ip(index, i), svc
        specs.append((rig.namespace, pk, {"app": POOL}, rig.ips[pk], True))
        specs.append((rig.namespace, svc, {"app": SERVICE}, f"{doc_net}.{i % 250 + 1}", True))
    rig.uids = {pk: uid for pk, uid in (await create_pods(kube, specs)).items() if pk in rig.ips}
    return rig


async def settled(kube: Kube, client: HAProxyClient, rig: Rig, *, rest: bool = True) -> None:
    """Wait until the pk pods that should serve (all, or those ready at rest) are in rotation (and UP with
    checks on) and ready in the slices, and nothing else is in rotation; then learn the servers' names.

    A pod that is not ready loses its server once drained (no sessions), with health checks once it has
    been unready for the deregistration delay (30 s): it is added again when ready.
    """
    size = len(rig.uids)
    serving = sum(at_rest(pod) for pod in rig.uids) if rest else size
    checks = rig.variant in CHECKED
    bases = {member_name(rig.namespace, POOL, uid): pod for pod, uid in rig.uids.items()}

    async def done() -> bool:
        (answer,) = await client.execute([f"show servers state {rig.backend}"])
        rows = [line.split(" ") for line in answer.split("\n") if len(line.split(" ")) > 13]
        mine = [r for r in rows if r[3].startswith(pool_prefix(rig.namespace, POOL))]
        up = [r for r in mine if in_rotation(int(r[6])) and (not checks or (r[5] == "2" and int(r[13]) & 0x04))]
        if len(up) != serving or sum(in_rotation(int(r[6])) for r in mine) != serving:
            return False
        if await ready_in_slices(kube, rig.namespace) != serving:
            return False
        suffix = next(name[len(base):] for name in (r[3] for r in up) for base in [name.rsplit("-", 1)[0], name]
                      if base in bases)  # the health-check variant's, or none
        rig.servers = {pod: base + suffix for base, pod in bases.items()}
        return True
    await wait_until(done, 180, f"{serving} of {size} servers in rotation and {serving} ready endpoints in "
                     f"{rig.namespace}", 0.25)


WRITES = ("POST", "PUT", "PATCH", "DELETE")


async def api_writes(kube: Kube) -> dict[str, float]:
    """The API server's own count of write requests so far, by verb and resource (`apiserver_request_total`)."""
    async with kube.session.get(f"{kube.server}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if labels.get("verb") in WRITES:
            key = f"{labels['verb']} {labels.get('resource', '?')}" + (
                f"/{labels['subresource']}" if labels.get("subresource") else "")
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


# ----------------------------------------------------------------------------- one latency run
@dataclass
class Path_:
    """One path's figures: samples from the write sent (seconds, lower bound only)."""

    name: str
    samples: list[tuple[float, bool]]
    censored: int
    negative: int
    already: int
    errors: int

    def mean(self) -> str:
        """Mean over every timed sample (lower bounds at their bound, so then itself a lower bound)."""
        if not self.samples:
            return "n/a"
        return ms((sum(v for v, _ in self.samples) / len(self.samples), self.censored > 0))

    def pct(self, q: float) -> tuple[float, bool]:
        return censored_percentile(self.samples, q) if self.samples else (float("nan"), False)


def path_figures(name: str, flips: list[Flip], changes: list[tuple[float, str, int]], end: float) -> Path_:
    timed = analyse(flips, changes, end, [])
    kept = [s for s in timed.from_send if s[0] >= 0]
    return Path_(name, kept, timed.censored, len(timed.from_send) - len(kept), timed.already, timed.errors)


def first_after(flips: list[Flip], times_of: Callable[[Flip], list[float]], end: float,
                wanted: Callable[[Flip], bool]) -> list[tuple[float, bool]]:
    """For each wanted flip: the first time in times_of(flip) after it was sent, before its pod's next write."""
    nxt: dict[int, float] = {}
    last: dict[str, Flip] = {}
    for flip in flips:
        if flip.pod in last:
            nxt[last[flip.pod].index] = flip.sent
        last[flip.pod] = flip
    out = []
    for flip in flips:
        if flip.error or not wanted(flip):
            continue
        window = nxt.get(flip.index, end)
        seen = next((t for t in times_of(flip) if flip.sent <= t <= window), None)
        out.append((window - flip.sent, True) if seen is None else (seen - flip.sent, False))
    return out


@dataclass
class Run:
    variant: str
    rate: float
    flips: int
    achieved: float
    paths: dict[str, Path_]
    cpu: dict[str, float]
    wall: float
    user_visible: list[tuple[float, bool]] = field(default_factory=list)
    handler: list[tuple[float, bool]] = field(default_factory=list)
    traffic: dict[str, Any] = field(default_factory=dict)
    poll_lists: int = 0
    pk_flips: list[Flip] = field(default_factory=list, repr=False)  # for the figures the servers report later
    end: float = 0.0
    rtt: list[float] = field(default_factory=list, repr=False)  # PATCH sent -> answered
    writes: dict[str, float] = field(default_factory=dict)  # API server writes during the run, by verb and resource
    beyond: list[float] = field(default_factory=list, repr=False)  # bare watch saw the write -> HAProxy changed
    round: int = 0  # which of --rounds (the variants take turns in each)

    @property
    def label(self) -> str:
        return f"{self.variant} #{self.round + 1}"


async def send_flips(kube: Kube, rig: Rig, transitions: int, rate: float, twins: bool) -> list[tuple[Flip, Flip]]:
    """Flip pk pods (and their svc twins at the same instant) round-robin at `rate`/s; both writes are timed."""
    names = sorted(rig.servers)
    state = {name: at_rest(name) for name in names}
    out: list[tuple[Flip, Flip]] = []
    tasks = []
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2

    async def send(flip: Flip) -> None:
        flip.sent = time.monotonic()
        try:
            body = {"status": {"conditions": readiness(flip.ready)}}
            await kube.patch_status(pod_path(rig.namespace, flip.pod), body)
            flip.answered = time.monotonic()
        except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
            flip.error = str(exc) or type(exc).__name__

    for i in range(transitions):
        due = start + i / rate
        pause = due - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)
        pod = names[i % len(names)]
        state[pod] = not state[pod]
        pk = Flip(i, pod, rig.servers[pod], state[pod], scheduled=due)
        svc = Flip(i, rig.twins[pod], rig.twins[pod], state[pod], scheduled=due)
        order = [pk, svc] if i % 2 == 0 else [svc, pk]  # neither twin always goes first
        tasks += [asyncio.create_task(send(f)) for f in (order if twins else [pk])]
        out.append((pk, svc))
    await asyncio.gather(*tasks)
    return out


async def latency_run(kube: Kube, haproxy: HAProxyProcess, operator: OperatorProcess, cluster: Cluster, rig: Rig,
                      variant: str, transitions: int, args: argparse.Namespace, *, twins: bool = True,
                      poller: bool = False, traffic: bool = False, floor: bool = False) -> Run:
    """One run: flips at rig.rate, each path seen by its own process; twins adds the EndpointSlice and
    bare-watch paths, floor the bare watch alone, poller the polling peer, traffic the load through HAProxy
    (user-visible figure)."""
    sock = str(haproxy.admin_socket)
    config = str(cluster.kubeconfig)
    pk_pods = labelled(pod_path(rig.namespace), POOL)
    helpers: dict[str, Helper] = {"poolkeeper observer": Observer(sock, rig.backend, pool_prefix(rig.namespace, POOL),
                                                                  args.poll_period)}
    if twins:
        helpers["EndpointSlice watcher"] = Child("slice-watcher", watcher_main, config, slices_path(rig.namespace),
                                                 True)
    if twins or floor:
        helpers["bare pod watcher"] = Child("pod-watcher", watcher_main, config, pk_pods, False)
    if poller:
        helpers["polling peer"] = Child("poller", poller_main, config, pk_pods, sock, rig.poll_backend, args.port,
                                        1.0)
        helpers["polling peer observer"] = Observer(sock, rig.poll_backend, POLL_PREFIX, 0.005)
    if traffic:
        helpers["traffic"] = Child("traffic", traffic_main, haproxy.frontend_url(rig.backend), args.traffic_rate)
    results: dict[str, dict[str, Any]] = {}
    try:
        for helper in helpers.values():
            helper.start()
        await asyncio.sleep(1.5)  # the poller has filled its backend, watches are connected
        pids = {"operator": operator.pid, **{c: cluster.state["pids"][c] for c in CONTROL}}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        writes_before = await api_writes(kube)
        wall = time.monotonic()
        log(f"latency {variant} at {rig.rate:g}/s: {transitions} transitions over {len(rig.servers)} pods"
            + (" and their twins" if twins else ""))
        pairs = await send_flips(kube, rig, transitions, rig.rate, twins)
        await asyncio.sleep(args.settle)
        end = time.monotonic()
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        writes = {k: v - writes_before.get(k, 0.0) for k, v in (await api_writes(kube)).items()}
        for name, helper in helpers.items():
            results[name] = await asyncio.to_thread(helper.stop)
    finally:
        for helper in helpers.values():
            helper.kill()
    await restore(kube, rig)
    pk_flips = [pk for pk, _ in pairs]
    sent = [f.sent for f in pk_flips]
    paths = {"poolkeeper": path_figures("poolkeeper", pk_flips, results["poolkeeper observer"]["changes"], end)}
    if twins:
        paths["EndpointSlice controller"] = path_figures("EndpointSlice controller", [svc for _, svc in pairs],
                                                         results["EndpointSlice watcher"]["changes"], end)
    beyond: list[float] = []
    if twins or floor:
        bare = results["bare pod watcher"]["changes"]
        paths["bare watch"] = path_figures("bare watch", [replace(f, server=f.pod) for f in pk_flips], bare, end)
        # The operator's own part: the bare watch saw the write -> HAProxy changed (API server time left out).
        beyond = analyse(pk_flips, results["poolkeeper observer"]["changes"], end,
                         [(at, pod, admin == 0) for at, pod, admin in bare]).after_watch
    if poller:
        paths["polling peer (1 s)"] = path_figures(
            "polling peer (1 s)", [replace(f, server=POLL_PREFIX + f.pod) for f in pk_flips],
            results["polling peer observer"]["changes"], end)
    cpu.update({name: r["cpu"] for name, r in results.items()})
    run = Run(variant, rig.rate, len(pk_flips), (len(sent) - 1) / (max(sent) - min(sent)), paths, cpu,
              end - wall, poll_lists=results.get("polling peer", {}).get("lists", 0), pk_flips=pk_flips, end=end,
              rtt=[f.answered - f.sent for f in pk_flips if not f.error],
              writes={k: v for k, v in sorted(writes.items(), key=lambda kv: -kv[1]) if v >= 1}, beyond=beyond)
    run.traffic = results.get("traffic", {})
    if run.traffic.get("failed"):
        log(f"  traffic: {run.traffic['failed']} requests failed, e.g. {run.traffic['failures'][:3]}")
    log("  " + "; ".join(f"{p.name} p50 {ms(p.pct(50))} p99 {ms(p.pct(99))}" for p in paths.values())
        + f"; achieved {run.achieved:.0f}/s; PATCH sent → answered p50 {ms(percentile(run.rtt, 50))} p99 "
        f"{ms(percentile(run.rtt, 99))}")
    return run


def at_rest(pod: str) -> bool:
    """Between runs even-numbered pods are ready and odd ones not: flipping them in turn keeps about half of
    a pool serving (flipping all-ready pods in turn would empty it), and every server stays registered."""
    return int(pod.rsplit("-", 1)[1]) % 2 == 0


async def restore(kube: Kube, rig: Rig) -> None:
    """Every pod of the rig back to its state at rest, so the next run starts from the same place."""
    queue = [*rig.uids, *(rig.twins.values())]

    async def worker() -> None:
        while queue:
            name = queue.pop()
            body = {"status": {"conditions": readiness(at_rest(name))}}
            await kube.patch_status(pod_path(rig.namespace, name), body)
    await asyncio.gather(*(worker() for _ in range(16)))


def attach_servers(runs: list[Run], rigs: dict[tuple[str, float], Rig], served: dict[str, Any]) -> None:
    """Fill in the user-visible and handler figures once the servers process has reported."""
    hits: dict[str, list[float]] = served["hits"]
    deliveries: list[tuple[float, str, str]] = served["deliveries"]
    by_subject: dict[tuple[str, str], list[float]] = {}
    for at, subject, to in deliveries:
        by_subject.setdefault((subject, to), []).append(at)
    def to_ready(flip: Flip) -> bool:
        return flip.ready

    for run in runs:
        rig = rigs[run.variant, run.rate]

        def served_at(flip: Flip, rig: Rig = rig) -> list[float]:
            return hits.get(rig.ips[flip.pod], [])

        def delivered_at(flip: Flip, rig: Rig = rig) -> list[float]:
            return by_subject.get((f"Pod/{rig.namespace}/{flip.pod}", "up"), [])
        if run.traffic:
            run.user_visible = first_after(run.pk_flips, served_at, run.end, to_ready)
        if run.variant == "handler":
            run.handler = first_after(run.pk_flips, delivered_at, run.end, to_ready)


# ----------------------------------------------------------------------------- sustained rate, bursts
async def sustained(kube: Kube, haproxy: HAProxyProcess, operator: OperatorProcess, cluster: Cluster, rig: Rig,
                    args: argparse.Namespace) -> list[Run]:
    """poolkeeper alone (no peers but the bare watch, no traffic): step the rate up until p99 >= 50 ms, both from
    the write sent and from the bare watch's sighting, or the sender falls behind."""
    steps = []
    client = HAProxyClient(haproxy.admin_endpoint)
    try:
        for rate in args.rates:
            await settled(kube, client, rig)
            run = await latency_run(kube, haproxy, operator, cluster, replace(rig, rate=rate), "plain",
                                    int(rate * args.step_seconds), args, twins=False, floor=True)
            steps.append(run)
            if not sustained_ok(run) and not own_part_ok(run):
                break
    finally:
        await client.close()
    return steps


def sustained_ok(run: Run, path: str = "poolkeeper") -> bool:
    """The step held: `path`'s p99 (poolkeeper's, or the bare watch's: the floor any watch-driven
    controller is held to) under SUSTAINED_P99_S, at 95 % of the rate or more."""
    if path not in run.paths:
        return False
    p99 = run.paths[path].pct(99)
    return not p99[1] and p99[0] < SUSTAINED_P99_S and run.achieved >= 0.95 * run.rate


def own_part_ok(run: Run) -> bool:
    """The same test on the operator's own part (bare watch saw the write -> HAProxy), API server time left out."""
    p99 = percentile(run.beyond, 99) if run.beyond else None
    return p99 is not None and p99 < SUSTAINED_P99_S and run.achieved >= 0.95 * run.rate


def replay(changes: list[tuple[float, str, int]], prefix: str, count: int, up: bool) -> float | None:
    """The first time the number of `prefix` servers in rotation reached `count` (up) or 0 (not up)."""
    state: dict[str, bool] = {}
    for at, name, admin in sorted(changes):
        if not name.startswith(prefix):
            continue
        state[name] = in_rotation(admin)
        inside = sum(state.values())
        if (up and inside == count) or (not up and inside == 0):
            return at
    return None


async def in_rotation_count(client: HAProxyClient, backend: str) -> int:
    return int(await servers_in_rotation(client, [backend]))


async def bursts(kube: Kube, haproxy: HAProxyProcess, args: argparse.Namespace) -> dict[str, Any]:
    namespace, backend = "sbs-burst", "be_burst"
    prefix = pool_prefix(namespace, POOL)
    await create_namespace(kube, namespace)
    await kube.create(*targeted_pool(namespace, POOL, POOL, backend, args.port))
    names = [f"b-{i:04d}" for i in range(args.burst)]
    log(f"burst: creating {args.burst} pods, Running and not ready")
    await create_pods(kube, [(namespace, n, {"app": POOL}, f"127.40.{i // 250}.{i % 250 + 1}", False)
                             for i, n in enumerate(names)])
    client = HAProxyClient(haproxy.admin_endpoint)
    out: dict[str, Any] = {}
    try:
        await asyncio.sleep(3.0)  # let the operator take in the new, not-ready members before the burst
        observer = Observer(str(haproxy.admin_socket), backend, prefix, 0.005)
        observer.start()
        try:
            sem = asyncio.Semaphore(64)
            sent: list[float] = []

            async def ready(name: str, due: float) -> None:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                async with sem:
                    sent.append(time.monotonic())
                    await kube.patch_status(pod_path(namespace, name), {"status": {"conditions": readiness(True)}})
            start = time.monotonic() + 0.1
            await asyncio.gather(*(ready(n, start + i / args.burst * 0.9) for i, n in enumerate(names)))
            out["up_span"] = max(sent) - min(sent)

            async def all_in() -> bool:
                return bool(await in_rotation_count(client, backend) == args.burst)
            await wait_until(all_in, 120, f"{args.burst} burst servers in rotation", 0.1)
            await asyncio.sleep(0.3)
            seen = (await asyncio.to_thread(observer.stop))["changes"]
        finally:
            observer.kill()
        reached = replay(seen, prefix, args.burst, up=True)
        out["up"] = None if reached is None else reached - max(sent)
        log(f"burst: {args.burst} Ready writes over {out['up_span']:.2f} s; all in rotation "
            f"{out['up'] if out['up'] is None else round(out['up'], 3)} s after the last write")

        observer = Observer(str(haproxy.admin_socket), backend, prefix, 0.005)
        observer.start()
        try:
            deleted: list[float] = []

            async def delete(name: str) -> None:
                async with sem:
                    deleted.append(time.monotonic())
                    await kube.call("DELETE", pod_path(namespace, name), {"gracePeriodSeconds": 0}, ok=(200, 202))
            await asyncio.gather(*(delete(n) for n in names))
            out["delete_span"] = max(deleted) - min(deleted)

            async def all_out() -> bool:
                return await in_rotation_count(client, backend) == 0
            await wait_until(all_out, 120, "every burst server out of rotation", 0.1)
            await asyncio.sleep(0.3)
            seen = (await asyncio.to_thread(observer.stop))["changes"]
        finally:
            observer.kill()
        gone = replay(seen, prefix, args.burst, up=False)
        out["down"] = None if gone is None else gone - max(deleted)
        log(f"burst: {args.burst} pods deleted over {out['delete_span']:.2f} s; all out of rotation "
            f"{out['down'] if out['down'] is None else round(out['down'], 3)} s after the last delete")
    finally:
        await client.close()
    return out


async def big_backend(kube: Kube, haproxy: HAProxyProcess, args: argparse.Namespace) -> dict[str, Any]:
    """args.big ready pods in one pool; HAProxy restarted empty args.refills times; each time, how long until
    every server is back (the median is the figure)."""
    namespace, backend = "sbs-big", "be_big"
    await create_namespace(kube, namespace)
    await kube.create(*targeted_pool(namespace, POOL, POOL, backend, args.port))
    log(f"big backend: creating {args.big:,} ready pods")
    created = time.monotonic()
    await create_pods(kube, [(namespace, f"g-{i:05d}", {"app": POOL}, f"127.{50 + i // 62500}.{i // 250 % 250}."
                              f"{i % 250 + 1}", True) for i in range(args.big)])
    out: dict[str, Any] = {"create": time.monotonic() - created, "refills": [], "firsts": [], "loads": []}
    client = HAProxyClient(haproxy.admin_endpoint)
    try:
        async def full() -> bool:
            return bool(await in_rotation_count(client, backend) == args.big)
        await wait_until(full, 600, f"{args.big} servers in rotation", 0.5)
        out["first_fill"] = time.monotonic() - created
        log(f"big backend: {args.big:,} pods created in {out['create']:.0f} s, all in rotation after "
            f"{out['first_fill']:.0f} s")
        for attempt in range(args.refills):
            await client.close()
            await asyncio.sleep(2.0)  # the operator's reconcile of the previous refill has settled
            log(f"big backend: restarting HAProxy (empty), {attempt + 1} of {args.refills}")
            out["loads"].append(os.getloadavg()[0])
            await asyncio.to_thread(haproxy.restart)
            restarted = time.monotonic()
            counts: list[tuple[float, int]] = []

            async def refilled(counts: list[tuple[float, int]] = counts, restarted: float = restarted) -> bool:
                count = await in_rotation_count(client, backend)
                counts.append((time.monotonic() - restarted, count))
                return bool(count == args.big)
            # Polled every 0.25 s: `show servers state` of 10,000 servers is about 1.5 MB, and a tighter loop
            # would slow the HAProxy it measures (at 50 ms HAProxy stopped answering the operator within 5 s).
            try:
                await wait_until(refilled, args.big_timeout, f"{args.big} servers back after the restart", 0.25)
                out["refills"].append(counts[-1][0])
            except RuntimeError:
                out["refills"].append(None)
            out["reached"] = max((c for _, c in counts), default=0)
            out["firsts"].append(next((t for t, c in counts if c > 0), None))
            log(f"big backend: {out['reached']:,} of {args.big:,} servers back, all after {out['refills'][-1]} s")
            if out["refills"][-1] is None:
                break
    finally:
        await client.close()
    done = [t for t in out["refills"] if t is not None]
    out["refill"] = statistics.median(done) if done and len(done) == len(out["refills"]) else None
    firsts = [t for t in out["firsts"] if t is not None]
    out["first_seen"] = statistics.median(firsts) if firsts else None
    return out


def refill_section(big: dict[str, Any], args: argparse.Namespace, load: tuple[tuple[float, ...], tuple[float, ...]],
                   elapsed: float) -> str:
    """`--only refill`: the one point, each restart's figure and the median (nothing is written)."""
    if "error" in big:
        return f"**{big['error']}**"
    refill, refill_ok = figure(big.get("refill"), TARGET_BIG_S)
    each = ", ".join("never" if t is None else f"{t:.2f} s" for t in big["refills"])
    firsts = ", ".join("never" if t is None else f"{t:.2f} s" for t in big["firsts"])
    loads = ", ".join(f"{v:.2f}" for v in big["loads"])
    return "\n".join([
        f"| {args.big:,} servers in one backend, HAProxy restarted empty → all back in rotation "
        f"(median of {len(big['refills'])}) | {refill} | ≤ {TARGET_BIG_S:g} s | {refill_ok} |",
        "",
        f"- Each restart: {each}; the first server back after: {firsts}.",
        f"- Load average (1 min) at each restart: {loads}; {load[0][0]:.2f} at the start of the run, "
        f"{load[1][0]:.2f} at the end. {args.big:,} pods created in {big['create']:.0f} s, all in rotation "
        f"{big['first_fill']:.0f} s after the first was created. Whole run {elapsed:.0f} s, {now_rfc3339()}.",
    ])


async def survive(phase: str, work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """A late phase that fails is reported in the document, not allowed to throw away the earlier ones."""
    try:
        return await work
    except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
        log(f"{phase} failed: {exc}")
        return {"error": f"{phase} failed: {str(exc)[:300]}"}


# ----------------------------------------------------------------------------- report
def figure(value: float | None, target: float) -> tuple[str, str]:
    if value is None:
        return "never", "**missed**"
    return f"{value:.2f} s", "met" if value <= target else "**missed**"


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def median_ms(values: list[tuple[float, bool]]) -> str:
    """The median of (value, lower bound) samples, a lower bound when any of them is."""
    return ms((statistics.median(v for v, _ in values), any(b for _, b in values)))


def target_rows(runs: list[Run]) -> list[str]:
    """One row per variant and rate: the medians over the rounds of each path's p99 and of the ratios
    (each ratio taken within its round, where the paths saw the same writes at the same moments)."""
    rows = []
    for variant, rate in dict.fromkeys((r.variant, r.rate) for r in runs):
        rounds = [r for r in runs if (r.variant, r.rate) == (variant, rate)]
        p99 = {k: [r.paths[k].pct(99) for r in rounds] for k in ("poolkeeper", "EndpointSlice controller",
                                                                 "bare watch")}
        es_ratios = [pk[0] / es[0] for pk, es in zip(p99["poolkeeper"], p99["EndpointSlice controller"], strict=True)]
        bare_ratios = [pk[0] / bare[0] for pk, bare in zip(p99["poolkeeper"], p99["bare watch"], strict=True)]
        # the floor: the bare watch's own p99 over the EndpointSlice controller's, the best any controller
        # that learns of a write from a watch could reach in the same round
        floors = [bare[0] / es[0] for bare, es in zip(p99["bare watch"], p99["EndpointSlice controller"], strict=True)]
        es_ratio, bare_ratio = statistics.median(es_ratios), statistics.median(bare_ratios)
        floor = statistics.median(floors)
        bound = any(pk[1] for pk in p99["poolkeeper"])  # a lower bound in some round
        ok = not bound and es_ratio <= TARGET_ES_RATIO and bare_ratio <= TARGET_WATCH_RATIO
        each = "; ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(es_ratios, bare_ratios, strict=True))
        es_met, bare_met = met(es_ratio <= TARGET_ES_RATIO), met(bare_ratio <= TARGET_WATCH_RATIO)
        reachable = "yes" if floor <= TARGET_ES_RATIO else "**no**"
        rows.append(f"| {variant} | {rate:g}/s | {median_ms(p99['poolkeeper'])} | "
                    f"{median_ms(p99['EndpointSlice controller'])} | {es_ratio:.2f} ({es_met}) | "
                    f"{median_ms(p99['bare watch'])} | {bare_ratio:.2f} ({bare_met}) | {met(ok)} | "
                    f"{floor:.2f} ({reachable}) | {each} |")
    return rows


def render(env: dict[str, str], runs: list[Run], uv_runs: list[Run], steps: list[Run], burst: dict[str, Any],
           big: dict[str, Any], args: argparse.Namespace, load: tuple[tuple[float, ...], tuple[float, ...]],
           elapsed: float) -> str:
    latency = ["| Variant | Rate (achieved) | Path | mean | p50 | p90 | p99 | max | timed | not seen in window | "
               "negative |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    targets = ["| Variant | Rate | poolkeeper p99 | EndpointSlice p99 | ratio (target ≤ 0.5) | bare watch p99 | "
               "ratio (target ≤ 2) | Result | the floor: bare watch p99 / EndpointSlice p99 (≤ 0.5 reachable?) | "
               "each round's ratios (EndpointSlice / bare watch) |",
               "|---|---|---|---|---|---|---|---|---|---|"]
    cpu = ["| Variant | Rate | Wall | CPU seconds (operator; control plane; the benchmark's own processes) |",
           "|---|---|---|---|"]
    extra = []
    for run in runs:
        for p in run.paths.values():
            latency.append(f"| {run.label} | {run.rate:g}/s ({run.achieved:.0f}/s) | {p.name} | {p.mean()} | "
                           f"{ms(p.pct(50))} | "
                           f"{ms(p.pct(90))} | {ms(p.pct(99))} | {ms(p.pct(100))} | {len(p.samples)} | "
                           f"{p.censored} | {p.negative} |")
        rtt = run.rtt or [float("nan")]
        latency.append(f"| {run.label} | {run.rate:g}/s ({run.achieved:.0f}/s) | (the pk PATCH answered) | "
                       f"{ms(sum(rtt) / len(rtt))} | {ms(percentile(rtt, 50))} | {ms(percentile(rtt, 90))} | "
                       f"{ms(percentile(rtt, 99))} | "
                       f"{ms(max(rtt))} | {len(run.rtt)} | | |")
    targets += target_rows(runs)
    writes = []
    for run in [*runs, *uv_runs, *steps]:
        flips = run.flips * (2 if run.rate in RATES and run in runs else 1)
        writes.append(f"- {run.variant} at {run.rate:g}/s ({flips:,} pod status writes sent): "
                      + ", ".join(f"{k} {v / flips:.2f}" for k, v in run.writes.items()) + ".")
    for label, run in [*((r.label, r) for r in runs), *((r.variant, r) for r in uv_runs)]:
        cpu.append(f"| {label} | {run.rate:g}/s | {run.wall:.0f} s | "
                   + ", ".join(f"{k} {v:.2f}" for k, v in run.cpu.items()) + " |")
        if run.handler:
            h = run.handler
            extra.append(f"- HTTP LifecycleHandler at {run.rate:g}/s: Ready write sent → `up` event POSTed to the "
                         f"receiver: p50 {ms(censored_percentile(h, 50))}, p99 {ms(censored_percentile(h, 99))}, "
                         f"max {ms(censored_percentile(h, 100))} ({len(h)} events).")
    visible = ["| Variant | Ready write → HAProxy server in rotation, p50 / p99 | Ready write → first request answered "
               "by that pod, p50 | p90 | p99 | max | Requests answered / failed |", "|---|---|---|---|---|---|---|"]
    for run in uv_runs:
        uv, pk_path = run.user_visible, run.paths["poolkeeper"]
        visible.append(f"| {run.variant} | {ms(pk_path.pct(50))} / {ms(pk_path.pct(99))} | "
                       f"{ms(censored_percentile(uv, 50))} | {ms(censored_percentile(uv, 90))} | "
                       f"{ms(censored_percentile(uv, 99))} | {ms(censored_percentile(uv, 100))} | "
                       f"{run.traffic['ok']:,} / {run.traffic['failed']} |")
    best = max((s.rate for s in steps if sustained_ok(s)), default=0.0)
    step_text = "; ".join(f"{s.rate:g}/s (achieved {s.achieved:.0f}/s): p99 {ms(s.paths['poolkeeper'].pct(99))} "
                          f"(bare watch {ms(s.paths['bare watch'].pct(99)) if 'bare watch' in s.paths else 'n/a'}, "
                          f"poolkeeper after the bare watch saw the write "
                          f"{ms(percentile(s.beyond, 99)) if s.beyond else 'n/a'}), "
                          f"operator CPU {s.cpu['operator']:.1f} s over {s.wall:.0f} s" for s in steps)
    own_best = max((s.rate for s in steps if own_part_ok(s)), default=0.0)
    watch_best = max((s.rate for s in steps if sustained_ok(s, "bare watch")), default=0.0)
    up, up_ok = figure(burst.get("up"), TARGET_BURST_S)
    down, down_ok = figure(burst.get("down"), TARGET_BURST_S)
    refill, refill_ok = figure(big.get("refill"), TARGET_BIG_S)
    if big.get("refill") is None and "reached" in big:
        refill = f"not within {args.big_timeout:g} s ({big['reached']:,} back)"
    burst.setdefault("up_span", float("nan"))
    burst.setdefault("delete_span", float("nan"))
    failures = [f"- **{d['error']}**" for d in (burst, big) if "error" in d]
    burst_rows = ["- Bursts, the big refill and the sustained rate: not run (`--variants` chose some variants)."] \
        if burst.get("skipped") else [
        *failures,
        "| Burst | Value | Target | Result |", "|---|---|---|---|",
        f"| {args.burst:,} pods of one pool turn Ready (writes over {burst['up_span']:.2f} s): last write sent → "
        f"all in rotation | {up} | ≤ {TARGET_BURST_S:g} s | {up_ok} |",
        f"| {args.burst:,} pods deleted at once (deletes over {burst['delete_span']:.2f} s): last delete sent → "
        f"all out of rotation | {down} | ≤ {TARGET_BURST_S:g} s | {down_ok} |",
        f"| {args.big:,} servers in one backend, HAProxy restarted empty → all back in rotation | {refill} | "
        f"≤ {TARGET_BIG_S:g} s | {refill_ok} |",
        f"| Highest sustained rate with poolkeeper p99 < 50 ms (steps tried: "
        f"{', '.join(f'{s.rate:g}' for s in steps)}/s) | {best:g}/s | ≥ {TARGET_RATE:g}/s | "
        f"{met(best >= TARGET_RATE)} |",
        f"| The same, timing only poolkeeper's own part (bare watch saw the write → HAProxy; the API server's time "
        f"left out) | {'≥ ' if own_best == steps[-1].rate else ''}"
        f"{own_best:g}/s | (not the target's measure) | |" if steps else "",
        f"| The floor: highest rate at which the bare watch itself saw the writes with p99 < 50 ms (no controller "
        f"that learns of a write from a watch can sustain more here) | {watch_best:g}/s | (reachable: "
        f"{'yes' if watch_best >= TARGET_RATE else '**no**'}) | |" if steps else "",
    ]
    loaded = max(load[0][0], load[1][0]) > 1.0
    environment_line = (
        f"Machine: {env['cpus']} CPUs ({env['cpu_model']}), {env['os']}; load average {load[0][0]:.2f} at start, "
        f"{load[1][0]:.2f} at end" + (" (**a loaded machine: other work ran meanwhile**)" if loaded else "")
        + f". Python {env['python']}, kopf {env['kopf']}, Kubernetes {env['kubernetes']}, {env['haproxy']}, all "
        f"on this machine. {'**Quick run** (small numbers, not for comparison). ' if args.quick else ''}"
        f"Whole run: {elapsed:.0f} s, {now_rfc3339()}.")
    return "\n".join([
        SIDEBYSIDE_HEADING, "",
        "`bench/bench_sidebyside.py`: on one control plane, in one run, poolkeeper (pod → HAProxy server in or "
        "out of rotation) beside the EndpointSlice controller of kube-controller-manager (pod → EndpointSlice), a "
        "bare pod watch (the floor: the earliest any controller can know) and a polling peer (lists pods every "
        "second, then sets HAProxy through the runtime API, as sync-loop ingress controllers do). Every figure "
        "is measured from the moment the status PATCH was **sent**.", "",
        environment_line, "",
        "### Targets", "",
        f"Each latency run was repeated in {args.rounds} round(s), every variant once per round in turn; the p99s "
        "are the medians over the rounds and each ratio is the median of the ratios taken within a round (where "
        "the paths saw the same writes at the same moments). Every round's runs are in *Every path*.", "",
        *targets, "",
        *burst_rows, "",
        "### User-visible: a pod's Ready write → the first request HAProxy sends it", "",
        f"A pool of {args.size_uv} pods with real HTTP servers on their addresses, {args.transitions_uv} transitions "
        f"at {UV_RATE:g}/s (so the Ready writes are {2 * args.size_uv / UV_RATE:g} s apart per pod), traffic through "
        f"HAProxy at up to {args.traffic_rate:g} requests/s (`poolkeeper_dev.traffic.LoadGenerator`, 8 keep-alive "
        "connections, its own process). With about half the pods ready, round robin reaches a newly ready server "
        f"after ~{args.size_uv / 2 / args.traffic_rate * 1000:.0f} ms on average: that wait is part of this figure.",
        "",
        *visible, "",
        "### Every path", "",
        *latency, "",
        *extra,
        *([] if burst.get("skipped") else [
        f"- Sustained-rate steps (poolkeeper alone, {args.size500} pods, {args.step_seconds:g} s each): "
        f"{step_text}; a step fails when p99 ≥ 50 ms or the sender reaches under 95 % of the rate; the steps "
        "stop when both measures fail.",
        f"- Bursts: {args.burst:,}-pod pool on its own backend; HAProxy polled by an observer process every 5 ms. "
        f"The {args.big:,} pods were created in {big.get('create', 0):.0f} s and all in rotation "
        f"{big.get('first_fill', 0):.0f} s after the first was created; after the restart the first server was "
        f"back after {big.get('first_seen') or float('nan'):.2f} s (the operator checks each LoadBalancer's "
        "`show info` once a second to notice a restart)."]), "",
        "### CPU", "",
        *cpu, "",
        "### API server writes per pod status write sent", "",
        "From the API server's `apiserver_request_total` before and after each run: every write any client made "
        "(the benchmark's PATCHes; kube-controller-manager's EndpointSlices and Endpoints; the operator's pool "
        "status, Events and outbox), divided by the status writes the benchmark sent.", "",
        *writes, "",
        "The operator's figure is its process only; the EndpointSlice controller runs inside kube-controller-manager "
        "(with its other controllers, at `--kube-api-qps=200`), whose CPU is shown whole. The observers are the "
        "benchmark's own processes (HAProxy pollers at 1 ms for poolkeeper and 5 ms for the peer, two watches, the "
        "poller, traffic); on 2 cores they compete with what they measure.", "",
        "### How measured", "",
        f"- Twins: for each rate a namespace with a TargetPool (`app=pk`, HAProxy backend, no checks unless the "
        f"variant says) and a Service (`app=svc`), {args.size50} pairs at 50/s and {args.size500} at 500/s, all bound "
        "to a Node object. The pair's two PATCHes (`ContainersReady` and `Ready`) are sent at the same instant "
        "(alternating which goes first) from one asyncio loop, round-robin over the pairs.",
        "- Each path's t1: poolkeeper and the polling peer, when an observer process polling `show servers state` "
        "sees the server in rotation (no MAINT/DRAIN bit) or out of it; the EndpointSlice controller, when a watch "
        "of the Service's EndpointSlices (its own process) sees the pod's endpoint `ready` change; the bare watch, "
        "when a pod watch (its own process) sees the Ready condition change. All clocks are this machine's "
        "CLOCK_MONOTONIC.",
        "- A write's window runs from its send to the same pod's next write; a change not seen in it counts as a "
        "lower bound (`≥`, column *not seen in window*). Samples below zero would be left out of the percentiles "
        "and counted (*negative*); a window starts at the send, so none can occur. Percentiles are nearest-rank.",
        f"- Variants: {'; '.join(f'*{k}*: {ALL_VARIANTS[k]}' for k in [*args.variants, *args.uv_only])}"
        + (f" ({', '.join(args.uv_only)} in the user-visible run only)" if args.uv_only else "") + ".",
        "- Every pk pod's address has a real HTTP server (one process for all, `servers_main`), so health checks "
        "pass and traffic is answered; the HTTP LifecycleHandler posts to a receiver in the same process.",
        f"- The polling peer runs in the 50/s runs only: with {args.size50} pairs each pod is written every "
        f"{args.size50 / 50:g} s, longer than its 1 s period plus a list; at 500/s the windows are "
        f"{args.size500 / 500 * 1000:.0f} ms, which a 1 s poller cannot resolve.",
        "- Not measured here: kube-proxy (no node in this control plane), so the EndpointSlice figure stops at the "
        "slice, before any data path would change.",
        "",
        "### How to run", "",
        "`make bench` runs it with the others; `.venv/bin/python bench/bench_sidebyside.py` runs only this one and "
        "rewrites this section (`--quick` for a short try that writes nothing; `--variants checking,checks` for "
        "only those latency runs, side by side, writing nothing).", "",
    ])


# ----------------------------------------------------------------------------- main
async def phases(cluster: Cluster, haproxy: HAProxyProcess, operator: OperatorProcess, args: argparse.Namespace,
                 load_start: tuple[float, ...], started: float) -> str:
    kube = Kube(cluster.kubeconfig)
    servers: Child | None = None
    try:
        env = environment(str((await kube.get("/version")).get("gitVersion", "?")))
        await kube.create(f"{GROUP_PATH}/loadbalancers", {
            "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": LB_NAME},
            "spec": {"type": "HAProxy", "haproxy": {"endpoint": haproxy.admin_endpoint, "backends": [
                {"name": b} for b in haproxy.backends]}, "allowedTargetCIDRs": ["127.0.0.0/8"]}})
        await asyncio.to_thread(operator.start, False)
        await asyncio.to_thread(operator.wait_ready, 60.0)
        if args.only == "refill":
            refilled = await survive("10,000 servers after a restart", big_backend(kube, haproxy, args))
            return refill_section(refilled, args, (load_start, os.getloadavg()), time.monotonic() - started)
        receiver_port = free_port()
        receiver = f"http://127.0.0.1:{receiver_port}/events"
        sizes = {50.0: args.size50, 500.0: args.size500, UV_RATE: args.size_uv}
        plan = [(variant, rate, size) for variant in [*args.variants, *args.uv_only] for rate, size in sizes.items()
                if variant not in args.uv_only or rate == UV_RATE]
        # Up before the first pod exists: the handler's first events are POSTed at once, and a refused
        # POST is retried with backoff, holding the instance's later events behind it.
        servers = Child("pod-servers", servers_main,
                        [pod_ip(index, i) for index, (_, _, size) in enumerate(plan) for i in range(size)],
                        args.port, receiver_port)
        servers.start()
        rigs: dict[tuple[str, float], Rig] = {}
        for variant, rate, size in plan:
            log(f"rig {variant} at {rate:g}/s: {size} pods" + ("" if rate == UV_RATE else " and their twins"))
            rigs[variant, rate] = await make_rig(kube, variant, rate, len(rigs), size, args.port, receiver)
        client = HAProxyClient(haproxy.admin_endpoint)
        runs: list[Run] = []
        uv_runs: list[Run] = []
        try:
            for rig in rigs.values():  # every server registered first, then half of them not ready
                await settled(kube, client, rig, rest=False)
                await restore(kube, rig)
            for round_ in range(args.rounds):  # every variant once per round: they share the machine's moods
                for (variant, rate), rig in rigs.items():
                    if rate == UV_RATE and round_:
                        continue
                    await settled(kube, client, rig)
                    if rate == UV_RATE:
                        uv_runs.append(await latency_run(kube, haproxy, operator, cluster, rig, variant,
                                                         args.transitions_uv, args, twins=False, traffic=True))
                        continue
                    transitions = args.transitions50 if rate == 50.0 else args.transitions500
                    run = await latency_run(kube, haproxy, operator, cluster, rig, variant, transitions, args,
                                            poller=rate == 50.0)
                    runs.append(replace(run, round=round_))
            if not args.partial:
                await settled(kube, client, rigs["plain", 500.0])
        finally:
            await client.close()
        attach_servers([*runs, *uv_runs], rigs, await asyncio.to_thread(servers.stop))
        steps: list[Run] = []
        burst: dict[str, Any] = {"skipped": True}
        big: dict[str, Any] = {"skipped": True}
        if not args.partial:
            steps = await sustained(kube, haproxy, operator, cluster, rigs["plain", 500.0], args)
            burst = await survive("bursts", bursts(kube, haproxy, args))
            big = await survive("10,000 servers after a restart", big_backend(kube, haproxy, args))
    finally:
        if servers is not None:
            servers.kill()
        await kube.close()
    load = (load_start, os.getloadavg())
    return render(env, runs, uv_runs, steps, burst, big, args, load, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pk-sidebyside"), help="control plane folder (wiped)")
    parser.add_argument("--size50", type=int, default=100, help="twin pairs flipped at 50/s")
    parser.add_argument("--size500", type=int, default=200, help="twin pairs flipped at 500/s")
    parser.add_argument("--size-uv", type=int, default=10, help="pods of the user-visible pool (with traffic)")
    parser.add_argument("--transitions-uv", type=int, default=200)
    parser.add_argument("--transitions50", type=int, default=1000)
    parser.add_argument("--transitions500", type=int, default=2500)
    parser.add_argument("--rounds", type=int, default=3, help="latency runs per variant and rate (medians reported)")
    parser.add_argument("--poll-period", type=float, default=0.001, help="poolkeeper's HAProxy observer period (s)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds observed after the last write")
    parser.add_argument("--traffic-rate", type=float, default=400.0, help="HTTP requests/s through HAProxy")
    parser.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")],
                        default=[50.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0], help="sustained-rate steps")
    parser.add_argument("--step-seconds", type=float, default=8.0)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--big", type=int, default=10_000)
    parser.add_argument("--big-timeout", type=float, default=120.0, help="seconds to wait for the refill")
    parser.add_argument("--refills", type=int, default=1, help="HAProxy restarts of the big backend (median reported)")
    parser.add_argument("--only", choices=("all", "refill"), default="all",
                        help="refill: only the big backend after restarts, a short table (writes nothing)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="a small run to try the script (writes nothing)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                        help=f"comma-separated, of {', '.join(ALL_VARIANTS)}; not all of {', '.join(VARIANTS)}: "
                             "only their latency runs (no bursts, refill or sustained rate), and nothing is written")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in ALL_VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: {', '.join(unknown) or 'none'}: choose from {', '.join(ALL_VARIANTS)}")
    args.partial = args.variants != list(VARIANTS)
    # A full run also shows the user-visible figure with `initialState: Checking`, beside the default's.
    args.uv_only = [] if args.partial else list(EXTRA_VARIANTS)
    args.no_write = args.no_write or args.partial  # docs/benchmarks.md holds the full run only
    if args.quick:
        args.transitions50, args.transitions500, args.transitions_uv, args.step_seconds = 150, 600, 40, 2.0
        args.rates, args.burst, args.big, args.no_write = [50.0, 250.0, 500.0], 200, 1000, True
        args.rounds = min(args.rounds, 2)
    if args.only != "all":
        args.no_write = True
    args.port = free_port()
    started, load_start = time.monotonic(), os.getloadavg()
    args.dir = args.dir.resolve()
    fresh_cluster_dir(args.dir)
    cluster = Cluster(args.dir)
    backends = [*(b for variant in args.variants for rate in (*RATES, UV_RATE) for b in rig_names(variant, rate)[1:]),
                *(b for variant in args.uv_only for b in rig_names(variant, UV_RATE)[1:]), "be_burst", "be_big"] \
        if args.only == "all" else ["be_big"]
    haproxy = HAProxyProcess(args.dir / "haproxy", backends=backends)
    operator = OperatorProcess(cluster.kubeconfig, args.dir / "logs", python=shipped_python(),
                               extra_args=("--http-allowed-cidrs", "127.0.0.0/8"))
    try:
        log(f"starting a control plane in {args.dir}")
        prepare_cluster(cluster)
        haproxy.start()
        section = asyncio.run(phases(cluster, haproxy, operator, args, load_start, started))
    except BaseException:
        if operator.proc is not None:
            log(f"operator log tail ({operator.log_path}):\n{operator.log_tail()}")
        raise
    finally:
        operator.stop()
        haproxy.stop()
        cluster.down()
        log(f"stopped the operator, HAProxy and the control plane ({time.monotonic() - started:.0f} s in all)")
    print(section)
    if not args.no_write:
        DOC.write_text(replace_section(DOC.read_text() if DOC.exists() else "", SIDEBYSIDE_HEADING, section))
        log(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
