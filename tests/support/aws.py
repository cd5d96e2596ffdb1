"""moto's server mode on loopback, standing in for AWS in the tests: never the internet.

What it does not prove: real throttling limits, eventual consistency, IAM, health-check timing,
EventBridge routing (tests send EventBridge-shaped messages to SQS themselves).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from poolkeeper_dev.ports import free_port

REGION = "us-east-1"
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
