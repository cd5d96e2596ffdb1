"""containerd instances of our own: a config writer and a process started, checked and stopped by pid.

Everything an instance touches (root, state, sockets, the `opt` plugin's folder) lives where its
ContainerdConfig says, so several can run beside each other and beside a system containerd: the
image tests run one with CRI off, the dev cluster's node one with CRI on. Only the shims' socket
names land in /run/containerd/s, and those are hashes of our socket path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poolkeeper_dev.node import kill_containers, unmount_under

CRI = "io.containerd.grpc.v1.cri"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes, and containerd appends ".ttrpc"


class ContainerdError(RuntimeError):
    """containerd could not start or be reached; the message carries its log tail."""


@dataclass(frozen=True)
class ContainerdConfig:
    """What differs between our containerd instances; `write` renders the version 2 config.toml."""

    root: Path
    state: Path
    address: Path
    cri: bool = False
    cni_bin_dir: Path | None = None
    cni_conf_dir: Path | None = None
    sandbox_image: str = "registry.k8s.io/pause:3.10"
    snapshotter: str = "overlayfs"
    systemd_cgroup: bool = False
    # Clamp every container's oom_score_adj to containerd's own: without CAP_SYS_RESOURCE (as in
    # this VM) the -998 CRI gives pod sandboxes fails runc's init ("can't get final child's PID").
    restrict_oom_score_adj: bool = False

    def to_dict(self) -> dict[str, Any]:
        if len(str(self.address)) > SOCKET_PATH_MAX:
            raise ContainerdError(f"socket path too long for a unix socket ({len(str(self.address))} bytes): "
                                  f"{self.address}")
        plugins: dict[str, Any] = {"io.containerd.internal.v1.opt": {"path": str(self.root / "opt")}}
        if self.cri:
            plugins[CRI] = self._cri()
        return {
            "version": 2, "root": str(self.root), "state": str(self.state),
            "disabled_plugins": [] if self.cri else [CRI],
            "grpc": {"address": str(self.address)},
            "ttrpc": {"address": f"{self.address}.ttrpc"},
            "plugins": plugins,
        }

    def _cri(self) -> dict[str, Any]:
        cni = {key: str(value) for key, value in (("bin_dir", self.cni_bin_dir), ("conf_dir", self.cni_conf_dir))
               if value is not None}
        return {
            "sandbox_image": self.sandbox_image,
            "restrict_oom_score_adj": self.restrict_oom_score_adj,
            "containerd": {
                "snapshotter": self.snapshotter, "default_runtime_name": "runc",
                "runtimes": {"runc": {"runtime_type": "io.containerd.runc.v2",
                                      "options": {"SystemdCgroup": self.systemd_cgroup}}},
            },
            "cni": {**cni, "max_conf_num": 1},
        }

    def toml(self) -> str:
        return to_toml(self.to_dict())

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.toml())
        return path


def to_toml(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """TOML for nested dicts of str/int/bool/list values: keys first, then one [section] per sub-table."""
    lines = [f"{_key(key)} = {_value(value)}" for key, value in table.items() if not isinstance(value, dict)]
    out = ("[" + ".".join(_key(part) for part in prefix) + "]\n" if prefix and lines else "") + "".join(
        line + "\n" for line in lines)
    for key, value in table.items():
        if isinstance(value, dict):
            out += ("\n" if out else "") + to_toml(value, (*prefix, key))
    return out


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


class Containerd:
    """One containerd process for a config; its pid is recorded so any process can stop it later.

    `folder` holds config.toml, containerd.log and containerd.pid.
    """

    def __init__(self, config: ContainerdConfig, folder: Path) -> None:
        self.config = config
        self.folder = folder
        self.config_path = folder / "config.toml"
        self.log_path = folder / "containerd.log"
        self.pid_path = folder / "containerd.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def private(cls, folder: Path, **options: Any) -> Containerd:
        """root, state and socket all under `folder` (keep it short: the socket path has a length limit)."""
        config = ContainerdConfig(root=folder / "root", state=folder / "state", address=folder / "containerd.sock",
                                  **options)
        return cls(config, folder)

    @property
    def address(self) -> str:
        return str(self.config.address)

    def ctr_command(self, namespace: str = "k8s.io") -> list[str]:
        return ["ctr", "--address", self.address, "-n", namespace]

    def ctr(self, *args: str, namespace: str = "k8s.io", check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.ctr_command(namespace), *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def start(self, timeout: float = 30) -> Containerd:
        missing = [name for name in ("containerd", "ctr", "runc") if shutil.which(name) is None]
        if missing:
            raise ContainerdError(f"missing: {', '.join(missing)} (apt-get install containerd runc)")
        if self.pid() is not None:
            raise ContainerdError(f"containerd for {self.config_path} already runs (pid {self.pid()})")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write(self.config_path)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(["containerd", "--config", str(self.config_path)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_path.write_text(str(self._proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerdError(f"containerd exited with {self._proc.returncode}:\n{self.log_tail()}")
            if self.config.address.exists() and self.ctr("version", check=False, timeout=10).returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise ContainerdError(f"containerd did not answer on {self.address} within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def pid(self) -> int | None:
        """The recorded pid if that process is still this config's containerd (not a reused pid)."""
        try:
            pid = int(self.pid_path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if str(self.config_path).encode() in cmdline else None

    def stop(self, timeout: float = 15) -> None:
        """Kill its containers, stop it, then its leftover shims, and unmount whatever is left under it."""
        pid = self.pid()
        if pid is not None:
            namespaces = self.ctr("namespaces", "ls", "-q", check=False, timeout=10).stdout.split()
            for namespace in namespaces:
                kill_containers(self.ctr_command(namespace))
            self._signal_and_wait(pid, timeout)
        for shim in self._shim_pids():
            self._signal_and_wait(shim, 5, first=signal.SIGKILL)
        unmount_under([self.config.root, self.config.state])
        self.pid_path.unlink(missing_ok=True)

    def _signal_and_wait(self, pid: int, timeout: float, first: signal.Signals = signal.SIGTERM) -> None:
        for sig, wait in ((first, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if self._gone(pid, wait):
                return

    def _gone(self, pid: int, wait: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:  # our child: reap it
            try:
                self._proc.wait(wait)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + wait
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _shim_pids(self) -> list[int]:
        """containerd-shim processes started for this instance (their -address is our socket)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and b"containerd-shim" in args[0] and self.address.encode() in args:
                found.append(int(entry.name))
        return found

    def remove(self) -> None:
        """Delete root and state after stop() (snapshots of the images are hundreds of MB)."""
        if self.pid() is not None:
            raise ContainerdError("stop containerd before removing its folders")
        for folder in (self.config.root, self.config.state):
            shutil.rmtree(folder, ignore_errors=True)
