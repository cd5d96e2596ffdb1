"""An AWS emulator for tests: moto's server on loopback, and a small throttling proxy in front.

moto does not emulate throttling, so ThrottlingProxy answers `400 Throttling` (the error AWS
sends when a request rate is exceeded) to the next N calls of an action before forwarding the
rest to moto unchanged. It also records which access key signed each call and how many targets
each call carried, so tests can check credentials and batching. Never reaches the internet.
"""

from __future__ import annotations

import http.client
import re
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from moto.server import ThreadedMotoServer

# EC2, SQS and Auto Scaling (tests/integration/test_ec2_source.py): shared with the demo
from poolkeeper_dev.aws_emulator import (
    CREDENTIALS,
    REGION,
    client,
    ec2_state_change,
    lifecycle_message,
    moto_server,
    record_lifecycle_actions,
)
from poolkeeper_dev.ports import free_port

__all__ = ["CREDENTIALS", "DUMMY_KEYS", "REGION", "MotoServer", "ThrottlingProxy", "client", "ec2_state_change",
           "emulator", "lifecycle_message", "moto_server", "record_lifecycle_actions"]

DUMMY_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
THROTTLED = (b'<ErrorResponse xmlns="http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/"><Error>'
             b"<Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>"
             b"<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>")


class MotoServer:
    """moto's server mode on 127.0.0.1 and a free port; fails (never skips) when it cannot start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


class ThrottlingProxy:
    """Forwards to `upstream`, except for the throttled calls; records what it saw."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.lock = threading.Lock()
        self.budget: Counter[str] = Counter()  # action -> calls still to throttle
        self.calls: Counter[str] = Counter()  # action -> calls forwarded
        self.throttled: Counter[str] = Counter()
        self.targets_per_call: dict[str, list[int]] = {}
        self.access_keys: set[str] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # botocore's query protocol: form-encoded POST
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                form = urllib.parse.parse_qs(body.decode())
                action = (form.get("Action") or [""])[0]
                if match := re.search(r"Credential=([^/]+)/", self.headers.get("Authorization") or ""):
                    proxy.access_keys.add(match.group(1))
                with proxy.lock:
                    throttle = proxy.budget[action] > 0
                    if throttle:
                        proxy.budget[action] -= 1
                        proxy.throttled[action] += 1
                    else:
                        proxy.calls[action] += 1
                        proxy.targets_per_call.setdefault(action, []).append(
                            sum(1 for k in form if re.fullmatch(r"Targets\.member\.\d+\.Id", k)))
                if throttle:
                    self._answer(400, {"Content-Type": "text/xml"}, THROTTLED)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    conn.request("POST", self.path, body, headers)
                    response = conn.getresponse()
                    payload = response.read()
                    self._answer(response.status, dict(response.getheaders()), payload)
                finally:
                    conn.close()

            def _answer(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def throttle(self, action: str, calls: int) -> None:
        with self.lock:
            self.budget[action] = calls

    def start(self) -> ThrottlingProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def emulator() -> Iterator[tuple[MotoServer, ThrottlingProxy]]:
    """moto, and the proxy in front of it (a generator for a pytest fixture)."""
    moto = MotoServer().start()
    proxy = ThrottlingProxy(moto.url).start()
    try:
        yield moto, proxy
    finally:
        proxy.stop()
        moto.stop()
