"""A thin async Elastic Load Balancing v2 client on aiobotocore: batching and error wording only.

botocore's standard retry mode backs off throttled calls with jittered exponential delays;
a call still throttled after its attempts raises AWSError(reason="Throttled").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from poolkeeper.aws import NOT_INSTALLED, AWSError
from poolkeeper.core.elbv2 import Target, TargetHealth, batches

THROTTLE_CODES = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
                            "RequestThrottled", "SlowDown"})
WRITES = frozenset({"register_targets", "deregister_targets"})
ATTEMPTS = 5  # per call, the first included (botocore standard mode: jittered backoff, at most 20 s apart)


def _error(exc: Exception) -> AWSError:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
        message = str((response.get("Error") or {}).get("Message") or exc)
        if code in THROTTLE_CODES:
            return AWSError("Throttled", f"Elastic Load Balancing throttled the call ({code}) after "
                                         f"{ATTEMPTS} attempts with backoff: {message}")
        if code == "TargetGroupNotFound":
            return AWSError("TargetGroupNotFound", f"target group not found: {message}")
        return AWSError("AWSError", f"{code}: {message}")
    return AWSError("AWSUnreachable", str(exc) or type(exc).__name__)


class ELBv2Client:
    """One account + region (+ endpoint); the aiobotocore client is opened at first use."""

    def __init__(self, region: str, endpoint_url: str = "", credentials: tuple[str, str] | None = None,
                 attempts: int = ATTEMPTS, may_act: Callable[[], bool] | None = None) -> None:
        self.region, self.endpoint_url, self.credentials, self.attempts = region, endpoint_url, credentials, attempts
        self.may_act = may_act  # fenced like HAProxy commands: None always; reads are never fenced
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def _open(self) -> Any:
        if self._client is not None:
            return self._client
        try:
            from aiobotocore.session import get_session
            from botocore.config import Config
        except ImportError as exc:
            raise AWSError(*NOT_INSTALLED) from exc
        kwargs: dict[str, Any] = {"region_name": self.region,
                                  "config": Config(retries={"mode": "standard", "max_attempts": self.attempts},
                                                   connect_timeout=5, read_timeout=15)}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.credentials is not None:
            kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = self.credentials
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(get_session().create_client("elbv2", **kwargs))
        self._stack = stack
        return self._client

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        if operation in WRITES and self.may_act is not None and not self.may_act():
            raise AWSError("NotLeading", f"{operation} not sent: this replica no longer holds the pool's Lease")
        client = await self._open()
        try:
            answer: dict[str, Any] = await getattr(client, operation)(**params)
        except AWSError:
            raise
        except Exception as exc:  # botocore's ClientError, EndpointConnectionError, ...
            if type(exc).__module__.split(".")[0] not in ("botocore", "aiobotocore", "aiohttp"):
                raise
            raise _error(exc) from exc
        return answer

    async def target_group(self, arn: str) -> tuple[str, dict[str, str]]:
        """The target group's target type and tags."""
        groups = await self._call("describe_target_groups", TargetGroupArns=[arn])
        found = groups.get("TargetGroups") or []
        if not found:
            raise AWSError("TargetGroupNotFound", f"target group {arn} not found")
        described = await self._call("describe_tags", ResourceArns=[arn])
        tags = {t["Key"]: t.get("Value", "") for d in described.get("TagDescriptions") or [] for t in d.get("Tags")
                or []}
        return str(found[0].get("TargetType") or ""), tags

    async def check(self, arns: Sequence[str]) -> None:
        """The API answers with these credentials and every listed target group exists."""
        for batch in batches(list(arns), 20):
            await self._call("describe_target_groups", TargetGroupArns=list(batch))

    async def health(self, arn: str, targets: Sequence[Target]) -> dict[tuple[str, int], TargetHealth]:
        """DescribeTargetHealth for exactly these targets, in batches."""
        out: dict[tuple[str, int], TargetHealth] = {}
        for batch in batches(targets):
            answer = await self._call("describe_target_health", TargetGroupArn=arn,
                                      Targets=[{"Id": t.id, "Port": t.port} for t in batch])
            for item in answer.get("TargetHealthDescriptions") or []:
                target, health = item.get("Target") or {}, item.get("TargetHealth") or {}
                out[(str(target.get("Id")), int(target.get("Port") or 0))] = TargetHealth(
                    str(health.get("State") or ""), str(health.get("Reason") or ""))
        return out

    async def register(self, arn: str, targets: Iterable[Target]) -> None:
        for batch in batches(list(targets)):
            await self._call("register_targets", TargetGroupArn=arn,
                             Targets=[{"Id": t.id, "Port": t.port} for t in batch])

    async def deregister(self, arn: str, targets: Iterable[Target]) -> None:
        for batch in batches(list(targets)):
            await self._call("deregister_targets", TargetGroupArn=arn,
                             Targets=[{"Id": t.id, "Port": t.port} for t in batch])

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
