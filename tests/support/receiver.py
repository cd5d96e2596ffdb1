"""A real HTTP receiver for CloudEvents deliveries, on 127.0.0.1, with scripted answers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SECRET_BODY = "internal-token=pk-secret-7f3a9c"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def event_id(self) -> str:
        return self.headers.get("ce-id", "")

    @property
    def data(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """`/ok` answers 204; `/fail-N` fails the first N deliveries of each event id with 503;
    `/always-500`; `/secret-500...` answers 500 with SECRET_BODY; `/slow-<subject suffix>` sleeps 4 s
    for subjects ending in that suffix."""

    port: int = 0
    received: list[Received] = field(default_factory=list)
    _attempts: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def start(self) -> Receiver:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        item = Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body, time.time())
        self.received.append(item)
        path = request.path
        self._attempts[(path, item.event_id)] += 1
        if path.startswith("/fail-"):
            if self._attempts[(path, item.event_id)] <= int(path.split("/")[1].split("-", 1)[1]):
                return web.Response(status=503, text="not yet")
        elif path == "/always-500":
            return web.Response(status=500, text="broken")
        elif path.startswith("/secret-500"):  # an internal service answering with what a tenant must not read
            return web.Response(status=500, text=f"{SECRET_BODY} (path {path})")
        elif path.startswith("/slow-") and item.headers.get("ce-subject", "").endswith(path[len("/slow-"):]):
            await asyncio.sleep(4)
        return web.Response(status=204)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
