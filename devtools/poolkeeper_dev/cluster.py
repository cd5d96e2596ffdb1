"""Start, stop and inspect a local control plane whose state lives in one folder.

`up` is idempotent: a folder whose processes are alive and whose API server answers
`/readyz` is left alone. `down` stops exactly the pids recorded in `DIR/state.json`, after
checking that each pid still runs a command line that names DIR (so a reused pid is never hit).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poolkeeper_dev import node as nodes
from poolkeeper_dev.build import KUBERNETES_VERSION, ensure_binaries
from poolkeeper_dev.pki import Pki, ensure_pki
from poolkeeper_dev.ports import free_port, port_again
from poolkeeper_dev.requirements import ensure as ensure_requirements

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")
# Without a kubelet the node-lifecycle controller would taint every Node NotReady after ~40 s.
DISABLED_CONTROLLERS = ("node-lifecycle-controller",)
SERVICE_CIDR = nodes.SERVICE_CIDR  # never 10.x: Services live in the RFC 2544 range, with or without a node


class ClusterError(RuntimeError):
    """The control plane could not be started; the message says which part and why."""


@dataclass
class Cluster:
    """One control plane rooted at `root`; `kubeconfig` and `env` files are written there."""

    root: Path
    state: dict[str, Any] = field(default_factory=dict)
    # The processes this object started: their own exit status beats reading /proc while they start.
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self._load_state()

    # ----- paths
    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    @property
    def bin_dir(self) -> Path:
        return Path(self.state.get("bin_dir", ""))

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def server(self) -> str:
        return f"https://{self.state.get('apiserver_host', '127.0.0.1')}:{self.state['apiserver_port']}"

    @property
    def has_node(self) -> bool:
        """True when this cluster runs a real node (containerd, kubelet, kube-proxy, kube-scheduler)."""
        return bool(self.state.get("node"))

    @property
    def components(self) -> tuple[str, ...]:
        return COMPONENTS + (nodes.NODE_COMPONENTS if self.has_node else ())

    def node_layout(self) -> nodes.NodeLayout:
        return nodes.NodeLayout(self.root, ensure_pki(self.root / "pki"), self.state.get("node_ports", {}))

    def _state_file(self) -> Path:
        return self.root / "state.json"

    def _load_state(self) -> None:
        try:
            self.state = json.loads(self._state_file().read_text())
        except (OSError, ValueError):
            self.state = {}

    def _save_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._state_file().write_text(json.dumps(self.state, indent=2))

    # ----- inspection
    def _pid_alive(self, component: str) -> bool:
        pid = self.state.get("pids", {}).get(component)
        if not pid:
            return False
        started = self._procs.get(component)
        if started is not None and started.pid == pid:
            return started.poll() is None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return str(self.root) in cmdline and ") Z" not in stat

    def status(self) -> dict[str, Any]:
        """Which components run (by recorded pid) and whether the API server is ready."""
        processes = {
            name: {"pid": self.state.get("pids", {}).get(name), "running": self._pid_alive(name)}
            for name in self.components
        }
        ready = bool(self.state) and all(p["running"] for p in processes.values()) and self._ready_once()
        return {"dir": str(self.root), "kubernetes": KUBERNETES_VERSION, "ready": ready, "node": self.has_node,
                "server": self.server if self.state.get("apiserver_port") else None,
                "processes": processes}

    def _ssl_context(self, pki: Pki | None = None) -> ssl.SSLContext:
        pki = pki or ensure_pki(self.root / "pki")
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        return ctx

    def _ready_once(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.server}/readyz", context=self._ssl_context(), timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    # ----- lifecycle
    def up(self, timeout: float = 120.0, node: bool = False) -> Cluster:
        """Build what is missing, start what is not running, wait until the API server (and node) is ready.

        A running cluster is left alone when it already has what was asked for (a node-ful one also
        serves a node-less request); otherwise it is stopped and started again in the wanted shape.
        """
        self._load_state()
        running = self.state and all(self._pid_alive(c) for c in self.components) and self._ready_once()
        if running and (self.has_node or not node):
            return self
        self.down()
        if node:
            self._claim_node()
        ensure_requirements(["control-plane", "node", "image"] if node else ["control-plane"])
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        bin_dir = ensure_binaries()
        pki = ensure_pki(self.root / "pki")
        before = self.state
        self.state = {
            "bin_dir": str(bin_dir),
            "etcd_port": free_port(),
            "etcd_peer_port": free_port(),
            "apiserver_port": port_again(before.get("apiserver_port")),
            "apiserver_host": nodes.NODE_IP if node else "127.0.0.1",
            "kcm_port": free_port(),
            "node": node,
            "pids": {},
        }
        if node:
            self.state["node_ports"] = {name: free_port() for name in (
                "kubelet", "kubelet_healthz", "proxy_healthz", "proxy_metrics", "scheduler")}
            self.state["host"] = {}
            self._save_state()
            nodes.prepare_host(self.state["host"])  # the API server binds the node's bridge address
        self._save_state()
        started = time.monotonic()
        self._spawn("etcd", self._etcd_args())
        self._write_kubeconfig(pki)
        self._spawn("kube-apiserver", self._apiserver_args(pki))
        self._wait_ready(pki, deadline=started + timeout)
        self._spawn("kube-controller-manager", self._kcm_args(pki))
        self._write_env()
        if node:
            self._start_node(deadline=started + timeout)
        self.state["started_seconds"] = round(time.monotonic() - started, 2)
        self._save_state()
        return self

    def _claim_node(self) -> None:
        """One node per machine (it owns the bridge and kube-proxy's iptables chains): refuse a second."""
        owner = nodes.node_owner()
        if owner is not None and owner != self.root:
            other = Cluster(owner)
            if other.has_node and any(other._pid_alive(c) for c in other.components):
                raise ClusterError(f"a devcluster node already runs from {owner} (one per machine): "
                                   f"`poolkeeper devcluster down --dir {owner}` first")
        nodes.claim_node(self.root)

    def _start_node(self, deadline: float) -> None:
        from poolkeeper_dev.image import build_images, load_images

        self._heal_kubernetes_endpoints()
        layout = self.node_layout()
        layout.write_configs(self.server)
        self._spawn("kube-scheduler", layout.scheduler_args())
        self.state["pids"]["containerd"] = layout.containerd().start().pid()
        self._save_state()
        load_images(build_images(self.root / "images"), str(layout.containerd_address))
        self._spawn("kubelet", layout.kubelet_args())
        self._spawn("kube-proxy", layout.proxy_args())
        self._wait_for(self._node_ready, "the node to become Ready", deadline + 60)

    def _heal_kubernetes_endpoints(self) -> None:
        """A folder restarted on another port keeps the old `kubernetes` endpoints in etcd, and the API
        server only fixes their address, not the port: delete them and it writes fresh ones."""
        port = self.kubectl_run("get", "endpointslice", "kubernetes", "-n", "default", "-o",
                                "jsonpath={.ports[0].port}", check=False).stdout.strip()
        if port and port != str(self.state["apiserver_port"]):
            self.kubectl_run("delete", "endpoints,endpointslice", "kubernetes", "-n", "default", check=False)

    def _node_ready(self) -> bool:
        proc = self.kubectl_run("get", "node", nodes.NODE_NAME, "-o",
                                "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False)
        return proc.stdout.strip() == "True"

    def _wait_for(self, condition: Callable[[], bool], what: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            for name in self.components:
                if name in self.state["pids"] and not self._pid_alive(name):
                    raise ClusterError(f"{name} exited while waiting for {what}; last log lines:\n"
                                       f"{self._log_tail(name)}")
            if condition():
                return
            time.sleep(0.2)
        tails = "\n".join(f"--- {n}\n{self._log_tail(n, 8)}" for n in self.state["pids"])
        raise ClusterError(f"timed out waiting for {what}; log tails:\n{tails}")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [str(self.bin_dir / name), *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root,
        )
        log.close()
        self._procs[name] = proc
        self.state["pids"][name] = proc.pid
        self._save_state()

    def _etcd_args(self) -> list[str]:
        client = f"http://127.0.0.1:{self.state['etcd_port']}"
        return [
            "--name=devcluster", f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls=http://127.0.0.1:{self.state['etcd_peer_port']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{self.state['etcd_peer_port']}",
            f"--initial-cluster=devcluster=http://127.0.0.1:{self.state['etcd_peer_port']}",
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=4294967296",
        ]

    def _apiserver_args(self, pki: Pki) -> list[str]:
        port = self.state["apiserver_port"]
        host = self.state.get("apiserver_host", "127.0.0.1")
        if self.has_node:
            # As on a real cluster: pods get service-account tokens, the kubelet is held to its own
            # Node, and the `kubernetes` Service has endpoints (reached through kube-proxy).
            node_args = [
                "--enable-admission-plugins=NodeRestriction", "--authorization-mode=Node,RBAC",
                "--endpoint-reconciler-type=lease",
                f"--kubelet-client-certificate={pki.client('apiserver-kubelet-client')[0]}",
                f"--kubelet-client-key={pki.client('apiserver-kubelet-client')[1]}",
                f"--kubelet-certificate-authority={pki.ca_cert}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            # No kubelet: pods are accepted without service accounts, and no endpoints are published
            # for the API server's loopback address.
            node_args = ["--disable-admission-plugins=ServiceAccount", "--authorization-mode=RBAC",
                         "--endpoint-reconciler-type=none"]
        return [
            f"--etcd-servers=http://127.0.0.1:{self.state['etcd_port']}",
            f"--bind-address={host}", f"--advertise-address={host}", f"--secure-port={port}",
            f"--cert-dir={self.root / 'pki'}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}", *node_args,
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer=https://127.0.0.1:{port}/",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--allow-privileged=true", "--max-requests-inflight=2000",
            "--max-mutating-requests-inflight=1000", "--watch-cache=true",
        ]

    def _kcm_args(self, pki: Pki) -> list[str]:
        disabled = () if self.has_node else DISABLED_CONTROLLERS
        controllers = ",".join(["*", *(f"-{c}" for c in disabled)])
        return [
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_cert}",
            "--bind-address=127.0.0.1", f"--secure-port={self.state['kcm_port']}",
            f"--cert-dir={self.root / 'pki' / 'kcm'}", f"--controllers={controllers}",
            "--use-service-account-credentials=false", "--kube-api-qps=200", "--kube-api-burst=400",
        ]

    def _wait_ready(self, pki: Pki, deadline: float) -> None:
        while time.monotonic() < deadline:
            for name in ("etcd", "kube-apiserver"):
                if not self._pid_alive(name):
                    tail = self._log_tail(name)
                    raise ClusterError(f"{name} exited while starting; last log lines:\n{tail}")
            if self._ready_once():
                return
            time.sleep(0.1)
        raise ClusterError(f"kube-apiserver not ready within the timeout; log:\n{self._log_tail('kube-apiserver')}")

    def _log_tail(self, name: str, lines: int = 25) -> str:
        try:
            return "\n".join((self.root / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _write_kubeconfig(self, pki: Pki) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "devcluster",
            "clusters": [{"name": "devcluster", "cluster": {
                "server": self.server, "certificate-authority": str(pki.ca_cert)}}],
            "users": [{"name": "admin", "user": {
                "client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)}}],
            "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": "admin"}}],
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))

    def _write_env(self) -> None:
        self.env_file.write_text(
            f"export KUBECONFIG={self.kubeconfig}\nexport PATH={self.bin_dir}:$PATH\n"
        )

    def down(self) -> list[str]:
        """Stop what `up` started and undo what it changed on the host; return what was stopped.

        The node goes first (kubelet, so nothing restarts pods; then the pods themselves, containerd,
        mounts, network namespaces, kube-proxy's iptables rules, the bridge), then the control plane,
        API server before etcd so clients see it go.
        """
        self._load_state()  # the folder's record is the truth: another Cluster object may have restarted it
        stopped = []
        if self.has_node:
            stopped += self._stop_node()
        for name in reversed(COMPONENTS):
            if self._stop(name):
                stopped.append(name)
        if self.state.get("pids"):
            self.state["pids"] = {}
            self._save_state()
        return stopped

    # ----- faults (tests): one control-plane component down and back, the rest left running
    def kill_component(self, name: str) -> None:
        """SIGKILL one control-plane component (a crash: no graceful shutdown), for fault tests."""
        if name not in COMPONENTS:
            raise ValueError(f"{name} is not one of {', '.join(COMPONENTS)}")
        if not self._stop(name, signal.SIGKILL):
            raise ClusterError(f"{name} was not running")

    def restart_component(self, name: str, timeout: float = 60.0) -> None:
        """Start one stopped component again with the same flags, ports and data; wait until the API
        server answers /readyz again (so etcd being back counts only once the API server sees it)."""
        if name not in COMPONENTS:
            raise ValueError(f"{name} is not one of {', '.join(COMPONENTS)}")
        if self._pid_alive(name):
            raise ClusterError(f"{name} is still running")
        pki = ensure_pki(self.root / "pki")
        if name == "etcd":
            args = self._etcd_args()
        else:
            args = self._apiserver_args(pki) if name == "kube-apiserver" else self._kcm_args(pki)
        self._spawn(name, args)
        if name != "kube-controller-manager":
            self._wait_ready(pki, deadline=time.monotonic() + timeout)

    def _stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> bool:
        if not self._pid_alive(name):
            return False
        pid = self.state["pids"][name]
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        for _ in range(100):
            if not self._pid_alive(name):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return True

    def _stop_node(self) -> list[str]:
        layout = self.node_layout()
        stopped = [name for name in ("kubelet", "kube-proxy", "kube-scheduler") if self._stop(name)]
        containerd = layout.containerd()
        netns: list[str] = []
        if containerd.pid() is not None:
            netns = nodes.sandbox_netns(containerd.ctr_command())  # before the sandboxes are gone
            stopped.append("containerd")
        containerd.stop()  # its containers, itself, leftover shims, mounts under its root and state
        nodes.unmount_under([layout.root])
        nodes.remove_netns(netns)
        proxy = self.bin_dir / "kube-proxy"
        if proxy.exists():  # removes every KUBE-* chain and rule it programmed
            subprocess.run([str(proxy), "--cleanup"], capture_output=True, check=False)
        nodes.remove_kube_chains()
        nodes.restore_host(self.state.get("host", {}))
        nodes.release_node(self.root)
        self.state["host"] = {}
        self._save_state()
        return stopped

    def kubectl_run(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        proc = subprocess.run([str(self.kubectl), *args], env=env, capture_output=True, text=True,
                              input=input, check=False)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc
