"""deliver_http against a real aiohttp receiver on 127.0.0.1: encoding, signing, statuses, address policy."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from poolkeeper.core.addresses import METADATA_ADDRESSES
from poolkeeper.functions.http import (
    GuardedConnector,
    address_refusal,
    check_url_allowed,
    classify_status,
    deliver_http,
    make_http_session,
    parse_cidrs,
)
from poolkeeper.functions.invoke_cli import sample_event

EVENT = sample_event(event="up", kind="Pod", namespace="shop", name="web-1", pool="web", address="10.1.2.3", port=80)
FLAG = "the operator's --http-allowed-cidrs"
WHO = METADATA_ADDRESSES[0][0]
METADATA = f"address 169.254.169.254 is a cloud metadata address ({WHO}): refused unless {FLAG} lists a CIDR inside " \
    "169.254.169.254/32"
LINK_LOCAL_V6 = f"address fe80::1 is link-local: refused unless {FLAG} lists a CIDR inside fe80::/10"
LOOPBACK = f"address {{}} is loopback: refused unless {FLAG} lists a CIDR inside {{}}"
LOOPBACK_V4, LOOPBACK_V6 = LOOPBACK.format("127.0.0.1", "127.0.0.0/8"), LOOPBACK.format("::1", "::1/128")
# The receiver listens on loopback, which the policy refuses unless allowed explicitly: these tests allow it.
ALLOW_LOOPBACK = parse_cidrs(["127.0.0.0/8"])


@dataclass
class Receiver:
    """A real HTTP server recording what it got and answering as told."""

    url: str = ""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    delay: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, headers=self.headers, text=self.body)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hook", state.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/hook"
    yield state
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_http_session() as made:
        yield made


class StaticResolver(AbstractResolver):
    """DNS from a table: lets a test name resolve to any address, as a hostile DNS server could."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self.table[host]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [{"hostname": host, "host": address, "port": port, "family": family, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


async def deliver(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"timeout": 5.0, "secret": None, "allowed_cidrs": ALLOW_LOOPBACK}
    options.update(kwargs)
    return await deliver_http(session, url, EVENT, **options)


async def test_binary_mode_cloudevent(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    result = await deliver(session, receiver.url)
    assert (result.ok, result.status, result.retryable, result.error) == (True, 200, False, None)
    assert result.duration_ms > 0
    [(headers, body)] = receiver.requests
    assert {k.lower(): unquote(v) for k, v in headers.items() if k.lower().startswith("ce-")} == {
        "ce-specversion": "1.0",
        "ce-type": "dev.poolkeeper.instance.up",
        "ce-source": "/namespaces/shop/targetpools/web",
        "ce-id": EVENT["id"],
        "ce-time": EVENT["time"],
        "ce-subject": "Pod/shop/web-1",
    }
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("poolkeeper/")
    assert "Poolkeeper-Signature" not in headers
    assert json.loads(body) == EVENT["data"]


async def test_signature_verifies_with_hmac(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    assert (await deliver(session, receiver.url, secret=b"topsecret")).ok
    [(headers, body)] = receiver.requests
    expected = "sha256=" + hmac.new(b"topsecret", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["Poolkeeper-Signature"], expected)


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (502, True), (503, True), (408, True), (409, True), (429, True),
     (400, False), (401, False), (403, False), (404, False), (410, False), (302, False)],
)
async def test_status_classes(receiver: Receiver, session: aiohttp.ClientSession, status: int, retryable: bool) -> None:
    receiver.status, receiver.body = status, "nope"
    if status == 302:
        receiver.headers = {"Location": "http://169.254.169.254/"}  # never followed
    result = await deliver(session, receiver.url)
    assert (result.ok, result.status, result.retryable) == (False, status, retryable)
    assert result.error == f"HTTP {status}"  # the status only: the body may be a service's answer
    assert len(receiver.requests) == 1


