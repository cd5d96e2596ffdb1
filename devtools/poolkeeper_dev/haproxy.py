"""A real HAProxy for tests and demos, in its own folder, with backends that start empty.

    proc = HAProxyProcess(tmp_path, backends=["web"], declared={"web": "127.0.0.2:8080"}, tls=True)
    proc.start()
    client = HAProxyClient(proc.admin_endpoint)          # unix socket, level admin
    tls = HAProxyClient(proc.tcp_endpoint, proc.tls_files)  # TCP + TLS client certificate
    proc.frontend_url("web")                             # -> "http://127.0.0.1:PORT"
    proc.restart()                                       # full stop + start: runtime servers are gone
    proc.stop()

    mw = HAProxyProcess(tmp_path, master_worker=True)    # as Debian's systemd unit runs it: -W -S master.sock
    mw.reload()                                          # `systemctl reload`: SIGUSR2 to the master, a new worker
    mw.pause(); mw.resume()                              # SIGSTOP/SIGCONT the serving process: a hung runtime API

Each backend gets its own frontend on 127.0.0.1 and `balance roundrobin` (dynamic servers need a
dynamic algorithm). A backend listed in `declared` also gets a server named "static" from the
config file, which poolkeeper must never touch. With tls=True the admin socket is also reachable
on TCP through mutual TLS (certificates made with `openssl`). When HAProxy cannot start, start()
raises with HAProxy's own stderr: a broken environment fails loudly, it is never skipped.

Reloads: with master_worker=True HAProxy runs like Debian's haproxy.service (`-Ws -S
/run/haproxy-master.sock`, ExecReload = SIGUSR2 to the master): reload() starts a new worker
from the config file while the old one finishes its connections. Servers added through the
runtime API are not in the config file, so the new worker does not have them. This config sets
no `server-state-file`, and one would not change that: HAProxy applies a state file only to
servers that exist in the configuration, and never re-creates dynamic servers from it (the
management guide, "add server"). Putting the servers back is poolkeeper's job either way.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from poolkeeper.backends.haproxy_client import TLSFiles
from poolkeeper_dev.ports import free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
DECLARED_SERVER = "static"


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (HAProxy's workers, with master_worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


# ----- certificates, with the openssl command


@dataclass(frozen=True)
class CertificateAuthority:
    cert: Path
    key: Path


def _openssl(folder: Path, *args: str) -> None:
    proc = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")  # fast to generate


def make_ca(folder: Path, name: str) -> CertificateAuthority:
    """A self-signed CA in `folder` as NAME.crt / NAME.key."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(folder, "req", "-x509", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "30", "-subj", f"/CN={name}")
    return CertificateAuthority(folder / f"{name}.crt", folder / f"{name}.key")


