"""`make demo`: a live rolling update through a real HAProxy, driven by poolkeeper.

Starts the dev control plane, HAProxy, the operator and a few real HTTP backends on loopback,
creates a LoadBalancer, a TargetPool (with health checks and pod readiness gates) and an audit
LifecycleHandler, then keeps rolling the pods (replace one at a time, scale up, scale down)
while real HTTP traffic flows through HAProxy. A live view shows the members and the requests
served and failed. `--seconds N` runs unattended and ends with a summary (exit 1 if any request
failed); `down` stops everything `up` started.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from poolkeeper_dev import Cluster
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.operator_process import ensure_system_namespace
from poolkeeper_dev.ports import free_port
from poolkeeper_dev.rollout import NO_ERRORS, backend_errors
from poolkeeper_dev.standin_kubelet import FakeKubelet
from poolkeeper_dev.traffic import LoadGenerator, LoadReport
from poolkeeper_dev.workload import Workload

GROUP, VERSION = "poolkeeper.dev", "v1alpha1"
NAMESPACE = "demo"
POOL = "web"
GATE = f"poolkeeper.dev/{POOL}"
REPO = Path(__file__).resolve().parents[2]


class DemoError(RuntimeError):
    """A part of the demo could not start; the text says which and why."""


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.cluster = Cluster(self.root / "cluster")
        self.haproxy = HAProxyProcess(self.root / "haproxy", backends=("web",))
        self.state_file = self.root / "demo.json"

    # ----------------------------------------------------------- start
    def start(self, operator_args: tuple[str, ...] = ()) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.stop_operator()
        _say("starting the local control plane (the first run builds it from Go: several minutes)")
        self.cluster.up()
        self.cluster.kubectl_run("apply", "--server-side", "-f", str(REPO / "manifests" / "crds"))
        self.cluster.kubectl_run("wait", "--for=condition=Established", "crd", "-l",
                                 "app.kubernetes.io/part-of=poolkeeper", "--timeout=60s")
        ensure_system_namespace(self.cluster)
        self._stop_recorded("haproxy_pid", str(self.haproxy.config).encode(), group=False)  # an earlier run's
        self.haproxy.start()
        _say(f"HAProxy {self.haproxy.frontend_url('web')} (admin socket {self.haproxy.admin_socket})")
        self._start_operator(operator_args)

    def _start_operator(self, extra: tuple[str, ...] = ()) -> None:
        port = free_port()
        log = open(self.root / "operator.log", "ab")  # noqa: SIM115 - handed to the child
        env = dict(os.environ, POOLKEEPER_AUDIT_LOG=str(self.root / "audit.log"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "poolkeeper", "run", "--kubeconfig", str(self.cluster.kubeconfig),
             "--metrics-port", str(port), "--metrics-address", "127.0.0.1", "--handlers-dir", str(REPO / "handlers"),
             *extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log.close()
        self.record(operator_pid=proc.pid, metrics_port=port, haproxy_pid=self.haproxy.pid)
        _say(f"operator pid {proc.pid}, metrics http://127.0.0.1:{port}/metrics, log {self.root / 'operator.log'}")

    def record(self, **pids: int | None) -> None:
        """Note what `up` started in the state file, for `down` (and the next `up`)."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            state = {}
        self.state_file.write_text(json.dumps({**state, **pids}))

    def _stop_recorded(self, key: str, marker: bytes, group: bool) -> None:
        """Stop a process `up` recorded, if that pid still runs what we started (never a reused pid)."""
        try:
            pid = int(json.loads(self.state_file.read_text())[key])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            return
        if marker not in cmdline:
            return
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if group else os.kill)(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                if not Path(f"/proc/{pid}/cmdline").read_bytes():
                    break
            except OSError:
                break
            time.sleep(0.1)

    def stop_operator(self) -> None:
        self._stop_recorded("operator_pid", b"poolkeeper", group=True)

    def down(self) -> None:
        self.stop_operator()
        self._stop_recorded("emulator_pid", b"poolkeeper_dev.aws_emulator", group=False)  # `up --aws`
        self._stop_recorded("haproxy_pid", str(self.haproxy.config).encode(), group=False)
        self.haproxy.stop()
        stopped = self.cluster.down()
        _say("stopped the operator, HAProxy and " + (", ".join(stopped) or "no control plane (none running)"))

    # ----------------------------------------------------------- scenario
    def objects(self, api: client.ApiClient) -> None:
        """Create the namespace, the LoadBalancer, and fresh TargetPool and LifecycleHandler objects."""
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        with contextlib.suppress(ApiException):
            core.create_namespace(body=cast(Any, {"metadata": {"name": NAMESPACE}}))
        lb = {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": "demo-edge"},
              "spec": {"type": "HAProxy", "haproxy": {"endpoint": self.haproxy.admin_endpoint,
                                                      "backends": [{"name": "web"}]},  # all the demo drives
                       # the demo's pods are HTTP servers on loopback addresses: allowed explicitly
                       "allowedTargetCIDRs": ["127.0.0.0/8"]}}
        with contextlib.suppress(ApiException):
            custom.delete_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers", name="demo-edge")
        custom.create_cluster_custom_object(group=GROUP, version=VERSION, plural="loadbalancers", body=lb)
        for plural, body in (("targetpools", self.pool_body()), ("lifecyclehandlers", self.handler_body())):
            name = body["metadata"]["name"]
            try:
                custom.delete_namespaced_custom_object(group=GROUP, version=VERSION, namespace=NAMESPACE,
                                                       plural=plural, name=name)
                while True:  # the pool's finalizer drains what an earlier run left
                    custom.get_namespaced_custom_object(group=GROUP, version=VERSION, namespace=NAMESPACE,
                                                        plural=plural, name=name)
                    time.sleep(0.2)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            custom.create_namespaced_custom_object(group=GROUP, version=VERSION, namespace=NAMESPACE,
                                                   plural=plural, body=body)

    def pool_body(self) -> dict[str, Any]:
        return {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "TargetPool", "metadata": {"name": POOL},
                "spec": {"source": {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}},
                         "port": self.port,
                         "backend": {"type": "HAProxy", "haproxy": {
                             "loadBalancerRef": {"name": "demo-edge"}, "backend": "web",
                             "healthCheck": {"intervalSeconds": 1, "rise": 1, "fall": 2}}},
                         "deregistrationDelaySeconds": 15}}

    @staticmethod
    def handler_body() -> dict[str, Any]:
        return {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LifecycleHandler", "metadata": {"name": "audit"},
                "spec": {"poolRef": {"name": POOL}, "events": ["up", "draining", "down", "registered", "deregistered"],
                         "function": {"type": "Python", "python": {"handler": "audit.handle"}}}}

    def run(self, seconds: float) -> int:
        self.start()
        api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))  # type: ignore[no-untyped-call]
        kubelet = FakeKubelet(str(self.cluster.kubeconfig))
        kubelet.ensure_node()
        self._clear_pods(client.CoreV1Api(api))
        workload = Workload(kubelet, NAMESPACE, "web", gates=(GATE,), subnet=77)
        self.port = workload.port
        self.objects(api)
        names = itertools.count(1)
        live: list[str] = []
        for _ in range(4):
            name = f"web-{next(names)}"
            workload.add(name)
            live.append(name)
        view = LiveView(api, self.haproxy.frontend_url("web"))
        _say("waiting for the first members to turn Active")
        view.wait_active(4, 30)
        load = LoadGenerator(self.haproxy.frontend_url("web"), connections=8, rate=200).start(
            duration=seconds if seconds > 0 else None)
        view.load = load
        deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
        steps = itertools.cycle(["replace", "replace", "replace", "replace", "scale-up", "scale-up",
                                 "scale-down", "scale-down"])

        def roll() -> None:
            step = next(steps)
            if step == "scale-up" or (step == "replace" and live):
                new = f"web-{next(names)}"
                workload.add(new)
                view.note(f"{step}: started {new}")
                view.wait_gate(NAMESPACE, new, deadline)
                live.append(new)
            if step in ("replace", "scale-down") and len(live) > 2:
                old = live.pop(0)
                workload.begin_termination(old)
                view.note(f"{step}: {old} terminating (draining)")
                view.wait_gone(old, deadline)
                workload.finish_termination(old)
        report, interrupted = view.drive(roll, until=lambda: time.monotonic() >= deadline)
        errors = backend_errors(self.haproxy.admin_endpoint, "web")  # retries 0: nothing hides a failure
        _say(f"summary: {report.ok} requests served, {report.failed} failed, {view.transitions} roll steps, "
             f"members now {len(live)}; HAProxy counters {errors}" + (" (interrupted)" if interrupted else ""))
        for failure in report.failures[:5]:
            _say(f"  failure: {failure}")
        workload.stop_all()
        _say(f"still running: `source {self.cluster.env_file}` then `kubectl get tp,lb,lh -A`, "
             f"`kubectl describe tp web -n {NAMESPACE}`; audit log {self.root / 'audit.log'}; "
             "`make demo-down` stops everything")
        kubelet.close()
        api.close()
        return 0 if report.failed == 0 and errors == NO_ERRORS else 1

    @staticmethod
    def _clear_pods(core: client.CoreV1Api) -> None:
        try:
            for pod in core.list_namespaced_pod(namespace=NAMESPACE).items:
                if pod.metadata and pod.metadata.name:
                    core.delete_namespaced_pod(name=pod.metadata.name, namespace=NAMESPACE, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise


class LiveView:
    """What a person watches: the pool's members and the traffic, refreshed as the roll goes."""

    def __init__(self, api: client.ApiClient, url: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.url = url
        self.load: LoadGenerator | None = None
        self.log: list[str] = []
        self.transitions = 0
        self.tty = sys.stdout.isatty()
        self._last_render = 0.0
        self.extra: Callable[[], list[str]] = list  # more lines under the members (the AWS demo's group)

    def pool(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.custom.get_namespaced_custom_object(
            group=GROUP, version=VERSION, namespace=NAMESPACE, plural="targetpools", name=POOL))

    def members(self) -> list[dict[str, Any]]:
        return list((self.pool().get("status") or {}).get("members") or [])

    def drive(self, step: Callable[[], None], until: Callable[[], bool]) -> tuple[LoadReport, bool]:
        """Take steps under traffic until `until` (or Ctrl-C), then stop the load: its report, and
        whether it was interrupted."""
        assert self.load is not None
        interrupted = False
        try:
            while not until():
                step()
                self.render()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            report = self.load.stop()
            self.render(final=True)
        return report, interrupted

    def note(self, text: str) -> None:
        self.transitions += 1
        self.log = [*self.log[-5:], f"{time.strftime('%H:%M:%S')} {text}"]
        self.render()

    def _wait(self, done: Any, deadline: float, timeout: float = 60.0) -> None:
        until = min(deadline, time.monotonic() + timeout)
        while time.monotonic() < until and not done():
            self.render()
            time.sleep(0.2)

    def wait_active(self, count: int, timeout: float) -> None:
        self._wait(lambda: sum(m["state"] == "Active" for m in self.members()) >= count, float("inf"), timeout)

    def wait_gate(self, namespace: str, pod: str, deadline: float) -> None:
        def gate_true() -> bool:
            obj = self.core.read_namespaced_pod(name=pod, namespace=namespace)
            conditions = (obj.status.conditions if obj.status else None) or []
            return any(c.type == GATE and c.status == "True" for c in conditions)
        self._wait(gate_true, deadline)

    def wait_gone(self, pod: str, deadline: float) -> None:
        self._wait(lambda: not any(m["instance"].endswith(f"/{pod}") for m in self.members()), deadline)

    def render(self, final: bool = False) -> None:
        if not final and time.monotonic() - self._last_render < (0.5 if self.tty else 2.0):
            return
        self._last_render = time.monotonic()
        status = self.pool().get("status") or {}
        report = self.load.snapshot() if self.load else None
        lines = [f"poolkeeper demo  pool {NAMESPACE}/{POOL} -> HAProxy backend web at {self.url}",
                 f"desired {status.get('desired', 0)}  active {status.get('active', 0)}  "
                 f"draining {status.get('draining', 0)}", ""]
        lines.append(f"{'MEMBER':<22} {'ADDRESS':<18} {'STATE':<12} {'HEALTH':<9} REASON")
        for m in status.get("members") or []:
            lines.append(f"{m['instance'].split('/')[-1]:<22} {m['address'] + ':' + str(m['port']):<18} "
                         f"{m['state']:<12} {m.get('health', ''):<9} {m.get('reason', '')}")
        lines += self.extra()
        if report is not None:
            rate = report.total / report.elapsed if report.elapsed else 0.0
            lines += ["", f"requests: {report.ok} served, {report.failed} failed ({rate:.0f}/s)"]
        lines += ["", *self.log]
        if self.tty:
            print("\x1b[2J\x1b[H" + "\n".join(lines), flush=True)
        else:
            print("\n".join(lines) + "\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poolkeeper-demo", description=__doc__)
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--dir", default=".demo", help="state folder (default .demo)")
    parser.add_argument("--seconds", type=float, default=0, help="run this long, then summarise (0: until Ctrl-C)")
    parser.add_argument("--node", action="store_true",
                        help="real Deployment rollouts on a real node, the operator deployed from its image")
    parser.add_argument("--aws", action="store_true",
                        help="an Auto Scaling group scaling out and in against an AWS emulator, the pool following it")
    args = parser.parse_args(argv)
    demo = Demo(Path(args.dir))
    try:
        if args.action == "down":
            demo.down()
            return 0
        if args.node:
            from poolkeeper_dev.demo_node import NodeDemo

            return NodeDemo(demo).run(args.seconds)
        if args.aws:
            from poolkeeper_dev.demo_aws import AwsDemo

            return AwsDemo(Path(args.dir)).run(args.seconds)
        return demo.run(args.seconds)
    except (DemoError, RuntimeError, OSError, ApiException) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
