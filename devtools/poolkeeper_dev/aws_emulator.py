"""The AWS emulator of the tests and the AWS demo: moto's server mode on loopback, plus what moto
does not do itself.

moto does not route EventBridge events nor send lifecycle hook messages: `ec2_state_change` and
`lifecycle_message` are those messages in AWS's shapes, for the caller to send to the queue. moto 5
implements PutLifecycleHook but not CompleteLifecycleAction or RecordLifecycleActionHeartbeat:
`record_lifecycle_actions` adds the smallest handler for those two calls only, which records what
it receives. `python -m poolkeeper_dev.aws_emulator --port P --record FILE` runs all that as a
process of its own (the demo's), the recorded calls appended to FILE as JSON lines.
Needs `moto[server]` and boto3 (poolkeeper's `dev` extra); never reaches the internet.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from poolkeeper_dev.ports import free_port

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
ACCOUNT = "123456789012"


@contextmanager
def moto_server(port: int | None = None) -> Iterator[str]:
    """A fresh moto server on 127.0.0.1; yields its endpoint URL. It must start, or the caller fails."""
    from moto.server import ThreadedMotoServer

    port = port or free_port()
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
        "source": "aws.ec2", "account": ACCOUNT, "time": when, "region": REGION,
        "resources": [f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "state": state}})


def lifecycle_message(group: str, hook: str, transition: str, instance_id: str, token: str) -> str:
    """What a lifecycle hook sends to its SQS target (moto does not send it)."""
    return json.dumps({
        "Origin": "EC2", "Destination": "AutoScalingGroup", "Service": "AWS Auto Scaling",
        "Time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "AccountId": ACCOUNT,
        "LifecycleTransition": f"autoscaling:EC2_INSTANCE_{transition}", "RequestId": f"req-{token}",
        "AutoScalingGroupName": group, "LifecycleHookName": hook, "EC2InstanceId": instance_id,
        "LifecycleActionToken": token})


def record_lifecycle_actions(sink: Callable[[dict[str, str]], None] | None = None) -> list[dict[str, str]]:
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
            call = {"Action": action, **{k: self._get_param(k) for k in keys if self._get_param(k)}}
            calls.append(call)
            if sink is not None:
                sink(call)
            return EmptyResult()
        return respond
    AutoScalingResponse.complete_lifecycle_action = recorder("CompleteLifecycleAction")  # type: ignore[attr-defined]
    AutoScalingResponse.record_lifecycle_action_heartbeat = recorder(  # type: ignore[attr-defined]
        "RecordLifecycleActionHeartbeat")
    return calls


def recorded(path: Path) -> list[dict[str, str]]:
    """The lifecycle calls an emulator process recorded so far (see main)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poolkeeper-aws-emulator", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", required=True, help="append the lifecycle calls here, one JSON line each")
    args = parser.parse_args(argv)
    lock = threading.Lock()
    path = Path(args.record)

    def append(call: dict[str, str]) -> None:
        with lock, path.open("a") as out:
            out.write(json.dumps(call) + "\n")
    record_lifecycle_actions(append)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    with moto_server(args.port) as endpoint:
        print(f"aws emulator: {endpoint}", flush=True)
        threading.Event().wait()  # until a signal ends the process
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
