"""The operator end to end: event-to-backend latency, CPU, memory at 10,000 pods, cold start.

    .venv/bin/python bench/bench_operator.py [--dir /tmp/pk-bench] [--no-write] [--quick]

Starts a fresh control plane (etcd, kube-apiserver, kube-controller-manager) in --dir, a real
HAProxy, and the operator as a subprocess (`python -m poolkeeper run`), then in one run:

1. latency: 25 ready pods in a TargetPool on an HAProxy backend without health checks; pod
   readiness is toggled by status PATCHes paced at 50/s. t0 = the PATCH's response arrives;
   t1 = an observer process polling `show servers state` on its own admin-socket connection
   (about every millisecond) sees the server enabled (ready) or out of rotation (not ready:
   DRAIN/MAINT or gone).
2. operator CPU (utime + stime from /proc) over phase 1, per 1,000 transitions.
3. memory: 10,000 pods (9,000 that no pool selects, 1,000 in 10 HAProxy pools of 100), then the
   operator's VmRSS / VmHWM after every pool is Ready and 5 s idle.
4. cold start: operator stopped, pool status wiped; time from process start until every pool
   shows Ready=True with active == 100. Three runs with HAProxy still holding the servers, and
   one with HAProxy restarted (empty), where all 1,000 servers have to be added.

Prints a markdown section on stdout (progress on stderr) and writes docs/benchmarks.md, keeping
the HAProxy and handler-function sections (`make bench` regenerates all of them).
Only 127.0.0.0/8 addresses are contacted; pods no pool selects get documentation addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import multiprocessing
import os
import platform
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import aiohttp
from run_all import FUNCTIONS_DOC, HAPROXY_HEADING, compose_document, functions_section, section_of

from poolkeeper.backends.haproxy_client import HAProxyClient
from poolkeeper.core.naming import member_name, pool_prefix
from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAPROXY, HAProxyProcess
from poolkeeper_dev.operator_process import OperatorProcess, ensure_system_namespace
from poolkeeper_dev.shipped_python import described, shipped_python
from poolkeeper_dev.standin_kubelet import FakeKubelet

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
GROUP_PATH = "/apis/poolkeeper.dev/v1alpha1"
LB_NAME = "bench-edge"
NODE, NODE_IP = "devnode-1", "192.0.2.1"
PORT = 8080  # nothing listens there: pools have no health checks and no traffic is sent
LAT_NS, LAT_POOL, LAT_BACKEND = "bench-lat", "lat", "be_lat"
MEM_LABEL = "bench.poolkeeper.dev/set"
DOC_NETS = ("192.0.2", "198.51.100", "203.0.113")  # RFC 5737: for pods nobody contacts
OUT_OF_ROTATION = 0x01 | 0x02 | 0x04 | 0x20 | 0x08 | 0x10  # srv_admin_state MAINT and DRAIN bits

TARGET_P50_MS, TARGET_P99_MS = 15.0, 50.0
TARGET_RSS_MB, TARGET_COLD_S = 150.0, 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- /proc
def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (function workers and their forkserver, if any)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(parents.get(child, []))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def censored_percentile(samples: Sequence[tuple[float, bool]], q: float) -> tuple[float, bool]:
    """Nearest rank over (value, is_lower_bound) samples: a lower bound picked is shown as `>=`."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(value: tuple[float, bool] | float) -> str:
    if isinstance(value, tuple):
        return ("≥ " if value[1] else "") + f"{value[0] * 1000:.1f} ms"
    return f"{value * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


# ----------------------------------------------------------------------------- Kubernetes over aiohttp
class Kube:
    """JSON requests to the API server with the kubeconfig's client certificate."""

    def __init__(self, kubeconfig: Path) -> None:
        config = json.loads(kubeconfig.read_text())
        cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
        self.server = cluster["server"].rstrip("/")
        self.ssl = ssl.create_default_context(cafile=cluster["certificate-authority"])
        self.ssl.load_cert_chain(user["client-certificate"], user["client-key"])
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl, limit=64, limit_per_host=64),
                timeout=aiohttp.ClientTimeout(total=60))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                   ok: Iterable[int] = (200, 201)) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body)
        async with self.session.request(method, self.server + path, data=data, headers={
                "Content-Type": content_type, "Accept": "application/json"}) as resp:
            raw = await resp.read()
            if resp.status not in tuple(ok):
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {raw[:400]!r}")
            return resp.status, (json.loads(raw) if raw else {})

    async def get(self, path: str) -> dict[str, Any]:
        return (await self.call("GET", path))[1]

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return (await self.call("POST", path, body, ok=(200, 201)))[1]

    async def patch_status(self, path: str, body: dict[str, Any], *, merge: bool = False) -> dict[str, Any]:
        kind = "application/merge-patch+json" if merge else "application/strategic-merge-patch+json"
        return (await self.call("PATCH", path + "/status", body, content_type=kind))[1]


def pod_path(namespace: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{namespace}/pods" + (f"/{name}" if name else "")


def pool_path(namespace: str, name: str | None = None) -> str:
    return f"{GROUP_PATH}/namespaces/{namespace}/targetpools" + (f"/{name}" if name else "")


def pod_body(namespace: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": 30,
                     "containers": [{"name": "app", "image": "example.invalid/app:1",
                                     "ports": [{"containerPort": PORT}]}]}}


def readiness(ready: bool) -> list[dict[str, str]]:
    flag, stamp = ("True" if ready else "False"), now_rfc3339()
    return [{"type": "ContainersReady", "status": flag, "lastTransitionTime": stamp},
            {"type": "Ready", "status": flag, "lastTransitionTime": stamp}]


def running_status(ip: str, ready: bool = True) -> dict[str, Any]:
    """What a kubelet writes once the containers run (as FakeKubelet.set_ready does)."""
    return {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": NODE_IP,
                       "conditions": [{"type": "PodScheduled", "status": "True"},
                                      {"type": "Initialized", "status": "True"}, *readiness(ready)]}}


