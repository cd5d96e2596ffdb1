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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poolkeeper.devcluster.build import KUBERNETES_VERSION, ensure_binaries
from poolkeeper.devcluster.pki import Pki, ensure_pki
from poolkeeper.devcluster.ports import free_port

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")
# No kubelets here: the node-lifecycle controller would taint every Node NotReady after ~40 s.
DISABLED_CONTROLLERS = ("node-lifecycle-controller",)


class ClusterError(RuntimeError):
    """The control plane could not be started; the message says which part and why."""


@dataclass
class Cluster:
    """One control plane rooted at `root`; `kubeconfig` and `env` files are written there."""

    root: Path
    state: dict[str, Any] = field(default_factory=dict)

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
        return f"https://127.0.0.1:{self.state['apiserver_port']}"

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
            for name in COMPONENTS
        }
        ready = bool(self.state) and processes["kube-apiserver"]["running"] and self._ready_once()
        return {"dir": str(self.root), "kubernetes": KUBERNETES_VERSION, "ready": ready,
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
    def up(self, timeout: float = 120.0) -> Cluster:
        """Build what is missing, start what is not running, wait until the API server is ready."""
        if self.state and all(self._pid_alive(c) for c in COMPONENTS) and self._ready_once():
            return self
        self.down()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        bin_dir = ensure_binaries()
        pki = ensure_pki(self.root / "pki")
        self.state = {
            "bin_dir": str(bin_dir),
            "etcd_port": free_port(),
            "etcd_peer_port": free_port(),
            "apiserver_port": free_port(),
            "kcm_port": free_port(),
            "pids": {},
        }
        self._save_state()
        started = time.monotonic()
        self._spawn("etcd", self._etcd_args())
        self._write_kubeconfig(pki)
        self._spawn("kube-apiserver", self._apiserver_args(pki))
        self._wait_ready(pki, deadline=started + timeout)
        self._spawn("kube-controller-manager", self._kcm_args(pki))
        self._write_env()
        self.state["started_seconds"] = round(time.monotonic() - started, 2)
        self._save_state()
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [str(self.bin_dir / name), *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root,
        )
        log.close()
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
        return [
            f"--etcd-servers=http://127.0.0.1:{self.state['etcd_port']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={self.root / 'pki'}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}", "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            f"--service-account-issuer=https://127.0.0.1:{port}/",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true",
            "--endpoint-reconciler-type=none", "--max-requests-inflight=2000",
            "--max-mutating-requests-inflight=1000", "--watch-cache=true",
        ]

    def _kcm_args(self, pki: Pki) -> list[str]:
        controllers = ",".join(["*", *(f"-{c}" for c in DISABLED_CONTROLLERS)])
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
        """Stop the recorded processes (API server first so clients see it go); return what was stopped."""
        stopped = []
        for name in reversed(COMPONENTS):
            if self._pid_alive(name):
                pid = self.state["pids"][name]
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                for _ in range(100):
                    if not self._pid_alive(name):
                        break
                    time.sleep(0.05)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                stopped.append(name)
        if self.state.get("pids"):
            self.state["pids"] = {}
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
