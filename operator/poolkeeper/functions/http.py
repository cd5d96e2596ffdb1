"""Deliver events to HTTP handlers as binary-mode CloudEvents, refusing forbidden addresses.

The address policy is enforced on the socket aiohttp actually connects (via the connector's
`socket_factory`) and re-checked on pooled connections before they are reused, so neither DNS
rebinding nor a resolution that differs from an earlier check can slip a request through.
"""

from __future__ import annotations

import contextvars
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.client_reqrep import ClientRequest
from aiohttp.tracing import Trace

from poolkeeper import __version__
from poolkeeper.core.addresses import HTTP_ALLOWANCE, refusal
from poolkeeper.core.cloudevents import SIGNATURE_HEADER, binary_mode_http, sign
from poolkeeper.core.retry import retry_after_seconds

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RETRYABLE_STATUSES = frozenset({408, 409, 429})
_MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome of one POST; `retryable` says whether trying again later may succeed."""

    ok: bool
    status: int | None
    retryable: bool
    retry_after: float | None
    error: str | None
    duration_ms: float


# ---- pure policy -------------------------------------------------------------------------------


def address_refusal(address: str | IPAddress, allowed_cidrs: Sequence[IPNetwork] | None) -> str | None:
    """Why connecting to `address` is forbidden, or None when it is allowed: the operator's one
    address policy (core/addresses.py) with `--http-allowed-cidrs` as the allowance."""
    return refusal(address, allowed_cidrs, HTTP_ALLOWANCE)


def check_url_allowed(url: str, allowed_cidrs: Sequence[IPNetwork] | None) -> str | None:
    """Why `url` can't be delivered to, as far as can be known without DNS; None if it may be.

    Catches bad schemes, missing hosts and literal-IP hosts the policy refuses, so a handler's
    Ready condition can say so before the first event. Host names are checked at connect time.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for an invalid port
    except ValueError as exc:
        return f"URL {url!r} is invalid: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"URL {url!r} must use http or https"
    if not host:
        return f"URL {url!r} has no host"
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a name: resolved and checked when connecting
    return address_refusal(host, allowed_cidrs)


def parse_cidrs(values: Sequence[str]) -> list[IPNetwork]:
    """Networks from `--http-allowed-cidrs` values (comma-separated lists allowed); ValueError if bad."""
    items = (item.strip() for value in values for item in value.split(","))
    return [ipaddress.ip_network(item) for item in items if item]


def classify_status(status: int) -> tuple[bool, bool]:
    """(ok, retryable) for an HTTP status: 2xx ok; 408, 409, 429 and 5xx worth retrying."""
    ok = 200 <= status < 300
    return ok, (not ok) and (status in RETRYABLE_STATUSES or 500 <= status < 600)


# ---- the guarded connector ---------------------------------------------------------------------


@dataclass(slots=True)
class _Guard:
    """The policy of the request in flight and what it refused (per task, via a context variable)."""

    allowed_cidrs: Sequence[IPNetwork] | None
    refused: list[str] = field(default_factory=list)
    attempted: int = 0


_current_guard: contextvars.ContextVar[_Guard | None] = contextvars.ContextVar(
    "poolkeeper_http_guard", default=None
)


class AddressNotAllowedError(aiohttp.ClientConnectionError):
    """A pooled connection's peer is not allowed under the current policy."""


