"""Rollouts on a real node, with and without `preStop: sleep`, measured side by side in one run.

    .venv/bin/python bench/bench_rollout.py [--cluster DIR] [--rollouts 2] [--rate 200]

Starts (or reuses) a devcluster with a real node, deploys the operator from its image with
`kubectl apply -k manifests/`, and for each variant rolls a Deployment of 3 real HTTP pods
(`kubectl rollout restart`) while sending `--rate` requests/s through an HAProxy with `retries 0`
and no redispatch. Reports the client's failures and HAProxy's own error counters per variant,
and the time from a pod's delete request to its server leaving rotation (DRAIN) in HAProxy.
Prints a markdown section on stdout (progress on stderr); `make bench` puts it in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config

from poolkeeper_dev import Cluster
from poolkeeper_dev.deploy import Deployed, deploy_operator
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.node import NODE_IP
from poolkeeper_dev.rollout import ErrorWatch, time_to_drain, wait_rollout, web_deployment, web_pool
from poolkeeper_dev.traffic import LoadGenerator

REPO = Path(__file__).resolve().parent.parent


def progress(text: str) -> None:
    print(f"bench_rollout: {text}", file=sys.stderr, flush=True)


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


class Variant:
    """One namespace, LoadBalancer, TargetPool and Deployment; `pre_stop` None means no preStop hook."""

    def __init__(self, cluster: Cluster, haproxy: HAProxyProcess, name: str, pre_stop: int | None) -> None:
        self.cluster, self.haproxy, self.ns, self.pre_stop = cluster, haproxy, f"bench-{name}", pre_stop

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cluster.kubectl_run(*args, input=input).stdout

    def create(self) -> None:
        self.cluster.kubectl_run("delete", "namespace", self.ns, "--wait=true", check=False)
        self.cluster.kubectl_run("delete", "loadbalancer", f"lb-{self.ns}", check=False)
        self.kubectl("create", "namespace", self.ns)
        wait(lambda: self.cluster.kubectl_run("get", "sa", "default", "-n", self.ns, check=False).returncode == 0,
             30, "the default ServiceAccount")
        lb = {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": f"lb-{self.ns}"},
              "spec": {"haproxy": {"endpoint": self.haproxy.plain_tcp_endpoint, "backends": [{"name": "web"}]}}}
        for body in (lb, web_deployment("web", pool="web", replicas=3, pre_stop_sleep=self.pre_stop),
                     web_pool("web", app="web", lb=f"lb-{self.ns}", backend="web")):
            self.kubectl("apply", "-n", self.ns, "-f", "-", input=json.dumps(body))
        wait(lambda: self.active() == 3, 180, f"{self.ns}: 3 Active members")

    def active(self) -> int:
        out = self.cluster.kubectl_run("get", "tp", "web", "-n", self.ns, "-o", "jsonpath={.status.active}",
                                       check=False).stdout
        return int(out or 0)

    def rollouts(self, count: int, rate: float) -> dict[str, object]:
        watch = ErrorWatch(self.haproxy.plain_tcp_endpoint, "web").start()
        took = []
        with LoadGenerator(self.haproxy.frontend_url("web"), connections=8, rate=rate) as load:
            load.start(duration=3600)
            for index in range(count):
                self.kubectl("rollout", "restart", "deployment/web", "-n", self.ns)
                took.append(wait_rollout(self.cluster.kubectl_run, self.ns, "web"))
                progress(f"{self.ns}: rollout {index + 1} of {count} in {took[-1]:.0f}s")
            wait(lambda: self.active() == 3, 60, "3 Active members after the last rollout")
            report = load.stop()
        errors = watch.stop().errors()
        return {"served": report.ok, "failed": report.failed, "errors": errors, "seconds": took,
                "failures": report.failures[:3]}

    def termination_race(self, count: int) -> list[tuple[float, float]]:
        """Delete pods one at a time. For each: (delete request -> HAProxy server no longer UP,
        delete request -> the pod's server refuses connections, i.e. the kubelet's SIGTERM landed)."""
        api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))  # type: ignore[no-untyped-call]
        core = client.CoreV1Api(api)
        races = []
        for _ in range(count):
            pods: list[Any] = core.list_namespaced_pod(self.ns, label_selector="app=web").items
            pod = next(p for p in pods if p.metadata.deletion_timestamp is None and p.status.pod_ip
                       and all(c.ready for c in p.status.container_statuses or []))
            races.append(self._race_once(core, pod.metadata.name, pod.status.pod_ip))
            wait(lambda: self.active() == 3, 120, "the replacement Active")
        api.close()
        return races

    def _race_once(self, core: client.CoreV1Api, name: str, address: str) -> tuple[float, float]:
        refused: list[float] = []
        started = time.monotonic()
        prober = threading.Thread(target=lambda: refused.append(until_refused(address, 8080, started)))
        prober.start()
        drained, _ = time_to_drain(self.haproxy.plain_tcp_endpoint, "web", address,
                                   lambda: core.delete_namespaced_pod(name, self.ns))
        prober.join()
        return drained, refused[0]  # both from (about) the same instant: the prober starts just before


def until_refused(address: str, port: int, started: float, limit: float = 40.0) -> float:
    """Seconds from `started` until a TCP connect to address:port fails (the app stopped listening)."""
    while time.monotonic() - started < limit:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                pass
        except OSError:
            return time.monotonic() - started
        time.sleep(0.002)
    return float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", type=Path, default=None, help="reuse this devcluster folder (started with a node)")
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--drains", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pk-bench-rollout-") as scratch:
        cluster = Cluster(args.cluster or Path(scratch) / "cluster")
        started = time.monotonic()
        cluster.up(node=True)
        up_seconds = time.monotonic() - started
        progress(f"cluster with a node up in {up_seconds:.1f}s")
        deployed = deploy_operator(cluster, REPO)
        progress(f"operator deployed: {deployed}")
        haproxy = HAProxyProcess(Path(scratch) / "haproxy", backends=["web"], listen_host=NODE_IP)
        haproxy.start()
        try:
            results: dict[str, dict[str, object]] = {}
            races: dict[str, list[tuple[float, float]]] = {}
            for name, pre_stop in (("prestop", 5), ("nohook", None)):
                variant = Variant(cluster, haproxy, name, pre_stop)
                variant.create()
                results[name] = variant.rollouts(args.rollouts, args.rate)
                races[name] = variant.termination_race(args.drains)
                variant.kubectl("delete", "namespace", variant.ns, "--wait=false")
        finally:
            haproxy.stop()
            if args.cluster is None:
                cluster.down()
    print(render(results, races, deployed, up_seconds, args))
    return 0


def render(results: dict[str, dict[str, object]], races: dict[str, list[tuple[float, float]]], deployed: Deployed,
           up_seconds: float, args: argparse.Namespace) -> str:
    rows, race_rows = [], []
    for name, label in (("prestop", "`preStop: sleep 5s`"), ("nohook", "no preStop hook")):
        r = results[name]
        errors = r["errors"]
        assert isinstance(errors, dict)
        rows.append(f"| {label} | {r['served']} | {r['failed']} | "
                    + " | ".join(str(errors[k]) for k in ("econ", "eresp", "wretr", "wredis")) + " |")
        drained = [d * 1000 for d, _ in races[name]]
        refused = [c * 1000 for _, c in races[name]]
        margins = [c - d for d, c in zip(drained, refused, strict=True)]
        race_rows.append(f"| {label} | {statistics.median(drained):.0f} / {max(drained):.0f} | "
                         f"{statistics.median(refused):.0f} / {min(refused):.0f} | {min(margins):.0f} |")
    return "\n".join([
        "## Rollouts on a real node", "",
        "`bench/bench_rollout.py`: a devcluster with a real node (kubelet, containerd, kube-proxy), the "
        "operator deployed from its image by `kubectl apply -k manifests/`, and a Deployment of 3 real HTTP "
        f"pods (readiness gate, maxUnavailable 0) rolled {args.rollouts} times with `kubectl rollout restart` "
        f"per variant, both variants in one run, at {args.rate:.0f} requests/s through HAProxy with "
        "`retries 0` and no redispatch. Errors are the client's failed requests and HAProxy's own counters.", "",
        "| variant | served | failed | econ | eresp | wretr | wredis |",
        "|---|---|---|---|---|---|---|",
        *rows, "",
        f"The termination race, {args.drains} single pod deletions per variant (times from the delete request, "
        "ms): poolkeeper takes the server out of rotation in HAProxy; the kubelet runs the preStop hook, "
        "then SIGTERM makes the app stop listening. The margin is the smallest gap between the two; "
        "a negative one is a window in which a request can fail.", "",
        "| variant | drained in HAProxy (median / max) | app stopped listening (median / min) | smallest margin |",
        "|---|---|---|---|",
        *race_rows, "",
        f"Cluster with a node up in {up_seconds:.1f} s; operator image built and loaded in "
        f"{deployed.image_seconds:.1f} s; after the apply both replicas Ready in "
        f"{deployed.ready_seconds:.1f} s, one leading in {deployed.leading_seconds:.1f} s.",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
