"""Run the real operator (`poolkeeper run`) as a subprocess: for tests, benchmarks and the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from poolkeeper_dev.ports import free_port

if TYPE_CHECKING:
    from poolkeeper_dev.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
SYSTEM_NAMESPACE = "poolkeeper-system"  # manifests/namespace.yaml: where outboxes live


def ensure_system_namespace(cluster: Cluster) -> None:
    """The operator keeps its outboxes in its own namespace; a bare cluster doesn't have it yet."""
    cluster.kubectl_run("apply", "-f", str(REPO / "manifests" / "namespace.yaml"))


class OperatorProcess:
    """`start()`, `kill()` (SIGKILL, as a crash), `stop()` (SIGTERM), and its log for failures."""

    def __init__(self, kubeconfig: Path, log_dir: Path, *, handlers_dir: Path | None = None,
                 extra_args: tuple[str, ...] = (), outbox_namespace: str = SYSTEM_NAMESPACE,
                 python: str = sys.executable) -> None:
        self.kubeconfig, self.log_dir = kubeconfig, log_dir
        self.python = python  # the interpreter that runs the operator (its packages from its own site)
        self.outbox_namespace = outbox_namespace
        self.handlers_dir = handlers_dir or REPO / "handlers"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        self.spawned_at = 0.0  # monotonic time of the last start, for cold-start measurements

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.poll() is None, "the operator is not running"
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self, wait_ready: bool = True) -> OperatorProcess:
        self.starts += 1
        self.port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child
        args = [self.python, "-m", "poolkeeper", "run", "--kubeconfig", str(self.kubeconfig),
                "--metrics-port", str(self.port), "--metrics-address", "127.0.0.1",
                "--handlers-dir", str(self.handlers_dir), "--outbox-namespace", self.outbox_namespace,
                *self.extra_args]
        self.spawned_at = time.monotonic()
        env = dict(os.environ)
        if self.python != sys.executable and not env.get("PYTHONPATH"):
            env["PYTHONPATH"] = str(REPO / "operator")  # another venv (shipped_python): the source being measured
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready_once():
                return
            time.sleep(0.05)
        raise RuntimeError(f"operator not ready within {timeout}s:\n{self.log_tail()}")

    def ready_once(self) -> bool:
        """One look at /readyz."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