class GuardedConnector(aiohttp.TCPConnector):
    """A TCPConnector that only connects to addresses the policy allows.

    The policy is that of the deliver_http call in progress, else `allowed_cidrs` given here.
    """

    def __init__(self, allowed_cidrs: Sequence[IPNetwork] | None = None, **kwargs: Any) -> None:
        super().__init__(socket_factory=self._socket_for, **kwargs)
        self.allowed_cidrs = allowed_cidrs

    def _guard(self) -> _Guard:
        return _current_guard.get() or _Guard(self.allowed_cidrs)

    def _socket_for(self, addr_info: Any) -> socket.socket:
        """Create the socket for one connection attempt, unless the policy refuses its address."""
        family, type_, proto, _, sockaddr = addr_info
        guard = self._guard()
        guard.attempted += 1
        refused = address_refusal(sockaddr[0], guard.allowed_cidrs)
        if refused is not None:
            guard.refused.append(refused)
            raise OSError(refused)
        return socket.socket(family=family, type=type_, proto=proto)

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> aiohttp.connector.Connection:
        """Hand out a connection only if its peer is allowed now (a pooled one may predate the policy)."""
        connection = await super().connect(req, traces, timeout)
        peer = connection.transport.get_extra_info("peername") if connection.transport else None
        if peer:
            guard = self._guard()
            refused = address_refusal(peer[0], guard.allowed_cidrs)
            if refused is not None:
                guard.refused.append(refused)
                connection.close()
                raise AddressNotAllowedError(refused)
        return connection


def make_http_session(
    allowed_cidrs: Sequence[IPNetwork] | None = None, *, limit: int = 100, limit_per_host: int = 32
) -> aiohttp.ClientSession:
    """A ClientSession for deliver_http (call inside the event loop; close it on shutdown)."""
    connector = GuardedConnector(allowed_cidrs, limit=limit, limit_per_host=limit_per_host)
    return aiohttp.ClientSession(
        connector=connector, headers={"User-Agent": f"poolkeeper/{__version__}"}, trust_env=False
    )


# ---- delivery -------------------------------------------------------------------------------


async def deliver_http(
    session: aiohttp.ClientSession,
    url: str,
    event: dict[str, Any],
    *,
    timeout: float,  # noqa: ASYNC109 - a per-request aiohttp timeout, reported as a retryable result
    secret: bytes | None,
    allowed_cidrs: Sequence[IPNetwork] | None,
) -> DeliveryResult:
    """POST `event` to `url` once; never raises for anything the network or receiver does.

    `session` must come from make_http_session(): its connector enforces `allowed_cidrs`.
    """
    if not isinstance(session.connector, GuardedConnector):
        raise TypeError("deliver_http needs a session from make_http_session() so addresses are checked")
    started = time.monotonic()

    def result(
        ok: bool, status: int | None, retryable: bool, error: str | None, retry_after: float | None = None
    ) -> DeliveryResult:
        return DeliveryResult(ok, status, retryable, retry_after, error, (time.monotonic() - started) * 1000)

    refused = check_url_allowed(url, allowed_cidrs)
    if refused is not None:
        return result(False, None, False, refused)
    headers, body = binary_mode_http(event)
    if secret is not None:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    guard = _Guard(allowed_cidrs)
    token = _current_guard.set(guard)
    try:
        limit = aiohttp.ClientTimeout(total=timeout)
        request = session.post(url, data=body, headers=headers, timeout=limit, allow_redirects=False)
        async with request as response:
            # Read (a bounded part of) the body so the connection can be reused. It is never reported:
            # a tenant's URL may reach a service whose answer the tenant must not read in status.
            await response.content.read(_MAX_BODY)
            status = response.status
            retry_after_header = response.headers.get("Retry-After")
    except TimeoutError:
        return result(False, None, True, f"timed out after {timeout:g}s")
    except aiohttp.InvalidURL as exc:
        return result(False, None, False, f"URL {url!r} is invalid: {exc}")
    except (aiohttp.ClientError, OSError) as exc:
        refused_all = guard.attempted == len(guard.refused) or isinstance(exc, AddressNotAllowedError)
        if guard.refused and refused_all:
            return result(False, None, False, guard.refused[0])
        return result(False, None, True, f"{type(exc).__name__}: {exc}")
    finally:
        _current_guard.reset(token)
    ok, retryable = classify_status(status)
    if ok:
        return result(True, status, False, None)
    error = f"HTTP {status}"
    retry_after = retry_after_seconds(retry_after_header, datetime.now(UTC)) if retryable else None
    return result(False, status, retryable, error, retry_after)
