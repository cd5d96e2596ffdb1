"""testweb: the HTTP server in the poolkeeper.dev/testweb image, a stand-in for a real application.

Standard library only (the image has Debian's python3 and nothing else). It listens on $PORT
(8080) on every address, answers `GET /` with a line naming $POD_NAME and the port (`?delay=S`
holds the answer S seconds, to have a request in flight), and `GET /healthz` with 200.
On SIGTERM or SIGINT it drains like a typical application: it stops accepting connections,
closes idle keep-alive connections, lets requests in flight finish (answering them with
`Connection: close`) and exits 0 when none is left, or after 5 seconds whatever remains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

DRAIN_SECONDS = 5.0
MAX_DELAY = 30.0


class Server(ThreadingHTTPServer):
    """Tracks connections so a drain can close the idle ones and wait for the busy ones."""

    daemon_threads = True
    request_queue_size = 128
    address_family = socket.AF_INET6

    def __init__(self, port: int) -> None:
        self.lock = threading.Condition()
        self.connections: dict[socket.socket, bool] = {}  # connection -> a request is in flight
        self.draining = False
        try:
            super().__init__(("::", port), Handler)
        except OSError:  # no IPv6 in this network namespace
            self.address_family = socket.AF_INET
            super().__init__(("0.0.0.0", port), Handler)

    def server_bind(self) -> None:
        """Dual-stack, and no reverse lookup of the address (HTTPServer's getfqdn can hang without DNS)."""
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "testweb", self.server_address[1]

    def mark(self, connection: socket.socket, busy: bool | None) -> None:
        """busy: a request started; False: it ended; None: the connection closed."""
        with self.lock:
            if busy is None:
                self.connections.pop(connection, None)
                self.lock.notify_all()
            else:
                self.connections[connection] = busy
                if not busy and self.draining:
                    _close_reading(connection)

    def drain(self, deadline: float) -> bool:
        """Stop accepting, close idle connections, wait for busy ones; True if all finished in time."""
        self.shutdown()
        self.server_close()
        with self.lock:
            self.draining = True
            for connection, busy in self.connections.items():
                if not busy:
                    _close_reading(connection)
            return self.lock.wait_for(lambda: not self.connections, timeout=max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away is no error
            super().handle_error(request, client_address)


def _close_reading(connection: socket.socket) -> None:
    """Wake a handler blocked reading the next request: it sees end of stream and closes."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RD)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.mark(self.connection, False)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.mark(self.connection, None)

    def parse_request(self) -> bool:
        self.server.mark(self.connection, True)
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            if not self.close_connection:
                self.server.mark(self.connection, False)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._reply(200, b"ok\n")
        elif url.path == "/":
            try:
                delay = min(MAX_DELAY, float(parse_qs(url.query).get("delay", ["0"])[0] or 0))
            except ValueError:
                self._reply(400, b"delay must be a number of seconds\n")
                return
            if delay > 0:
                time.sleep(delay)
            pod = os.environ.get("POD_NAME") or socket.gethostname()
            self._reply(200, f"testweb pod={pod} port={self.server.server_address[1]}\n".encode())
        else:
            self._reply(404, b"not found\n")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.server.draining:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"testweb: {self.address_string()} {format % args}\n")


def main() -> int:
    port = int(os.environ.get("PORT") or 8080)
    server = Server(port)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    print(f"testweb: listening on port {port}", file=sys.stderr, flush=True)
    while not stop.wait(3600):
        pass
    finished = server.drain(time.monotonic() + DRAIN_SECONDS)
    print(f"testweb: stopped ({'drained' if finished else 'gave up on requests after 5 s'})",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
