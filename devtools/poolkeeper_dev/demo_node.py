"""`make demo NODE=1`: real Deployment rollouts on a real node, the operator running from its image.

The devcluster starts with a node (containerd, kubelet, kube-proxy), the operator image is built and
loaded, `kubectl apply -k manifests/` deploys it (two replicas, leader election), and a Deployment of
real HTTP pods (readiness gate, `preStop: sleep`, maxUnavailable 0) sits behind a TargetPool in an
HAProxy with `retries 0` and no redispatch. The demo then rolls the Deployment again and again
(`kubectl rollout restart`) at 200 requests/s and counts failures on both sides: the client's, and
HAProxy's own econ/eresp/wretr/wredis counters.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config

from poolkeeper_dev.deploy import deploy_operator
from poolkeeper_dev.haproxy import HAProxyProcess
from poolkeeper_dev.node import NODE_IP
from poolkeeper_dev.rollout import ErrorWatch, web_deployment, web_pool
from poolkeeper_dev.traffic import LoadGenerator

REPO = Path(__file__).resolve().parents[2]
NAMESPACE, POOL, LB = "demo", "web", "demo-edge"


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


class NodeDemo:
    def __init__(self, demo: Any) -> None:
        """`demo` is the loopback Demo: same folder, cluster, state file and HAProxy bookkeeping."""
        self.demo = demo
        self.cluster = demo.cluster
        self.haproxy = HAProxyProcess(demo.root / "haproxy", backends=("web",), listen_host=NODE_IP)
        demo.haproxy = self.haproxy  # so `down` stops this one

    def start(self) -> None:
        self.demo.root.mkdir(parents=True, exist_ok=True)
        _say("starting the local cluster with a real node (the first run builds it from Go: several minutes)")
        self.cluster.up(node=True)
        _say("building the operator image, loading it into the node, then kubectl apply -k manifests/")
        deployed = deploy_operator(self.cluster, REPO)
        _say(f"operator image ready in {deployed.image_seconds:.1f}s; both replicas Ready "
             f"{deployed.ready_seconds:.1f}s and one leading {deployed.leading_seconds:.1f}s after the apply")
        self.demo._stop_recorded("haproxy_pid", str(self.haproxy.config).encode(), group=False)
        self.haproxy.start()
        self.demo.state_file.write_text(json.dumps({"haproxy_pid": self.haproxy.pid}))
        _say(f"HAProxy {self.haproxy.frontend_url('web')} (runtime API {self.haproxy.plain_tcp_endpoint}), "
             "retries 0, no redispatch")

    def objects(self, api: client.ApiClient) -> None:
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        with contextlib.suppress(client.ApiException):
            core.create_namespace(body=cast(Any, {"metadata": {"name": NAMESPACE}}))
        with contextlib.suppress(client.ApiException):
            custom.delete_cluster_custom_object("poolkeeper.dev", "v1alpha1", "loadbalancers", LB)
        custom.create_cluster_custom_object("poolkeeper.dev", "v1alpha1", "loadbalancers", {
            "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": LB},
            "spec": {"type": "HAProxy", "haproxy": {"endpoint": self.haproxy.plain_tcp_endpoint,
                                                    "backends": [{"name": "web"}]}}})
        for body in (web_deployment("web", pool=POOL, replicas=4), web_pool(POOL, app="web", lb=LB, backend="web")):
            self.cluster.kubectl_run("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(body))

    def run(self, seconds: float) -> int:
        from poolkeeper_dev.demo import LiveView

        self.start()
        api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))  # type: ignore[no-untyped-call]
        self.objects(api)
        view = LiveView(api, self.haproxy.frontend_url("web"))
        _say("waiting for the pods to run and turn Active")
        view.wait_active(4, 180)
        watch = ErrorWatch(self.haproxy.plain_tcp_endpoint, "web").start()
        load = LoadGenerator(self.haproxy.frontend_url("web"), connections=8, rate=200).start(
            duration=seconds if seconds > 0 else None)
        view.load = load
        deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
        rollouts, interrupted = 0, False
        try:
            while time.monotonic() < deadline:
                self.cluster.kubectl_run("rollout", "restart", "deployment/web", "-n", NAMESPACE)
                view.note(f"kubectl rollout restart deployment/web (rollout {rollouts + 1})")
                while time.monotonic() < deadline and not self._rolled_out(api):
                    view.render()
                    time.sleep(0.3)
                if self._rolled_out(api):
                    rollouts += 1
                    view.note(f"rollout {rollouts} complete")
        except KeyboardInterrupt:
            interrupted = True
        finally:
            report = load.stop()
            errors = watch.stop().errors()
            view.render(final=True)
        _say(f"summary: {rollouts} full rollouts, {report.ok} requests served, {report.failed} failed; "
             f"HAProxy counters {errors}" + (" (interrupted)" if interrupted else ""))
        for failure in report.failures[:5]:
            _say(f"  failure: {failure}")
        _say(f"still running: `source {self.cluster.env_file}` then `kubectl get pods,tp -n {NAMESPACE}`; "
             "`make demo-down` stops everything")
        api.close()
        return 0 if report.failed == 0 and not any(errors.values()) else 1

    @staticmethod
    def _rolled_out(api: client.ApiClient) -> bool:
        d: Any = client.AppsV1Api(api).read_namespaced_deployment("web", NAMESPACE)
        s, want = d.status, d.spec.replicas
        return bool((s.observed_generation or 0) >= (d.metadata.generation or 0) and s.updated_replicas == want
                    and s.replicas == want and s.available_replicas == want)
