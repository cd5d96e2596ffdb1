"""A small async Kubernetes API client over one aiohttp session (and one for watch streams).

Every read, write and watch of the operator goes through it, without blocking the event loop.
On 401 it loads the credentials again (a projected ServiceAccount token rotates under us) and
retries once. With leader election, writes are refused once this process may no longer act.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf

from poolkeeper.kube.decoding import Decode, encode
from poolkeeper.kube.decoding import decode as decode_whole

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
READ_ATTEMPTS = 6
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
log = logging.getLogger(__name__)
Reload = Callable[[], kopf.ConnectionInfo]


class ApiError(Exception):
    """A non-2xx answer; `status` and `reason` come from the API server's Status object."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class NotLeading(ApiError):
    """A write refused locally: this replica's leadership ended (see LeaderElector.is_leading)."""

    def __init__(self, method: str, path: str) -> None:
        super().__init__(503, "NotLeading", f"{method} {path} not sent: this replica no longer leads")


def _material(path: Any, data: Any) -> str | None:
    """A file path for ssl, writing inline (base64 or PEM) data to a private temp file."""
    if path:
        return str(path)
    if not data:
        return None
    raw = data if isinstance(data, bytes) else str(data).encode()
    if not raw.lstrip().startswith(b"-----"):
        raw = base64.b64decode(raw)
    handle = tempfile.NamedTemporaryFile(prefix="poolkeeper-", suffix=".pem", delete=False)  # noqa: SIM115
    handle.write(raw)
    handle.close()
    return handle.name


def _error(resp: aiohttp.ClientResponse, text: str) -> ApiError:
    """The ApiError for a non-2xx answer, from the Status object the API server sends."""
    retry_after = resp.headers.get("Retry-After")
    wait = float(retry_after) if retry_after and retry_after.isdigit() else None
    try:
        status = json.loads(text)
    except ValueError:
        return ApiError(resp.status, resp.reason or "", text, wait)
    if not isinstance(status, dict):
        return ApiError(resp.status, resp.reason or "", text, wait)
    return ApiError(resp.status, status.get("reason", ""), status.get("message", text), wait)


def ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    ctx = ssl.create_default_context(cafile=_material(info.ca_path, info.ca_data))
    cert = _material(info.certificate_path, info.certificate_data)
    key = _material(info.private_key_path, info.private_key_data)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def resource_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = base + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeApi:
    """Requests against one API server; JSON in, JSON out, ApiError on failure."""

    def __init__(self, info: kopf.ConnectionInfo, *, limit: int = 32, reload: Reload | None = None,
                 may_write: Callable[[], bool] | None = None) -> None:
        self.info = info
        self.server = info.server.rstrip("/")
        self.headers = {"Accept": "application/json", **info.as_http_headers()}
        self._ssl = ssl_context(info)
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._reload = reload
        self._reloading: asyncio.Lock | None = None
        self.may_write = may_write  # None: always (no leader election)
        self.reloads = 0

    async def reload_credentials(self, rejected: Mapping[str, str]) -> bool:
        """After a 401: load the credentials again (a rotated token); False if nothing changed.

        `rejected` are the headers the 401 came back for: when another request already reloaded,
        the new ones are simply used."""
        if self._reload is None:
            return False
        self._reloading = self._reloading or asyncio.Lock()
        async with self._reloading:
            if rejected.get("Authorization") != self.headers.get("Authorization"):
                return True
            info = await asyncio.to_thread(self._reload)
            headers = {"Accept": "application/json", **info.as_http_headers()}
            if headers == self.headers:
                return False
            log.info("the API server refused our credentials (401); using the reloaded ones")
            self.info, self.headers = info, headers
            self.reloads += 1
            return True

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self._limit)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    @property
    def watch_session(self) -> aiohttp.ClientSession:
        """Long-lived watch streams get their own connections, so they never starve requests."""
        if self._watch_session is None or self._watch_session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=0)
            self._watch_session = aiohttp.ClientSession(connector=connector)
        return self._watch_session

    @contextlib.asynccontextmanager
    async def stream(self, path: str, params: Mapping[str, str],
                     limits: aiohttp.ClientTimeout) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open watch response (2xx), on the watch session; a 401 reloads credentials once."""
        for attempt in (1, 2):
            headers = dict(self.headers)
            async with self.watch_session.get(self.server + path, params=params, timeout=limits,
                                              headers=headers) as resp:
                if resp.status == 401 and attempt == 1 and await self.reload_credentials(headers):
                    continue
                if resp.status >= 300:
                    raise _error(resp, await resp.text())
                yield resp
                return

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()

    async def request(self, method: str, path: str, *, body: Any = None, content_type: str = "application/json",
                      params: Mapping[str, str] | None = None, decode: Decode = decode_whole) -> Any:
        """One request; reads (GET) are retried briefly on 429/5xx and dropped connections, as
        an API server answers those while it starts or its storage for a new CRD initialises."""
        if method != "GET" and self.may_write is not None and not self.may_write():
            raise NotLeading(method, path)
        attempts = READ_ATTEMPTS if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._request_once(method, path, body=body, content_type=content_type, params=params,
                                                decode=decode)
            except ApiError as exc:
                if attempt == attempts or exc.status not in RETRIED_STATUSES:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else 0.1 * 2 ** attempt
            except aiohttp.ClientConnectionError:
                if attempt == attempts:
                    raise
                delay = 0.1 * 2 ** attempt
            await asyncio.sleep(min(delay, 5.0))
        raise AssertionError("unreachable")

    async def _request_once(self, method: str, path: str, *, body: Any, content_type: str,
                            params: Mapping[str, str] | None, decode: Decode) -> Any:
        url = self.server + path + (f"?{urlencode(params)}" if params else "")
        data = None if body is None else encode(body)
        for attempt in (1, 2):
            auth = dict(self.headers)
            headers = {**auth, "Content-Type": content_type} if data is not None else auth
            async with self.session.request(method, url, data=data, headers=headers) as resp:
                raw = await resp.read()
                if resp.status == 401 and attempt == 1 and await self.reload_credentials(auth):
                    continue
                if resp.status >= 300:
                    raise _error(resp, raw.decode("utf-8", "replace"))
                return decode(raw) if raw else None
        raise AssertionError("unreachable")

    async def get(self, path: str, params: Mapping[str, str] | None = None, decode: Decode = decode_whole) -> Any:
        """`decode`: how the answer's bytes become objects (kube.decoding: whole, or a kind's schema)."""
        return await self.request("GET", path, params=params, decode=decode)

    async def list_items(self, path: str) -> list[dict[str, Any]]:
        """The items of a list, each with the apiVersion and kind that a list leaves out."""
        listing = await self.get(path)
        kind = (listing.get("kind") or "List").removesuffix("List")
        items: list[dict[str, Any]] = listing.get("items") or []
        for item in items:
            item.setdefault("apiVersion", listing.get("apiVersion"))
            item.setdefault("kind", kind)
        return items

    async def get_or_none(self, path: str) -> Any:
        try:
            return await self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: Any) -> Any:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: Any) -> Any:
        return await self.request("PUT", path, body=body)

    async def patch(self, path: str, body: Any, content_type: str = MERGE) -> Any:
        return await self.request("PATCH", path, body=body, content_type=content_type)

    async def delete(self, path: str) -> Any:
        try:
            return await self.request("DELETE", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
