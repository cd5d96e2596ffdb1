"""End to end: a pod's status write -> the operator -> a LifecycleHandler function called.

    .venv/bin/python bench/bench_lifecycle.py [--transitions 1000] [--rate 200] [--rounds 3]
        [--function python|http] [--out docs/benchmarks-lifecycle.md]

A real control plane, the real operator (as its own process) and an EndpointSlice pool of 50
pods. Pods are flipped ready / not ready at a fixed rate; each flip is one `up` or `down`
transition. t0 is when the API server answered the status write; t1 is when the handler
function started (it appends time.time() to a file), or with `--function http` when a real
HTTP receiver (aiohttp, its own process) got the POST. Both clocks are this machine's.

The end-to-end figure is split where it can be, so a slow API server is not blamed on the
operator: the write sent -> answered; answered -> the operator recorded the transition (the
event's `time`, set when the watch event was turned into a CloudEvent: the API server's watch
delivery plus the operator's informer); recorded -> function entered (the operator's own
dispatch: queues, outbox, function worker). --rounds rounds of --transitions, each started once
the CPUs are quiet (bench/quiet.py); the percentiles are over every round's samples, and each
round's p99 is shown. The machine's load average is printed beside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from quiet import QUIET_BUSY, wait_until_quiet

from poolkeeper.kube.api import STRATEGIC, KubeApi, resource_path
from poolkeeper.kube.credentials import load_credentials
from poolkeeper_dev import Cluster
from poolkeeper_dev.operator_process import OperatorProcess, ensure_system_namespace
from poolkeeper_dev.shipped_python import described, shipped_python
from poolkeeper_dev.standin_kubelet import FakeKubelet

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "bench-lifecycle"
PODS = 50
TARGET_P99_MS = 10.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def handler_source(out: Path) -> str:
    return (f"import json, time\nOUT = {str(out)!r}\n"
            "def handle(event, context):\n    t = time.time()\n"
            "    with open(OUT, 'a') as f:\n"
            "        f.write(json.dumps([event['subject'], event['data']['to'], t, event['time']]) + '\\n')\n")


def receiver_main(out: str, port: int, started: Any) -> None:
    """The HTTP handler's receiver: writes what the Python handler writes, for every POST it answers.

    Binary-mode CloudEvents: the subject and time are headers, the body is the event's data.
    """
    lines = open(out, "a", buffering=1)  # noqa: SIM115 - the process's whole life; a line is one write()

    async def handle(request: web.Request) -> web.Response:
        t = time.time()
        data = json.loads(await request.read())
        lines.write(json.dumps([request.headers["ce-subject"], data["to"], t, request.headers["ce-time"]]) + "\n")
        return web.Response(status=204)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/events", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        started.set()
        await asyncio.Event().wait()
    asyncio.run(serve())


def event_seconds(text: str) -> float:
    """A CloudEvent `time` (RFC 3339, UTC, `Z`) as epoch seconds."""
    return datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=UTC).timestamp()


Ack = tuple[str, str, float, float]  # pod subject, to-state, API ack time, time the write was sent


async def flip(api: KubeApi, transitions: int, rate: float) -> list[Ack]:
    """Write pod readiness at `rate`/s; returns (pod, to-state, API ack time, send time) per write."""
    acks: list[Ack] = []
    ready = dict.fromkeys(range(PODS), True)
    started = time.monotonic()
    tasks = []

    async def one(index: int, to_ready: bool) -> None:
        flag = "True" if to_ready else "False"
        body = {"status": {"conditions": [{"type": "Ready", "status": flag}, {"type": "ContainersReady",
                                                                               "status": flag}]}}
        sent = time.time()
        await api.patch(resource_path("v1", "pods", NAMESPACE, f"p-{index}", "status"), body, STRATEGIC)
        acks.append((f"Pod/{NAMESPACE}/p-{index}", "up" if to_ready else "down", time.time(), sent))

    for n in range(transitions):
        due = started + n / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        index = n % PODS
        ready[index] = not ready[index]
        tasks.append(asyncio.create_task(one(index, ready[index])))
    await asyncio.gather(*tasks)
    return acks


@dataclass
class Split:
    """Per matched call, in ms: end to end, and its parts (see the module docstring)."""

    end_to_end: list[float] = field(default_factory=list)
    api_answer: list[float] = field(default_factory=list)  # write sent -> API server answered
    to_operator: list[float] = field(default_factory=list)  # answered -> the operator recorded the transition
    dispatch: list[float] = field(default_factory=list)  # recorded -> function entered

    def extend(self, other: Split) -> Split:
        """Both splits' samples together."""
        return Split(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other), strict=True)))


