"""A real HAProxy for tests and demos, in its own folder, with backends that start empty.

    proc = HAProxyProcess(tmp_path, backends=["web"], declared={"web": "127.0.0.2:8080"}, tls=True)
    proc.start()
    client = HAProxyClient(proc.admin_endpoint)          # unix socket, level admin
    tls = HAProxyClient(proc.tcp_endpoint, proc.tls_files)  # TCP + TLS client certificate
    proc.frontend_url("web")                             # -> "http://127.0.0.1:PORT"
    proc.restart()                                       # full stop + start: runtime servers are gone
    proc.stop()

Each backend gets its own frontend on 127.0.0.1 and `balance roundrobin` (dynamic servers need a
dynamic algorithm). A backend listed in `declared` also gets a server named "static" from the
config file, which poolkeeper must never touch. With tls=True the admin socket is also reachable
on TCP through mutual TLS (certificates made with `openssl`). When HAProxy cannot start, start()
raises with HAProxy's own stderr: a broken environment fails loudly, it is never skipped.
"""

from __future__ import annotations

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


class HAProxyProcess:
    """One `haproxy -db` subprocess; ports and certificates stay the same across restarts."""

    def __init__(self, workdir: Path, backends: Sequence[str] = ("web",), *,
                 declared: Mapping[str, str] | None = None, tls: bool = False, binary: str = HAPROXY,
                 listen_host: str = "127.0.0.1") -> None:
        """`listen_host`: where the frontends and the plain TCP admin socket listen (a devcluster
        node's bridge address lets pods reach the runtime API)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backends = list(backends)
        self.declared = dict(declared or {})  # backend -> "ADDR:PORT [server options]" of the "static" server
        self.binary = binary
        self.config = self.workdir / "haproxy.cfg"
        self.log = self.workdir / "haproxy.log"
        self.frontend_ports = {backend: free_port() for backend in self.backends}
        self.tls_port = free_port() if tls else None
        self.listen_host = listen_host
        self.admin_port = free_port() if listen_host != "127.0.0.1" else None
        self._tls_files: TLSFiles | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ----- what tests use
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
        """Start and wait until the admin socket and every frontend accept connections."""
        if self.pid is not None:
            raise RuntimeError("HAProxy is already running")
        if self.tls_port is not None and self._tls_files is None:
            self._tls_files = self._make_certs()
        self.config.write_text(self._render())
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen([self.binary, "-f", str(self.config), "-db"],
                                          stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self._proc.returncode}:\n{self._log_tail()}")
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

    def __enter__(self) -> HAProxyProcess:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ----- internals
    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _ready(self) -> bool:
        targets: list[tuple[int, str | tuple[str, int]]] = [(socket.AF_UNIX, str(self.admin_socket))]
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