def pool_body(name: str, app: str, backend: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "TargetPool",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"source": {"kind": "Pod", "selector": {"matchLabels": {"app": app}}}, "port": PORT,
                     "backend": {"type": "HAProxy", "haproxy": {"loadBalancerRef": {"name": LB_NAME},
                                                                 "backend": backend}}}}


def ready_condition(pool: dict[str, Any]) -> bool:
    conditions = (pool.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def create_namespace(kube: Kube, name: str) -> None:
    await kube.call("POST", "/api/v1/namespaces", {"metadata": {"name": name}}, ok=(201, 409))


async def wait_until(predicate: Any, limit: float, what: str, interval: float = 0.1) -> Any:
    """Poll an async predicate (the benchmark's own check, not the operator's way of working)."""
    deadline = time.monotonic() + limit
    last: Any = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise RuntimeError(f"timed out after {limit:g} s waiting for {what} (last: {str(last)[:300]})")


# ----------------------------------------------------------------------------- HAProxy
def parse_state(text: str, prefix: str) -> dict[str, int]:
    """server name -> srv_admin_state, for the servers of one pool in a `show servers state` answer."""
    out = {}
    for line in text.split("\n"):
        fields = line.split(" ", 8)
        if len(fields) > 6 and fields[3].startswith(prefix):
            out[fields[3]] = int(fields[6])
    return out


def in_rotation(admin: int | None) -> bool:
    return admin is not None and admin >= 0 and not admin & OUT_OF_ROTATION


async def servers_in_rotation(client: HAProxyClient, backends: Sequence[str]) -> int:
    answers = await client.execute([f"show servers state {b}" for b in backends])
    return sum(1 for a in answers for admin in parse_state(a, "pk-").values() if in_rotation(admin))


def observer_main(socket_path: str, backend: str, prefix: str, period: float, started: EventType,
                  stop: EventType, conn: Connection) -> None:
    """The benchmark's own eyes on HAProxy: poll `show servers state BACKEND` about every `period`.

    Runs in its own process on its own admin-socket connection, so neither the load generator
    nor the operator waits for it. Records (time, server, admin state or -1 for gone) whenever a
    server's admin state changes; time is CLOCK_MONOTONIC when the answer had arrived.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)

    def ask(command: bytes, answers: int = 1) -> str:
        sock.sendall(command)
        buf = b""
        while buf.count(b"\n> ") < answers or not buf.endswith(b"\n> "):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise EOFError("HAProxy closed the observer's connection")
            buf += chunk
        return buf.decode()

    ask(b"prompt\nset timeout cli 600\n", answers=2)
    command = f"show servers state {backend}\n".encode()
    changes: list[tuple[float, str, int]] = []
    previous: dict[str, int] = {}
    polls, gaps = 0, []
    last = time.monotonic()
    due = last
    cpu_before = os.times()
    while not stop.is_set():
        text = ask(command)
        seen = time.monotonic()
        current = parse_state(text, prefix)
        for name in previous.keys() | current.keys():
            admin = current.get(name, -1)
            if previous.get(name, -1) != admin:
                changes.append((seen, name, admin))
        previous = current
        polls += 1
        gaps.append(seen - last)
        last = seen
        if polls == 1:
            started.set()
        due = max(due + period, seen)
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    cpu_after = os.times()
    sock.close()
    gaps = gaps[1:] or [0.0]
    conn.send({"changes": changes, "polls": polls, "gap_p50": percentile(gaps, 50),
               "gap_p99": percentile(gaps, 99), "gap_max": max(gaps),
               "cpu": (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)})
    conn.close()


class Observer:
    def __init__(self, socket_path: str, backend: str, prefix: str, period: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.started, self.stop_event = ctx.Event(), ctx.Event()
        self.recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=observer_main, name="haproxy-observer", daemon=True,
                                   args=(socket_path, backend, prefix, period, self.started, self.stop_event, send))

    def start(self) -> None:
        self.process.start()
        if not self.started.wait(30):
            raise RuntimeError("the HAProxy observer did not start polling")

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        if not self.recv.poll(30):
            raise RuntimeError("the HAProxy observer sent no result")
        result: dict[str, Any] = self.recv.recv()
        self.process.join(10)
        return result

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def histogram(text: str, name: str) -> dict[str, float]:
    """Cumulative buckets (`le` -> count), plus `_count` and `_sum`, of one Prometheus histogram."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            match = re.search(r'le="([^"]+)"', line)
            if match:
                out[match.group(1)] = float(line.rsplit(" ", 1)[1])
        elif line.startswith((f"{name}_count", f"{name}_sum")):
            out[line.split()[0].rsplit("_", 1)[1]] = float(line.rsplit(" ", 1)[1])
    return out


def histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def bucket_quantile(delta: dict[str, float], q: float) -> str:
    """The upper bound of the bucket holding quantile q (what Prometheus can tell at best)."""
    count = delta.get("count", 0.0)
    if not count:
        return "n/a"
    bounds = sorted(((float(k), v) for k, v in delta.items() if k not in ("count", "sum", "+Inf")))
    for bound, cumulative in bounds:
        if cumulative >= q * count:
            return f"≤ {bound * 1000:g} ms"
    return f"> {bounds[-1][0] * 1000:g} ms"


# ----------------------------------------------------------------------------- phase 1 and 2: latency, CPU
@dataclass
class Flip:
    index: int
    pod: str
    server: str
    ready: bool
    scheduled: float
    sent: float = 0.0
    answered: float = 0.0
    error: str = ""


@dataclass
class Latency:
    samples: list[tuple[float, bool]] = field(default_factory=list)  # (seconds, lower bound only)
    to_ready: list[tuple[float, bool]] = field(default_factory=list)
    to_unready: list[tuple[float, bool]] = field(default_factory=list)
    api_rtt: list[float] = field(default_factory=list)
    from_send: list[tuple[float, bool]] = field(default_factory=list)  # t1 - the moment the PATCH was sent
    watch_delay: list[float] = field(default_factory=list)  # independent watcher's event - t0
    after_watch: list[float] = field(default_factory=list)  # t1 - independent watcher's event
    censored: int = 0
    already: int = 0
    errors: int = 0
    early: int = 0
    lateness: list[float] = field(default_factory=list)
    achieved_rate: float = 0.0


def analyse(flips: list[Flip], changes: list[tuple[float, str, int]], end: float,
            watched: list[tuple[float, str, bool]]) -> Latency:
    """Match every status write with the first observation of its server in the wanted state.

    The window for a write runs from the moment it was sent until the same pod's next write (or
    the end of observation); a write whose state was never seen in its window counts as a lower
    bound (the time to the window's end). `watched` (time, pod, ready) are the events of the
    benchmark's own pod watch: they split the latency into watch delivery and the rest.
    """
    events: dict[str, list[tuple[float, bool]]] = {}
    for seen, pod, ready in watched:
        events.setdefault(pod, []).append((seen, ready))
    timeline: dict[str, tuple[list[float], list[bool]]] = {}
    for seen, name, admin in changes:
        times, states = timeline.setdefault(name, ([], []))
        up = in_rotation(admin)
        if not states or states[-1] != up:
            times.append(seen)
            states.append(up)
    result = Latency()
    by_pod: dict[str, list[Flip]] = {}
    for flip in flips:
        by_pod.setdefault(flip.pod, []).append(flip)
    for pod_flips in by_pod.values():
        for i, flip in enumerate(pod_flips):
            if flip.error:
                result.errors += 1
                continue
            result.api_rtt.append(flip.answered - flip.sent)
            result.lateness.append(flip.sent - flip.scheduled)
            window_end = pod_flips[i + 1].sent if i + 1 < len(pod_flips) else end
            times, states = timeline.get(flip.server, ([], []))
            at = bisect.bisect_right(times, flip.sent)
            if (states[at - 1] if at else False) == flip.ready:
                result.already += 1  # the previous write was never reflected: nothing to time
                continue
            found = next((times[j] for j in range(at, len(times))
                          if states[j] == flip.ready and times[j] <= window_end), None)
            if found is None:
                sample = (window_end - flip.answered, True)
                result.censored += 1
            else:
                sample = (found - flip.answered, False)
                result.early += found < flip.answered
            result.from_send.append((sample[0] + flip.answered - flip.sent, sample[1]))
            event = next((t for t, ready in events.get(flip.pod, [])
                          if ready == flip.ready and flip.sent <= t <= window_end), None)
            if event is not None:
                result.watch_delay.append(event - flip.answered)
                if found is not None:
                    result.after_watch.append(found - event)
            result.samples.append(sample)
            (result.to_ready if flip.ready else result.to_unready).append(sample)
    return result


async def watch_pods(kube: Kube, namespace: str, version: str, sink: list[tuple[float, str, bool]]) -> None:
    """The benchmark's own pod watch: (arrival time, pod, Ready) per event, until cancelled."""
    url = f"{kube.server}{pod_path(namespace)}?watch=1&resourceVersion={version}"
    async with kube.session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"pod watch: HTTP {resp.status}")
        async for line in resp.content:
            arrived = time.monotonic()
            obj = json.loads(line).get("object") or {}
            conditions = (obj.get("status") or {}).get("conditions") or []
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
            sink.append((arrived, (obj.get("metadata") or {}).get("name", ""), ready))


async def latency_phase(kube: Kube, haproxy: HAProxyProcess, operator: OperatorProcess, args: argparse.Namespace,
                        cluster: Cluster) -> dict[str, Any]:
    log(f"phase 1: {args.lat_pods} pods in pool {LAT_NS}/{LAT_POOL} on HAProxy backend {LAT_BACKEND}")
    await create_namespace(kube, LAT_NS)
    pods: dict[str, str] = {}  # pod -> server name
    for i in range(args.lat_pods):
        name = f"lat-{i:02d}"
        created = await kube.create(pod_path(LAT_NS), pod_body(LAT_NS, name, {"app": LAT_POOL}))
        await kube.patch_status(pod_path(LAT_NS, name), running_status(f"127.20.0.{i + 1}"))
        pods[name] = member_name(LAT_NS, LAT_POOL, created["metadata"]["uid"])
    await kube.create(pool_path(LAT_NS), pool_body(LAT_POOL, LAT_POOL, LAT_BACKEND))
    client = HAProxyClient(haproxy.admin_endpoint)
    try:
        async def all_in() -> bool:
            return bool(await servers_in_rotation(client, [LAT_BACKEND]) == args.lat_pods)
        await wait_until(all_in, 60, f"{args.lat_pods} servers in rotation")
    finally:
        await client.close()

    observer = Observer(str(haproxy.admin_socket), LAT_BACKEND, pool_prefix(LAT_NS, LAT_POOL), args.poll_period)
    observer.start()
    watched: list[tuple[float, str, bool]] = []
    version = (await kube.get(pod_path(LAT_NS)))["metadata"]["resourceVersion"]
    watch = asyncio.create_task(watch_pods(kube, LAT_NS, version, watched))
    try:
        await asyncio.sleep(1.0)
        hist_name = "poolkeeper_event_to_backend_seconds"
        hist_before = histogram(await asyncio.to_thread(operator.metrics), hist_name)
        control = {name: cluster.state["pids"][name] for name in ("kube-apiserver", "etcd")}
        cpu_before = cpu_seconds(operator.pid)
        control_before = {name: cpu_seconds(pid) for name, pid in control.items()}
        wall_before = time.monotonic()

        names = sorted(pods)
        state = dict.fromkeys(names, True)
        flips: list[Flip] = []
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2

        async def send(flip: Flip) -> None:
            body = {"status": {"conditions": readiness(flip.ready)}}
            flip.sent = time.monotonic()
            try:
                await kube.patch_status(pod_path(LAT_NS, flip.pod), body)
                flip.answered = time.monotonic()
            except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                flip.error = str(exc)

        tasks = []
        for i in range(args.transitions):
            due = start + i / args.rate
            pause = due - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            pod = names[i % len(names)]
            state[pod] = not state[pod]
            flip = Flip(i, pod, pods[pod], state[pod], scheduled=due)  # loop.time() is time.monotonic()
            flips.append(flip)
            tasks.append(asyncio.create_task(send(flip)))
        await asyncio.gather(*tasks)
        sent_span = max(f.sent for f in flips) - min(f.sent for f in flips)
        await asyncio.sleep(args.settle)
        observed = await asyncio.to_thread(observer.stop)
    finally:
        observer.kill()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    end = time.monotonic()
    cpu_after = cpu_seconds(operator.pid)
    control_after = {name: cpu_seconds(pid) for name, pid in control.items()}
    hist = histogram_delta(hist_before, histogram(await asyncio.to_thread(operator.metrics), hist_name))
    result = analyse(flips, observed["changes"], end, watched)
    result.achieved_rate = (len(flips) - 1) / sent_span if sent_span else 0.0
    log(f"phase 1: {len(result.samples)} transitions timed, {result.censored} not seen in their window, "
        f"{result.already} already in state, {result.errors} write errors; "
        f"p50 {ms(censored_percentile(result.samples, 50))}, p99 {ms(censored_percentile(result.samples, 99))}")
    return {"latency": result, "observer": observed, "histogram": hist, "flips": len(flips),
            "cpu": cpu_after - cpu_before, "wall": end - wall_before,
            "control_cpu": {k: control_after[k] - control_before[k] for k in control}}


async def remove_latency_pool(kube: Kube, lat_pods: int) -> None:
    """Delete the phase-1 pool (the operator drains and removes its servers) and its pods."""
    await kube.call("DELETE", pool_path(LAT_NS, LAT_POOL), ok=(200, 202, 404))

    async def gone() -> bool:
        status, _ = await kube.call("GET", pool_path(LAT_NS, LAT_POOL), ok=(200, 404))
        return status == 404
    await wait_until(gone, 60, "the latency pool to be finalized")
    for i in range(lat_pods):
        await kube.call("DELETE", pod_path(LAT_NS, f"lat-{i:02d}"), {"gracePeriodSeconds": 0}, ok=(200, 202, 404))
    await kube.call("DELETE", f"/api/v1/namespaces/{LAT_NS}", ok=(200, 202, 404))


# ----------------------------------------------------------------------------- phase 3: memory at 10,000 pods
def mem_layout(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Namespaces, and (namespace, pool, backend) for each pool: pools spread over the namespaces."""
    namespaces = [f"bench-mem-{i}" for i in range(args.namespaces)]
    pools = [(namespaces[j % len(namespaces)], f"pool-{j}", f"be_p{j}") for j in range(args.pools)]
    return namespaces, pools


def mem_pods(args: argparse.Namespace) -> list[tuple[str, str, dict[str, str], str]]:
    """(namespace, name, labels, ip) of every pod: selected ones on 127.x, the rest on documentation nets."""
    namespaces, pools = mem_layout(args)
    out = []
    for j, (namespace, pool, _) in enumerate(pools):
        for i in range(args.pool_size):
            out.append((namespace, f"{pool}-{i:03d}", {"app": pool}, f"127.{30 + j}.{i // 250}.{i % 250 + 1}"))
    others = args.total_pods - len(out)
    for k in range(others):
        namespace = namespaces[k % len(namespaces)]
        ip = f"{DOC_NETS[k % 3]}.{(k // 3) % 254 + 1}"
        out.append((namespace, f"other-{k:05d}", {"app": f"other-{k % 20}", "tier": "filler"}, ip))
    # interleave selected and unselected pods, as a real cluster fills up
    out.sort(key=lambda p: (zlib.crc32(p[1].encode()) & 0xFFFF, p[1]))
    return out


async def list_mem_pools(kube: Kube) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await kube.get(f"{GROUP_PATH}/targetpools?labelSelector={MEM_LABEL}%3Dmem"))[
        "items"]
    return items


async def mem_pools_ready(kube: Kube, count: int, size: int) -> bool:
    items = await list_mem_pools(kube)
    return len(items) == count and all(
        ready_condition(p) and (p.get("status") or {}).get("active") == size for p in items)


async def memory_phase(kube: Kube, haproxy: HAProxyProcess, operator: OperatorProcess,
                       args: argparse.Namespace) -> dict[str, Any]:
    namespaces, pools = mem_layout(args)
    for namespace in namespaces:
        await create_namespace(kube, namespace)
    for namespace, pool, backend in pools:
        await kube.create(pool_path(namespace), pool_body(pool, pool, backend, {MEM_LABEL: "mem"}))
    pods = mem_pods(args)
    log(f"phase 3: creating {len(pods)} pods ({args.pools * args.pool_size} selected by {args.pools} pools) "
        f"in {len(namespaces)} namespaces, {args.concurrency} at a time")
    queue: asyncio.Queue[tuple[str, str, dict[str, str], str]] = asyncio.Queue()
    for pod in pods:
        queue.put_nowait(pod)
    cpu_before, started = cpu_seconds(operator.pid), time.monotonic()
    errors: list[str] = []

    async def worker() -> None:
        while not queue.empty():
            namespace, name, labels, ip = queue.get_nowait()
            try:
                await kube.call("POST", pod_path(namespace), pod_body(namespace, name, labels), ok=(201, 409))
                await kube.patch_status(pod_path(namespace, name), running_status(ip))
            except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                errors.append(f"{namespace}/{name}: {exc}")

    async def progress() -> None:
        while True:
            await asyncio.sleep(15)
            log(f"  {len(pods) - queue.qsize()} pods created")

    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        reporter.cancel()
    created_in = time.monotonic() - started
    if errors:
        raise RuntimeError(f"{len(errors)} pods could not be created, e.g. {errors[0]}")
    log(f"phase 3: {len(pods)} pods created and running in {created_in:.1f} s; waiting for every pool Ready")
    await wait_until(lambda: mem_pools_ready(kube, args.pools, args.pool_size), 120,
                     f"{args.pools} pools Ready with {args.pool_size} active", interval=0.5)
    ready_in = time.monotonic() - started
    client = HAProxyClient(haproxy.admin_endpoint)
    try:
        in_haproxy = await servers_in_rotation(client, [b for _, _, b in pools])
    finally:
        await client.close()
    cpu_busy = cpu_seconds(operator.pid) - cpu_before
    log(f"phase 3: all pools Ready after {ready_in:.1f} s; {in_haproxy} servers in rotation; idling {args.idle:g} s")
    idle_cpu_before = cpu_seconds(operator.pid)
    await asyncio.sleep(args.idle)
    idle_cpu = cpu_seconds(operator.pid) - idle_cpu_before
    memory = memory_kib(operator.pid)
    children = [{"pid": c, "cmd": command_line(c), **memory_kib(c)} for c in descendants(operator.pid)]
    return {"pods": len(pods), "created_in": created_in, "ready_in": ready_in, "in_haproxy": in_haproxy,
            "cpu_busy": cpu_busy, "idle_cpu": idle_cpu, "memory": memory, "children": children}


# ----------------------------------------------------------------------------- phase 4: cold start
async def wipe_pool_status(kube: Kube) -> None:
    for pool in await list_mem_pools(kube):
        meta = pool["metadata"]
        await kube.patch_status(pool_path(meta["namespace"], meta["name"]), {"status": None}, merge=True)
    left = [p for p in await list_mem_pools(kube) if p.get("status")]
    if left:
        raise RuntimeError(f"pool status was not wiped: {left[0].get('status')}")


async def event_counts(kube: Kube, namespaces: Sequence[str]) -> dict[str, int]:
    """How many Registered / Deregistered Events (with their repeat counts) the pools have."""
    counts = {}
    for reason in ("Registered", "Deregistered"):
        total = 0
        for namespace in namespaces:
            items = (await kube.get(f"/api/v1/namespaces/{namespace}/events?fieldSelector=reason%3D{reason}"))["items"]
            total += sum(int(e.get("count") or 1) for e in items)
        counts[reason] = total
    return counts


async def cold_start(kube: Kube, haproxy: HAProxyProcess, operator: OperatorProcess, args: argparse.Namespace,
                     *, restart_haproxy: bool) -> dict[str, Any]:
    """Start the operator on existing pools; also watch HAProxy meanwhile: a restart should not disturb it."""
    await asyncio.to_thread(operator.stop)
    namespaces, pools = mem_layout(args)
    backends = [b for _, _, b in pools]
    expected = args.pools * args.pool_size
    client = HAProxyClient(haproxy.admin_endpoint)
    try:
        if restart_haproxy:
            await client.close()
            await asyncio.to_thread(haproxy.restart)
        before = await servers_in_rotation(client, backends)
        events_before = await event_counts(kube, namespaces)
        await wipe_pool_status(kube)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(operator.start, False)
        spawned = operator.spawned_at
        marks: dict[str, float] = {}
        lowest, full_since = before, (0.0 if before == expected else None)
        deadline = spawned + args.cold_timeout
        while time.monotonic() < deadline and ("pools" not in marks or full_since is None):
            if operator.proc is None or operator.proc.poll() is not None:
                raise RuntimeError(f"the operator exited during cold start:\n{operator.log_tail()}")
            if "readyz" not in marks and await asyncio.to_thread(operator.ready_once):
                marks["readyz"] = time.monotonic() - spawned
            count = await servers_in_rotation(client, backends)
            lowest = min(lowest, count)
            if count < expected:
                full_since = None
            elif full_since is None:
                full_since = time.monotonic() - spawned
            if "pools" not in marks and await mem_pools_ready(kube, args.pools, args.pool_size):
                marks["pools"] = time.monotonic() - spawned
            else:
                await asyncio.sleep(args.cold_poll)
        if "pools" not in marks or full_since is None:
            raise RuntimeError(f"pools not Ready, or HAProxy not full, {args.cold_timeout:g} s after the operator "
                               f"started:\n{operator.log_tail()}")
        marks["haproxy"] = full_since
        after = await servers_in_rotation(client, backends)
        while "readyz" not in marks and time.monotonic() < deadline:
            if await asyncio.to_thread(operator.ready_once):
                marks["readyz"] = time.monotonic() - spawned
            else:
                await asyncio.sleep(args.cold_poll)
    finally:
        await client.close()
    await asyncio.to_thread(operator.wait_ready, 30)
    await asyncio.sleep(1.0)  # Events are posted in the background
    events_after = await event_counts(kube, namespaces)
    events = {k: events_after[k] - events_before.get(k, 0) for k in events_after}
    log(f"phase 4: cold start ({'HAProxy restarted, empty' if restart_haproxy else 'HAProxy kept its servers'}): "
        f"pools Ready after {marks['pools']:.2f} s; servers in rotation: {before} before, lowest {lowest} meanwhile, "
        f"{after} after, all since {marks['haproxy']:.2f} s; Events {events}")
    return {**marks, "before": before, "after": after, "lowest": lowest, "events": events}


# ----------------------------------------------------------------------------- environment and report
def environment(kubernetes: str) -> dict[str, str]:
    haproxy = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return {
        "cpus": f"{os.cpu_count()} (usable here: {len(os.sched_getaffinity(0))})",
        "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), platform.machine()),
        "python": f"the operator's: {described()}",
        "kopf": metadata.version("kopf"),
        "kubernetes": kubernetes,
        "haproxy": " ".join(haproxy.split()[:3]) or "?",
        "os": f"{platform.system()} {platform.release()}",
    }


def render(env: dict[str, str], lat: dict[str, Any], mem: dict[str, Any], cold: list[dict[str, Any]],
           hot: dict[str, Any], args: argparse.Namespace, load: tuple[tuple[float, ...], tuple[float, ...]],
           elapsed: float) -> str:
    latency: Latency = lat["latency"]
    p50 = censored_percentile(latency.samples, 50)
    p90 = censored_percentile(latency.samples, 90)
    p99 = censored_percentile(latency.samples, 99)
    worst = censored_percentile(latency.samples, 100)
    cpu_per_k = lat["cpu"] / (lat["flips"] / 1000)
    rss_mb = mem["memory"]["VmRSS"] * 1024 / 1e6
    hwm_mb = mem["memory"]["VmHWM"] * 1024 / 1e6
    cold_median = statistics.median(r["pools"] for r in cold)
    expected = args.pools * args.pool_size
    lowest = min(r["lowest"] for r in cold)
    observed = lat["observer"]
    hist = lat["histogram"]
    rows = [
        ("Event → backend latency, p50", ms(p50), f"< {TARGET_P50_MS:g} ms",
         verdict(not p50[1] and p50[0] * 1000 < TARGET_P50_MS)),
        ("Event → backend latency, p90", ms(p90), "", ""),
        ("Event → backend latency, p99", ms(p99), f"< {TARGET_P99_MS:g} ms",
         verdict(not p99[1] and p99[0] * 1000 < TARGET_P99_MS)),
        ("Event → backend latency, max", ms(worst), "", ""),
        ("Transitions timed", f"{len(latency.samples):,} of {lat['flips']:,}", "≥ 500",
         verdict(len(latency.samples) >= 500 and not latency.censored)),
        ("Operator CPU per 1,000 transitions", f"{cpu_per_k:.2f} s", "", ""),
        (f"Operator RSS, {mem['pods']:,} pods ({args.pools * args.pool_size:,} in pools), idle",
         f"{rss_mb:.1f} MB", f"< {TARGET_RSS_MB:g} MB", verdict(rss_mb < TARGET_RSS_MB)),
        ("Operator peak RSS (VmHWM) over the whole run", f"{hwm_mb:.1f} MB", "", ""),
        ("Function worker processes", ", ".join(f"{c['VmRSS'] / 1024:.1f} MiB" for c in mem["children"])
         or "none running", "", ""),
        (f"Cold start → {args.pools} pools Ready, {args.pool_size} active each "
         f"(median of {len(cold)}, HAProxy kept its servers)",
         f"{cold_median:.2f} s", f"< {TARGET_COLD_S:g} s", verdict(cold_median < TARGET_COLD_S)),
        (f"Cold start, HAProxy restarted (empty): {args.pools * args.pool_size:,} servers added",
         f"{hot['pools']:.2f} s", f"< {TARGET_COLD_S:g} s", verdict(hot["pools"] < TARGET_COLD_S)),
        (f"Servers left in rotation while the operator restarts (HAProxy kept them; lowest seen, worst of "
         f"{len(cold)} runs)", f"{lowest:,} of {expected:,}", f"{expected:,} (nothing changed)",
         verdict(lowest == expected)),
    ]
    table = ["| Measure | Value | Target | Result |", "|---|---|---|---|",
             *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)]
    ready, unready = latency.to_ready, latency.to_unready
    details = [
        f"- Latency by direction: to ready p50 {ms(censored_percentile(ready, 50))} / p99 "
        f"{ms(censored_percentile(ready, 99))} ({len(ready)}); to not ready p50 "
        f"{ms(censored_percentile(unready, 50))} / p99 {ms(censored_percentile(unready, 99))} ({len(unready)}).",
        f"- Lowest latency {ms(min(v for v, _ in latency.samples))}: {latency.early} of {len(latency.samples)} "
        "changes were seen in HAProxy before the PATCH response had reached the benchmark (the API server "
        "sends the watch event and the response independently), so those latencies are negative. Measured "
        f"from the moment the PATCH was sent instead (an upper bound that includes the write): p50 "
        f"{ms(censored_percentile(latency.from_send, 50))}, p99 {ms(censored_percentile(latency.from_send, 99))}.",
        *([f"- Where the time goes, from the benchmark's own pod watch ({len(latency.watch_delay)} events matched): "
           f"API server → watch event at a watcher (after t0): p50 {ms(percentile(latency.watch_delay, 50))}, "
           f"p99 {ms(percentile(latency.watch_delay, 99))}; that watch event → HAProxy change seen (the operator's "
           f"watch, reconcile, runtime API call, plus the observer's poll): p50 "
           f"{ms(percentile(latency.after_watch, 50))}, p99 {ms(percentile(latency.after_watch, 99))}, max "
           f"{ms(max(latency.after_watch))}."] if latency.after_watch and latency.watch_delay else []),
        f"- The status PATCH itself (sent → response, not part of the latency): p50 "
        f"{ms(percentile(latency.api_rtt, 50))}, p99 {ms(percentile(latency.api_rtt, 99))}. "
        f"Achieved rate {latency.achieved_rate:.1f}/s (target {args.rate:g}/s); sends were at most "
        f"{max(latency.lateness) * 1000:.1f} ms behind schedule.",
        f"- The operator's own histogram `poolkeeper_event_to_backend_seconds` (watch event received → "
        f"backend change done, one sample per reconcile that changed something): {int(hist.get('count', 0))} "
        f"samples, mean {hist['sum'] / hist['count'] * 1000 if hist.get('count') else 0:.1f} ms, p50 "
        f"{bucket_quantile(hist, 0.5)}, p99 {bucket_quantile(hist, 0.99)}.",
        f"- Observer: {observed['polls']:,} polls of `show servers state {LAT_BACKEND}`, period p50 "
        f"{observed['gap_p50'] * 1000:.2f} ms, p99 {observed['gap_p99'] * 1000:.2f} ms, max "
        f"{observed['gap_max'] * 1000:.1f} ms; it used {observed['cpu']:.1f} CPU s over {lat['wall']:.0f} s. "
        f"Writes whose change was never seen before the same pod's next write: {latency.censored} (counted as "
        f"lower bounds); already in the wanted state when written: {latency.already}; failed writes: "
        f"{latency.errors}; changes seen before the PATCH response arrived: {latency.early}.",
        f"- CPU over phase 1 ({lat['wall']:.0f} s): operator {lat['cpu']:.2f} s, "
        + ", ".join(f"{k} {v:.2f} s" for k, v in lat["control_cpu"].items()) + ".",
        f"- Phase 3: {mem['pods']:,} pods created and made Running in {mem['created_in']:.0f} s "
        f"({mem['pods'] / mem['created_in']:.0f}/s, {args.concurrency} concurrent); every pool Ready after "
        f"{mem['ready_in']:.0f} s, {mem['in_haproxy']:,} servers in rotation; operator CPU meanwhile "
        f"{mem['cpu_busy']:.1f} s, then {mem['idle_cpu']:.2f} s over {args.idle:g} s idle. "
        f"VmRSS {mem['memory']['VmRSS'] / 1024:.1f} MiB, VmHWM {mem['memory']['VmHWM'] / 1024:.1f} MiB.",
        "- Cold start runs: seconds from spawn until `/readyz` answers 200 (once the operator's initial "
        "list is complete) / HAProxy has had every server in rotation ever since / every pool Ready; then the fewest "
        "servers in rotation seen meanwhile (polled with the pools) and the Deregistered / Registered Events "
        "the run posted. " + "; ".join(
            f"{'HAProxy restarted' if r is hot else f'run {i + 1}'}: {r.get('readyz', float('nan')):.2f} / "
            f"{r['haproxy']:.2f} / {r['pools']:.2f} s, lowest {r['lowest']:,}, Events "
            f"{r['events'].get('Deregistered', 0):,} / {r['events'].get('Registered', 0):,}"
            for i, r in enumerate([*cold, hot])) + ".",
    ]
    environment_line = (
        f"Machine: {env['cpus']} CPUs ({env['cpu_model']}), {env['os']}, shared with other work "
        f"(load average {load[0][0]:.2f} at start, {load[1][0]:.2f} at end). Python {env['python']}, "
        f"kopf {env['kopf']}, Kubernetes {env['kubernetes']} (kube-apiserver, etcd and kube-controller-manager "
        f"on the same machine), {env['haproxy']}. Whole run: {elapsed:.0f} s, {now_rfc3339()}.")
    return "\n".join([
        "## Operator end to end", "",
        "`bench/bench_operator.py`: the real operator (`python -m poolkeeper run`) against a real "
        "kube-apiserver + etcd and a real HAProxy, all on this machine.", "",
        environment_line, "",
        *table, "",
        *details, "",
        "### How to run", "",
        "`make bench` runs every benchmark and rewrites this file; `.venv/bin/python bench/bench_operator.py` runs "
        "only this one (about 3 minutes here; `make bench` about 3.5 minutes in all) and rewrites this section. "
        "It starts a fresh control plane in "
        "`/tmp/pk-bench` (`--dir`), HAProxy and the operator, and stops all of them at the end, also on errors. "
        "Binaries come from `make binaries`.", "",
        "### How measured", "",
        f"1. **Event → backend latency.** {args.lat_pods} Running pods (127.20.0.x) in one TargetPool on an HAProxy "
        "backend without health checks, so a ready pod goes into rotation at once. Pod readiness "
        f"(`ContainersReady` and `Ready`) is toggled by strategic-merge PATCHes of the pods' `status`, paced at "
        f"{args.rate:g}/s from an asyncio loop (aiohttp with the kubeconfig's client certificate, one task "
        f"per write), {args.transitions:,} transitions round-robin over the pods (each pod every "
        f"{args.lat_pods / args.rate:.1f} s). t0 = the moment the API server's response to the PATCH has arrived. "
        "t1 = the first moment HAProxy reports the pod's server (`member_name(namespace, pool, pod uid)`) in "
        "rotation (admin state without MAINT/DRAIN bits) for a ready write, or out of it (DRAIN/MAINT, or gone) "
        "for a not-ready one. HAProxy is watched by a separate process on its own admin-socket connection "
        f"polling `show servers state` every ~{args.poll_period * 1000:g} ms; t1 is when that answer arrived, "
        "so latencies include up to one poll period. A change not seen before the same pod's next write would "
        "count as a lower bound (`≥`). Percentiles are nearest-rank over all transitions.",
        "2. **CPU.** utime + stime of the operator process from `/proc/PID/stat` before and after phase 1 "
        "(including a short settling time), divided by the number of transitions / 1,000.",
        f"3. **Memory.** {args.total_pods:,} pods bound to a Node in {args.namespaces} namespaces: "
        f"{args.total_pods - args.pools * args.pool_size:,} with labels no pool selects (status written with "
        "192.0.2.x / 198.51.100.x / 203.0.113.x), and "
        f"{args.pools * args.pool_size:,} selected by {args.pools} HAProxy pools of {args.pool_size} "
        "(127.30-39.x.y; nothing listens and no checks run, so nothing is contacted). Created and made Running "
        f"{args.concurrency} at a time while the operator runs. `VmRSS` and `VmHWM` of the operator from "
        f"`/proc/PID/status` once every pool shows Ready with {args.pool_size} active, after {args.idle:g} s idle. "
        "Function worker processes start only with the first LifecycleHandler; none exists here. MB = 10^6 bytes.",
        "4. **Cold start.** With those pods and pools in place, the operator is stopped (SIGTERM), the pools' "
        "`status` is wiped (merge patch `status: null`), and the operator is started again; the time is from "
        "spawning the process until a LIST of the pools (polled every "
        f"{args.cold_poll * 1000:g} ms) shows every pool with Ready=True and `status.active == {args.pool_size}`. "
        f"{args.cold_runs} runs with HAProxy keeping its servers (the operator reads and confirms them; median "
        "reported), then one where HAProxy was restarted first and is empty, so all servers are added. Meanwhile "
        "the benchmark counts the servers in rotation in HAProxy at every poll: nothing changed while the "
        "operator was down, so a restart should leave all of them in rotation.",
        "",
    ])


# ----------------------------------------------------------------------------- main
async def phases(cluster: Cluster, haproxy: HAProxyProcess, operator: OperatorProcess, args: argparse.Namespace,
                 load_start: tuple[float, ...], started: float) -> str:
    kube = Kube(cluster.kubeconfig)
    try:
        env = environment(str((await kube.get("/version")).get("gitVersion", "?")))
        await kube.create(f"{GROUP_PATH}/loadbalancers", {
            "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": LB_NAME},
            "spec": {"type": "HAProxy", "haproxy": {"endpoint": haproxy.admin_endpoint, "backends": [
                {"name": b} for b in haproxy.backends]},
                     "allowedTargetCIDRs": ["127.0.0.0/8"]}})  # the pools' pods are on loopback, allowed explicitly
        await asyncio.to_thread(operator.start, False)
        await asyncio.to_thread(operator.wait_ready, 60.0)
        lat = await latency_phase(kube, haproxy, operator, args, cluster)
        await remove_latency_pool(kube, args.lat_pods)
        mem = await memory_phase(kube, haproxy, operator, args)
        cold = []
        for run in range(args.cold_runs):
            log(f"phase 4: cold start {run + 1} of {args.cold_runs}")
            cold.append(await cold_start(kube, haproxy, operator, args, restart_haproxy=False))
        log("phase 4: cold start with HAProxy restarted (empty)")
        hot = await cold_start(kube, haproxy, operator, args, restart_haproxy=True)
    finally:
        await kube.close()
    return render(env, lat, mem, cold, hot, args, (load_start, os.getloadavg()), time.monotonic() - started)


def fresh_cluster_dir(path: Path) -> None:
    """Stop a control plane left in `path` by an earlier run, then remove its folder."""
    if path.exists():
        Cluster(path).down()
        shutil.rmtree(path)


def prepare_cluster(cluster: Cluster) -> None:
    """Start the control plane with the CRDs established, the operator's namespace and the Node
    that pool pods are bound to."""
    cluster.up()
    cluster.kubectl_run("apply", "--server-side", "-f", str(REPO / "manifests" / "crds"))
    cluster.kubectl_run("wait", "--for=condition=Established", "crd", "-l",
                        "app.kubernetes.io/part-of=poolkeeper", "--timeout=60s")
    ensure_system_namespace(cluster)
    kubelet = FakeKubelet(str(cluster.kubeconfig), node=NODE, node_ip=NODE_IP)
    try:
        kubelet.ensure_node()
    finally:
        kubelet.close()


def write_document(section: str) -> None:
    existing = DOC.read_text() if DOC.exists() else ""
    haproxy = section_of(existing, HAPROXY_HEADING) or (
        f"{HAPROXY_HEADING}\n\nNot run yet: `make bench` runs `bench/bench_haproxy.py` and fills this in.\n")
    functions = functions_section(FUNCTIONS_DOC.read_text()) if FUNCTIONS_DOC.exists() else (
        "## Handler functions\n\nNot run yet: `make bench` runs `bench/bench_functions.py`.\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(compose_document(section, haproxy, functions))
    log(f"wrote {DOC.relative_to(REPO)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pk-bench"), help="control plane folder (wiped)")
    parser.add_argument("--lat-pods", type=int, default=25)
    parser.add_argument("--transitions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="status writes per second in phase 1")
    parser.add_argument("--poll-period", type=float, default=0.001, help="observer poll period (s)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds observed after the last write")
    parser.add_argument("--total-pods", type=int, default=10_000)
    parser.add_argument("--pools", type=int, default=10)
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--namespaces", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--idle", type=float, default=5.0)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--cold-poll", type=float, default=0.05)
    parser.add_argument("--cold-timeout", type=float, default=60.0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="a small run to try the script (not for the docs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.transitions, args.total_pods, args.pool_size, args.cold_runs = 200, 600, 20, 1
        args.no_write = True
    started, load_start = time.monotonic(), os.getloadavg()
    args.dir = args.dir.resolve()
    fresh_cluster_dir(args.dir)
    cluster = Cluster(args.dir)
    _, pools = mem_layout(args)
    haproxy = HAProxyProcess(args.dir / "haproxy", backends=[LAT_BACKEND, *(b for _, _, b in pools)])
    operator = OperatorProcess(cluster.kubeconfig, args.dir / "logs", python=shipped_python())
    try:
        log(f"starting a control plane in {args.dir}")
        cluster.up()
        cluster.kubectl_run("apply", "--server-side", "-f", str(REPO / "manifests" / "crds"))
        cluster.kubectl_run("wait", "--for=condition=Established", "crd", "-l",
                            "app.kubernetes.io/part-of=poolkeeper", "--timeout=60s")
        kubelet = FakeKubelet(str(cluster.kubeconfig), node=NODE, node_ip=NODE_IP)
        try:
            kubelet.ensure_node()
        finally:
            kubelet.close()
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
        write_document(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