def issue_cert(ca: CertificateAuthority, folder: Path, name: str, *, server: bool) -> tuple[Path, Path]:
    """A certificate signed by `ca`: a server one for 127.0.0.1/localhost, or a client one."""
    usage = "serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost" if server else "clientAuth"
    (folder / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n")
    _openssl(folder, "req", "-new", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-CAcreateserial", "-days", "30", "-out", f"{name}.crt", "-extfile", f"{name}.ext")
    return folder / f"{name}.crt", folder / f"{name}.key"


# ----- the process
PORT_ATTEMPTS = 5


class PortTaken(RuntimeError):
    """HAProxy could not bind a port that was free when it was picked."""



class HAProxyProcess:
    """One `haproxy -db` subprocess; ports and certificates stay the same across restarts."""

    def __init__(self, workdir: Path, backends: Sequence[str] = ("web",), *,
                 declared: Mapping[str, str] | None = None, tls: bool = False, binary: str = HAPROXY,
                 listen_host: str = "127.0.0.1", master_worker: bool = False) -> None:
        """`listen_host`: where the frontends and the plain TCP admin socket listen (a devcluster
        node's bridge address lets pods reach the runtime API). `master_worker`: a master process
        with a worker, which reload() replaces (the stats socket is the worker's)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backends = list(backends)
        self.declared = dict(declared or {})  # backend -> "ADDR:PORT [server options]" of the "static" server
        self.binary = binary
        self.config = self.workdir / "haproxy.cfg"
        self.log = self.workdir / "haproxy.log"
        self.listen_host = listen_host
        self.tls = tls
        self._pick_ports()
        self._started = False  # once started, the ports are kept: a restart is the same HAProxy
        self._tls_files: TLSFiles | None = None
        self.master_worker = master_worker
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused: int | None = None

    def _pick_ports(self) -> None:
        """Ports for every listener; a declared server pointing at one of our frontends follows it."""
        old = getattr(self, "frontend_ports", {})
        self.frontend_ports = {backend: free_port() for backend in self.backends}
        moved = {str(old[b]): str(self.frontend_ports[b]) for b in old}
        self.declared = {backend: re.sub(r"(?<=:)(\d+)\b", lambda m: moved.get(m[1], m[1]), server)
                         for backend, server in self.declared.items()}
        self.tls_port = free_port() if self.tls else None
        self.admin_port = free_port() if self.listen_host != "127.0.0.1" else None

    # ----- what tests use
    @property
    def master_socket(self) -> Path:
        """The master CLI (`-S`) of a master_worker HAProxy: `show proc`, `reload`, `@1 show info`."""
        return self.workdir / "master.sock"

    @property
    def admin_socket(self) -> Path:
        return self.workdir / "admin.sock"

    @property
    def admin_endpoint(self) -> str:
        return f"unix://{self.admin_socket}"

    @property
    def plain_tcp_endpoint(self) -> str:
        """The runtime API over plain TCP on `listen_host` (only when that is not loopback)."""
        if self.admin_port is None:
            raise RuntimeError("this HAProxy listens on loopback only: use admin_endpoint")
        return f"tcp://{self.listen_host}:{self.admin_port}"

    @property
    def tcp_endpoint(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("this HAProxy was made without tls=True: it has no TCP admin socket")
        return f"tcp://127.0.0.1:{self.tls_port}"

    @property
    def tls_files(self) -> TLSFiles:
        """A client certificate HAProxy accepts on the TCP admin socket."""
        if self._tls_files is None:
            raise RuntimeError("TLS files exist once a tls=True HAProxy has been started")
        return self._tls_files

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def frontend_url(self, backend: str) -> str:
        return f"http://{self.listen_host}:{self.frontend_ports[backend]}"

    # ----- lifecycle
    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until the admin socket and every frontend accept connections.

        free_port() only finds a port free at that moment: another process (an API server started
        meanwhile, a client's ephemeral port) may take it before HAProxy binds it. The first start
        then picks fresh ports and tries again; a restart keeps its ports, as a real one would."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start(timeout)
            except PortTaken:
                if self._started or attempt == PORT_ATTEMPTS - 1:
                    raise
                self._pick_ports()
                continue
            self._started = True
            return

    def _start(self, timeout: float) -> None:
        if self.pid is not None:
            raise RuntimeError("HAProxy is already running")
        if self.tls_port is not None and self._tls_files is None:
            self._tls_files = self._make_certs()
        self.config.write_text(self._render())
        logged = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            mode = ["-W", "-S", str(self.master_socket)] if self.master_worker else []
            self._proc = subprocess.Popen([self.binary, *mode, "-f", str(self.config), "-db"],
                                          stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None:
                said = self.log.read_bytes()[logged:]  # this start's lines only
                error = PortTaken if b"Address already in use" in said else RuntimeError
                raise error(f"haproxy exited with {self._proc.returncode}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"haproxy was not ready after {timeout} s:\n{self._log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (a hard stop for `-db`), SIGKILL if it lingers."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """A full stop and start, like a crash or a package upgrade: runtime servers are lost."""
        self.stop()
        self.start()

    def worker_pid(self, timeout: float = 5.0) -> int:
        """The pid of the process that answers the stats socket now (the worker, with master_worker)."""
        info = self._show_info(timeout)
        return int(info["Pid"])

    def reload(self, timeout: float = 10.0) -> int:
        """`systemctl reload haproxy` on Debian: check the config, SIGUSR2 to the master, then wait
        until a new worker answers the stats socket. Returns its pid. Runtime servers are lost;
        the old worker keeps serving the connections it has, and the sessions already open to it."""
        if not self.master_worker or self.pid is None:
            raise RuntimeError("reload() needs a running HAProxy made with master_worker=True")
        old = self.worker_pid()
        self.config.write_text(self._render())
        check = subprocess.run([self.binary, "-c", "-q", "-f", str(self.config)], capture_output=True, text=True,
                               check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused the config: {check.stderr.strip()}")
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self._show_info(1.0)
                if int(info["Pid"]) != old and info.get("Stopping", "0") == "0":
                    return int(info["Pid"])
            except (OSError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no new worker answered {timeout} s after the reload:\n{self._log_tail()}")
            time.sleep(0.02)

    def pause(self) -> int:
        """SIGSTOP the process behind the stats socket: it still accepts connections (into the
        listen backlog) and never answers, like a wedged HAProxy. Its frontends hang as well."""
        if self._paused is not None:
            raise RuntimeError("already paused")
        pid = self.worker_pid()
        os.kill(pid, signal.SIGSTOP)
        self._paused = pid
        _wait_stopped(pid)  # SIGSTOP is asynchronous: on a loaded VM a command sent at once could still be answered
        return pid

    def resume(self) -> None:
        pid, self._paused = self._paused, None
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def __enter__(self) -> HAProxyProcess:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ----- internals
    def _end(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.resume()  # a stopped process would ignore SIGTERM until continued
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        workers = _children(proc.pid)
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for pid in workers:  # a master killed with SIGKILL cannot take its workers with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _show_info(self, timeout: float) -> dict[str, str]:
        """`show info` on a new connection (no prompt mode: HAProxy closes it after the answer)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.admin_socket))
            sock.sendall(b"show info\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        fields = {}
        for line in b"".join(chunks).decode(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return fields

    def _ready(self) -> bool:
        """Every listener accepts, and the runtime API answers: a connection alone can be accepted
        by the kernel while HAProxy is still binding (and about to exit because a port was taken)."""
        try:
            if "Pid" not in self._show_info(5.0):
                return False
        except OSError:
            return False
        targets: list[tuple[int, str | tuple[str, int]]] = []
        ports = [*self.frontend_ports.values(), *([self.tls_port] if self.tls_port else [])]
        targets += [(socket.AF_INET, ("127.0.0.1", port)) for port in ports if port == self.tls_port]
        targets += [(socket.AF_INET, (self.listen_host, port)) for port in ports if port != self.tls_port]
        if self.admin_port is not None:
            targets.append((socket.AF_INET, (self.listen_host, self.admin_port)))
        for family, address in targets:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(address)
                except OSError:
                    return False
        return True

    def _log_tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no output)"
        return text[-4000:]

    def _make_certs(self) -> TLSFiles:
        folder = self.workdir / "pki"
        ca = make_ca(folder, "ca")
        server_cert, server_key = issue_cert(ca, folder, "haproxy", server=True)
        (folder / "haproxy.pem").write_bytes(server_cert.read_bytes() + server_key.read_bytes())
        client_cert, client_key = issue_cert(ca, folder, "client", server=False)
        return TLSFiles(ca_file=ca.cert, cert_file=client_cert, key_file=client_key)

    def _render(self) -> str:
        lines = ["global",
                 f"    stats socket {self.admin_socket} mode 600 level admin expose-fd listeners",
                 "    stats timeout 2m"]
        if self.admin_port is not None:
            lines.append(f"    stats socket ipv4@{self.listen_host}:{self.admin_port} level admin")
        lines += ["defaults",
                  "    mode http",
                  "    timeout connect 1s",
                  "    timeout client 10s",
                  "    timeout server 10s"]
        # Never re-send a request elsewhere: a request sent to a dead server must fail visibly, or
        # the "0 failed requests" our tests and demos claim would hide the failures we exist to prevent.
        lines.append("    retries 0")
        for backend in self.backends:
            lines += [f"frontend fe_{backend}",
                      f"    bind {self.listen_host}:{self.frontend_ports[backend]}",
                      f"    default_backend {backend}",
                      f"backend {backend}",
                      "    balance roundrobin"]
            if backend in self.declared:
                lines.append(f"    server {DECLARED_SERVER} {self.declared[backend]}")
        if self.tls_port is not None:
            # HAProxy 2.6.12 accepts `stats socket ipv4@... ssl crt ... verify required` but serves
            # PLAIN TEXT on it, to anyone. A TCP proxy terminating mutual TLS in front of the unix
            # socket is what really requires a client certificate.
            pki = self.workdir / "pki"
            lines += ["listen admin_tls",
                      "    mode tcp",
                      f"    bind 127.0.0.1:{self.tls_port} ssl crt {pki / 'haproxy.pem'} "
                      f"ca-file {pki / 'ca.crt'} verify required",
                      "    timeout client 2m",
                      "    timeout server 2m",
                      f"    server admin unix@{self.admin_socket}"]
        return "\n".join(lines) + "\n"


def _wait_stopped(pid: int, within: float = 5.0) -> None:
    """Until the kernel shows the process stopped (state T in /proc/PID/stat)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return  # gone: nothing answers either
        if state in ("T", "t"):
            return
        time.sleep(0.001)
    raise RuntimeError(f"HAProxy (pid {pid}) did not stop within {within:g} s of SIGSTOP")