async def test_retry_after_seconds(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.status, receiver.headers = 429, {"Retry-After": "2"}
    result = await deliver(session, receiver.url)
    assert (result.retryable, result.retry_after) == (True, 2.0)


async def test_retry_after_date(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    receiver.status, receiver.headers = 503, {"Retry-After": format_datetime(when, usegmt=True)}
    result = await deliver(session, receiver.url)
    assert result.retryable and result.retry_after is not None and 27 <= result.retry_after <= 30


async def test_timeout_is_retryable(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.delay = 3.0
    result = await deliver(session, receiver.url, timeout=0.3)
    assert (result.ok, result.status, result.retryable, result.error) == (False, None, True, "timed out after 0.3s")
    assert result.duration_ms < 1500


async def test_connection_refused_is_retryable(session: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens here once closed
    result = await deliver(session, f"http://127.0.0.1:{port}/hook")
    assert (result.ok, result.retryable) == (False, True)
    assert result.error and "ClientConnectorError" in result.error


async def test_link_local_url_is_refused(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    result = await deliver(session, "http://169.254.169.254/latest/meta-data/")
    assert (result.ok, result.status, result.retryable) == (False, None, False)
    assert result.error == METADATA
    assert receiver.requests == []


async def test_name_resolving_to_link_local_is_refused_at_connect_time(receiver: Receiver) -> None:
    resolver = StaticResolver({"metadata.test": "169.254.169.254", "v6.test": "fe80::1"})
    async with aiohttp.ClientSession(connector=GuardedConnector(resolver=resolver)) as session:
        for host, message in (("metadata.test", METADATA), ("v6.test", LINK_LOCAL_V6)):
            assert check_url_allowed(f"http://{host}/", None) is None  # a name can't be judged early
            result = await deliver(session, f"http://{host}/x", allowed_cidrs=None)
            assert (result.ok, result.retryable, result.error) == (False, False, message)


async def test_allowlist_without_loopback_refuses_127_0_0_1(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    allowed = parse_cidrs(["10.0.0.0/8,192.168.0.0/16"])
    result = await deliver(session, receiver.url, allowed_cidrs=allowed)
    assert (result.ok, result.retryable, result.error) == (False, False, LOOPBACK_V4)
    by_name = await deliver(session, receiver.url.replace("127.0.0.1", "localhost"), allowed_cidrs=allowed)
    assert (by_name.ok, by_name.retryable) == (False, False)
    assert by_name.error in (LOOPBACK_V4, LOOPBACK_V6)
    assert receiver.requests == []
    assert (await deliver(session, receiver.url, allowed_cidrs=parse_cidrs(["127.0.0.0/8"]))).ok


async def test_pooled_connection_is_rechecked_against_the_current_policy(receiver: Receiver) -> None:
    resolver = StaticResolver({"hooks.test": "127.0.0.1"})
    url = receiver.url.replace("127.0.0.1", "hooks.test")
    async with aiohttp.ClientSession(connector=GuardedConnector(resolver=resolver)) as session:
        assert (await deliver(session, url)).ok  # leaves a keep-alive connection in the pool
        refused = await deliver(session, url, allowed_cidrs=parse_cidrs(["10.0.0.0/8"]))
        assert (refused.ok, refused.retryable, refused.error) == (False, False, LOOPBACK_V4)
    assert len(receiver.requests) == 1


async def test_needs_a_guarded_session(receiver: Receiver) -> None:
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(TypeError, match="make_http_session"):
            await deliver(plain, receiver.url)


@pytest.mark.parametrize(
    ("address", "allowed", "refused"),
    [
        ("10.0.0.1", None, False),
        ("127.0.0.1", None, True),
        ("0.0.0.0", None, True),
        ("::1", None, True),
        ("::", None, True),
        ("fd00:ec2::254", None, True),
        ("100.100.100.200", None, True),
        ("168.63.129.16", None, True),
        ("198.19.0.10", None, False),
        ("169.254.169.254", None, True),
        ("169.254.0.1", None, True),
        ("fe80::1", None, True),
        ("fe80::1%eth0", None, True),
        ("::ffff:169.254.169.254", None, True),
        ("2001:db8::1", None, False),
        ("10.0.0.1", ["10.0.0.0/8"], False),
        ("11.0.0.1", ["10.0.0.0/8"], True),
        ("127.0.0.1", ["10.0.0.0/8"], True),
        ("::1", ["127.0.0.0/8"], True),
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),
        ("::ffff:127.0.0.1", ["::ffff:127.0.0.0/104"], False),
        ("169.254.169.254", ["0.0.0.0/0"], True),
        ("169.254.169.254", ["169.254.169.254/32"], False),
        ("169.254.169.253", ["169.254.169.254/32"], True),
        ("169.254.1.1", ["169.254.0.0/16"], False),
        ("fe80::1", ["::/0"], True),
        ("fe80::1", ["fe80::/10"], False),
        ("10.0.0.1", [], True),
    ],
)
def test_address_policy(address: str, allowed: list[str] | None, refused: bool) -> None:
    networks = None if allowed is None else parse_cidrs(allowed)
    assert (address_refusal(address, networks) is not None) == refused


@pytest.mark.parametrize(
    ("url", "allowed", "message"),
    [
        ("https://hooks.example.com/x", None, None),
        ("http://10.0.0.1:8080/x", None, None),
        ("http://169.254.169.254/", None, METADATA),
        ("http://[fe80::1]:80/", None, LINK_LOCAL_V6),
        ("http://127.0.0.1/", ["10.0.0.0/8"], LOOPBACK_V4),
        ("http://127.0.0.1/", None, LOOPBACK_V4),
        ("http://[::1]:80/", None, LOOPBACK_V6),
        ("ftp://10.0.0.1/", None, "URL 'ftp://10.0.0.1/' must use http or https"),
        ("http:///nohost", None, "URL 'http:///nohost' has no host"),
        ("http://10.0.0.1:99999/", None, "URL 'http://10.0.0.1:99999/' is invalid: Port out of range 0-65535"),
    ],
)
def test_check_url_allowed(url: str, allowed: list[str] | None, message: str | None) -> None:
    assert check_url_allowed(url, None if allowed is None else parse_cidrs(allowed)) == message


def test_parse_cidrs() -> None:
    assert parse_cidrs(["10.0.0.0/8, 192.168.1.0/24", "fd00::/8", ""]) == [
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("fd00::/8")
    ]
    with pytest.raises(ValueError):
        parse_cidrs(["10.0.0.1/8"])  # host bits set: almost certainly a typo


@pytest.mark.parametrize(("status", "expected"), [(200, (True, False)), (204, (True, False)), (299, (True, False)),
                                                  (199, (False, False)), (300, (False, False)), (499, (False, False)),
                                                  (599, (False, True)), (600, (False, False))])
def test_classify_status(status: int, expected: tuple[bool, bool]) -> None:
    assert classify_status(status) == expected


async def test_default_policy_refuses_loopback_and_metadata(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    """Without --http-allowed-cidrs, a tenant's URL reaches neither the operator's loopback nor metadata."""
    for url, message in ((receiver.url, LOOPBACK_V4), (receiver.url.replace("127.0.0.1", "[::1]"), LOOPBACK_V6),
                         ("http://0.0.0.0:1/", "address 0.0.0.0 is unspecified: refused unless the operator's "
                                               "--http-allowed-cidrs lists a CIDR inside 0.0.0.0/8"),
                         ("http://169.254.169.254/", METADATA)):
        result = await deliver(session, url, allowed_cidrs=None)
        assert (result.ok, result.retryable, result.error) == (False, False, message)
    assert receiver.requests == []


async def test_error_body_is_never_reported(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.status, receiver.body = 500, "internal secret: s3cr3t-token"
    result = await deliver(session, receiver.url)
    assert (result.ok, result.status, result.error) == (False, 500, "HTTP 500")
