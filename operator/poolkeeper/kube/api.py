"""A small async Kubernetes API client over one aiohttp session.

It lists and watches Pods, Nodes and Instances for kube/informer.py (kopf watches the
poolkeeper objects and Namespaces) and does the writes the operator needs (status,
finalizers, EndpointSlices, pod conditions, Events, ConfigMaps) without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
READ_ATTEMPTS = 6
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


class ApiError(Exception):
    """A non-2xx answer; `status` and `reason` come from the API server's Status object."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


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

    def __init__(self, info: kopf.ConnectionInfo, *, limit: int = 32) -> None:
        self.info = info
        self.server = info.server.rstrip("/")
        self._headers = {"Accept": "application/json", **info.as_http_headers()}
        self._ssl = ssl_context(info)
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self._limit)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    @property
    def watch_session(self) -> aiohttp.ClientSession:
        """Long-lived watch streams get their own connections, so they never starve requests."""
        if self._watch_session is None or self._watch_session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=0)
            self._watch_session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._watch_session

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()

    async def request(self, method: str, path: str, *, body: Any = None, content_type: str = "application/json",
                      params: Mapping[str, str] | None = None) -> Any:
        """One request; reads (GET) are retried briefly on 429/5xx and dropped connections, as
        an API server answers those while it starts or its storage for a new CRD initialises."""
        attempts = READ_ATTEMPTS if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._request_once(method, path, body=body, content_type=content_type, params=params)
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
                            params: Mapping[str, str] | None) -> Any:
        url = self.server + path + (f"?{urlencode(params)}" if params else "")
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            if resp.status >= 300:
                retry_after = resp.headers.get("Retry-After")
                wait = float(retry_after) if retry_after and retry_after.isdigit() else None
                try:
                    status = json.loads(text)
                except ValueError:
                    raise ApiError(resp.status, resp.reason or "", text, wait) from None
                raise ApiError(resp.status, status.get("reason", ""), status.get("message", text), wait)
            return json.loads(text) if text else None

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        return await self.request("GET", path, params=params)

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
