"""An AWS emulator for tests: moto's server on loopback, and a small throttling proxy in front.

moto does not emulate throttling, so ThrottlingProxy answers `400 Throttling` (the error AWS
sends when a request rate is exceeded) to the next N calls of an action before forwarding the
rest to moto unchanged. It also records which access key signed each call and how many targets
each call carried, so tests can check credentials and batching. Never reaches the internet.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from moto.server import ThreadedMotoServer

from poolkeeper_dev.ports import free_port

REGION = "us-east-1"
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

# ----- EC2, SQS and Auto Scaling (tests/integration/test_ec2_source.py)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@contextmanager
def moto_server() -> Iterator[str]:
    """A fresh moto server on 127.0.0.1; yields its endpoint URL. It must start, or the test fails."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def client(service: str, endpoint: str) -> Any:
    """A boto3 client for the emulator, with its dummy credentials."""
    import boto3

    return boto3.client(service, region_name=REGION, endpoint_url=endpoint,
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def ec2_state_change(instance_id: str, state: str, at: datetime | None = None) -> str:
    """An "EC2 Instance State-change Notification" as EventBridge delivers it to an SQS queue."""
    when = (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({
        "version": "0", "id": f"evt-{instance_id}-{state}", "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2", "account": "123456789012", "time": when, "region": REGION,
        "resources": [f"arn:aws:ec2:{REGION}:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "state": state}})


def record_lifecycle_actions() -> list[dict[str, str]]:
    """moto 5 implements PutLifecycleHook but not CompleteLifecycleAction nor
    RecordLifecycleActionHeartbeat: the smallest handler for those two calls only, added to this
    process's emulator, which records what it receives (and answers with an empty result)."""
    from moto.autoscaling.responses import AutoScalingResponse
    from moto.core.responses import EmptyResult

    calls: list[dict[str, str]] = []
    keys = ("AutoScalingGroupName", "LifecycleHookName", "LifecycleActionToken", "InstanceId",
            "LifecycleActionResult")

    def recorder(action: str) -> Any:
        def respond(self: Any) -> Any:
            calls.append({"Action": action, **{k: self._get_param(k) for k in keys if self._get_param(k)}})
            return EmptyResult()
        return respond
    AutoScalingResponse.complete_lifecycle_action = recorder("CompleteLifecycleAction")  # type: ignore[attr-defined]
    AutoScalingResponse.record_lifecycle_action_heartbeat = recorder(  # type: ignore[attr-defined]
        "RecordLifecycleActionHeartbeat")
    return calls


def lifecycle_message(group: str, hook: str, transition: str, instance_id: str, token: str) -> str:
    """What a lifecycle hook sends to its SQS target (moto does not send it)."""
    return json.dumps({
        "Origin": "EC2", "Destination": "AutoScalingGroup", "Service": "AWS Auto Scaling",
        "Time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "AccountId": "123456789012",
        "LifecycleTransition": f"autoscaling:EC2_INSTANCE_{transition}", "RequestId": f"req-{token}",
        "AutoScalingGroupName": group, "LifecycleHookName": hook, "EC2InstanceId": instance_id,
        "LifecycleActionToken": token})