def match(acks: list[Ack], calls: list[list[Any]]) -> Split:
    """Pair each write with the first later call for the same pod and state, in order."""
    pending: dict[tuple[str, str], list[Ack]] = {}
    for ack in sorted(acks, key=lambda a: a[2]):
        pending.setdefault((ack[0], ack[1]), []).append(ack)
    split = Split()
    for subject, to, at, recorded in sorted(calls, key=lambda c: c[2]):
        queue = pending.get((subject, to))
        if queue:
            _, _, answered, sent = queue.pop(0)
            split.end_to_end.append((at - answered) * 1000)
            split.api_answer.append((answered - sent) * 1000)
            split.to_operator.append((event_seconds(recorded) - answered) * 1000)
            split.dispatch.append((at - event_seconds(recorded)) * 1000)
    return split


def spread(values: list[float]) -> str:
    """p50 / p90 / p99 / max in ms (nearest rank)."""
    return " / ".join(f"{v:.1f}" for v in (statistics.median(values), percentile(values, 90),
                                            percentile(values, 99), max(values)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transitions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --transitions (each started once the machine is quiet); percentiles pooled")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks-lifecycle.md"))
    parser.add_argument("--function", choices=("python", "http"), default="python",
                        help="the handler: a Python function, or an HTTP receiver in its own process")
    parser.add_argument("--stuck-handler", action="store_true",
                        help="add an HTTP LifecycleHandler on the same pool whose receiver accepts and never "
                             "answers: its events wait in its outbox (flaps superseded), written all along")
    parser.add_argument("--operator-arg", action="append", default=[],
                        help="an extra `poolkeeper run` argument, e.g. --operator-arg=--function-workers=4")
    args = parser.parse_args()
    if args.rounds > 1 and args.transitions % (2 * PODS):
        parser.error(f"with --rounds, --transitions must be a multiple of {2 * PODS}: rounds end with every pod Ready")
    work = Path(tempfile.mkdtemp(prefix="pk-bench-lifecycle-"))
    cluster = Cluster(work / "cluster").up()
    operator = None
    receiver: tuple[multiprocessing.process.BaseProcess, int] | None = None
    acks: list[Ack] = []
    calls: list[list[Any]] = []
    split, rounds, busy, cpu = Split(), [], [], 0.0  # pooled over the rounds; each round's p99; CPUs busy before
    load_before: tuple[float, float, float] | None = None
    try:
        cluster.kubectl_run("apply", "--server-side", "-f", str(REPO / "manifests" / "crds"))
        cluster.kubectl_run("wait", "--for=condition=Established", "crd", "-l", "app.kubernetes.io/part-of=poolkeeper")
        cluster.kubectl_run("create", "namespace", NAMESPACE)
        ensure_system_namespace(cluster)
        handlers = work / "handlers"
        handlers.mkdir()
        out = work / "calls.jsonl"
        (handlers / "stamp.py").write_text(handler_source(out))
        stuck = _never_answers() if args.stuck_handler else None
        function: dict[str, Any] = {"type": "Python", "python": {"handler": "stamp.handle"}}
        if args.function == "http":
            receiver = _start_receiver(out)
            function = {"type": "HTTP", "http": {"url": f"http://127.0.0.1:{receiver[1]}/events"}}
        if stuck is not None or args.function == "http":
            args.operator_arg.append("--http-allowed-cidrs=127.0.0.0/8")
        kubelet = FakeKubelet(str(cluster.kubeconfig))
        kubelet.ensure_node()
        for i in range(PODS):
            kubelet.create_pod(NAMESPACE, f"p-{i}", {"app": "web"})
            kubelet.set_ready(NAMESPACE, f"p-{i}", f"192.0.2.{i + 1}")
        operator = OperatorProcess(cluster.kubeconfig, work, handlers_dir=handlers, python=shipped_python(),
                                   extra_args=(*args.operator_arg,
                                               *(("--verbose",) if os.environ.get("BENCH_VERBOSE") else ()))).start()
        print(f"operator log: {operator.log_path}", file=sys.stderr, flush=True)
        manifests = [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
             "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
            {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "TargetPool", "metadata": {"name": "web"},
             "spec": {"source": {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}}, "port": 8080,
                      "backend": {"type": "EndpointSlice", "endpointSlice": {"serviceName": "web"}},
                      "deregistrationDelaySeconds": 0}},
            {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LifecycleHandler", "metadata": {"name": "stamp"},
             "spec": {"poolRef": {"name": "web"}, "events": ["up", "down"], "function": function,
                      "maxConcurrency": 64}},
        ]
        if stuck is not None:
            manifests.append(
                {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LifecycleHandler", "metadata": {"name": "stuck"},
                 "spec": {"poolRef": {"name": "web"}, "events": ["up", "down"], "timeoutSeconds": 900,
                          "function": {"type": "HTTP",
                                       "http": {"url": f"http://127.0.0.1:{stuck.getsockname()[1]}/hook"}}}})
        cluster.kubectl_run("apply", "-n", NAMESPACE, "-f", "-", input="\n---\n".join(json.dumps(m) for m in manifests))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < PODS):
            time.sleep(0.2)
        time.sleep(1)

        async def drive() -> list[Ack]:
            api = KubeApi(load_credentials(str(cluster.kubeconfig)))
            try:
                return await flip(api, args.transitions, args.rate)
            finally:
                await api.close()

        for _ in range(args.rounds):  # each round ends with every pod Ready, as it started
            busy.append(wait_until_quiet())
            out.write_text("")
            cpu_before = _cpu_seconds(operator)
            load_before = load_before or os.getloadavg()
            round_acks = asyncio.run(drive())
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(out.read_text().splitlines()) < len(round_acks):
                time.sleep(0.2)
            cpu += _cpu_seconds(operator) - cpu_before
            round_calls = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
            this = match(round_acks, round_calls)
            if not this.end_to_end:
                raise SystemExit(f"no function calls were seen; operator log:\n{operator.log_tail()}")
            split, acks, calls = split.extend(this), acks + round_acks, calls + round_calls
            rounds.append(percentile(this.end_to_end, 99))
        load_after = os.getloadavg()
        latencies = split.end_to_end
    finally:
        if operator is not None:
            operator.stop()
        if receiver is not None:
            receiver[0].kill()
        cluster.down()
    rows = [
        ("transitions written", f"{len(acks)} at {args.rate:.0f}/s, in {args.rounds} rounds of {args.transitions} "
                                f"(each started when the CPUs were under {QUIET_BUSY:.0%} busy: "
                                f"{', '.join(f'{b:.0%}' for b in busy)})"),
        ("function calls seen", f"{len(calls)} ({len(latencies)} matched to a write; the rest superseded)"),
        ("transition -> function, p50", f"{statistics.median(latencies):.1f} ms"),
        ("transition -> function, p90", f"{percentile(latencies, 90):.1f} ms"),
        ("transition -> function, p99", f"{percentile(latencies, 99):.1f} ms (target < {TARGET_P99_MS:.0f} ms)"),
        ("transition -> function, max", f"{max(latencies):.1f} ms"),
        ("transition -> function, p99 of each round", " / ".join(f"{r:.1f} ms" for r in rounds)),
        ("parts, p50 / p90 / p99 / max (ms)", ""),
        ("write sent -> API server answered", spread(split.api_answer)),
        ("answered -> operator recorded the transition", spread(split.to_operator)),
        ("operator recorded -> function entered (dispatch)", spread(split.dispatch)),
        ("operator CPU per 1,000 transitions", f"{cpu / len(acks) * 1000:.1f} s"),
        ("handler", "Python function" if args.function == "python" else "HTTP POST to a receiver process"),
        ("a second handler on the pool, whose receiver never answers",
         "yes" if args.stuck_handler else "no"),
        ("load average (1 min) before / after", f"{(load_before or load_after)[0]:.2f} / {load_after[0]:.2f}"),
    ]
    table = "| measure | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    entered = "Python function's first line" if args.function == "python" else "HTTP receiver getting the POST"
    text = (f"## Lifecycle handlers end to end\n\nPod status write acknowledged by the API server -> the {entered}, "
            f"through the real operator ({PODS} pods, EndpointSlice pool; an instance's "
            f"first event waits for its outbox write, later ones do not). The operator on "
            f"{described()}, "
            f"{os.cpu_count()} CPUs.\n\n{table}\n")
    print(text)
    Path(args.out).write_text(text)
    return 0


def _start_receiver(out: Path) -> tuple[multiprocessing.process.BaseProcess, int]:
    """receiver_main in a spawned process on a free port; returns it and the port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    process = ctx.Process(target=receiver_main, args=(str(out), port, started), daemon=True)
    process.start()
    if not started.wait(30):
        raise SystemExit("the HTTP receiver did not start")
    return process, port


def _never_answers() -> socket.socket:
    """A listening socket that accepts connections (the kernel does) and never answers them."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    return listener


def _cpu_seconds(operator: OperatorProcess) -> float:
    assert operator.proc is not None
    fields = Path(f"/proc/{operator.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
