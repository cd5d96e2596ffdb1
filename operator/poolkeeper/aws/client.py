"""Opening aiobotocore clients with the credentials a pool names; the only place that imports it."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from poolkeeper.aws import fence

NOT_INSTALLED = ("AWSSupportNotInstalled",
                 "this operator was installed without AWS support (pip install 'poolkeeper[aws]')")


def available() -> bool:
    """Whether aiobotocore can be imported (the `aws` extra is installed)."""
    return importlib.util.find_spec("aiobotocore") is not None


@dataclass(frozen=True, slots=True)
class Credentials:
    """Static keys from a Secret; None as credentials means the default chain (the operator's identity)."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    @classmethod
    def from_secret(cls, data: Mapping[str, str]) -> Credentials | None:
        """The usual key names (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), or None
        when the first two are missing."""
        key, secret = data.get("AWS_ACCESS_KEY_ID"), data.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            return None
        return cls(key, secret, data.get("AWS_SESSION_TOKEN") or None)


@contextlib.asynccontextmanager
async def clients(services: tuple[str, ...], region: str, endpoint_url: str,
                  credentials: Credentials | None, read_timeout: float = 40.0,
                  may_act: Callable[[], bool] | None = None) -> AsyncIterator[list[Any]]:
    """One client per service, closed on exit; retries in botocore's standard mode (throttling backs off);
    the calls that change something are leader-fenced with `may_act` (poolkeeper.aws.fence)."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(connect_timeout=10, read_timeout=read_timeout,
                       retries={"max_attempts": 5, "mode": "standard"})
    keys: dict[str, Any] = {}
    if credentials is not None:
        keys = {"aws_access_key_id": credentials.access_key_id,
                "aws_secret_access_key": credentials.secret_access_key,
                "aws_session_token": credentials.session_token}
    session = get_session()
    async with contextlib.AsyncExitStack() as stack:
        opened = [await stack.enter_async_context(session.create_client(
            service, region_name=region, endpoint_url=endpoint_url or None, config=config, **keys))
            for service in services]
        for opened_client in opened:
            fence(opened_client, may_act)
        yield opened
