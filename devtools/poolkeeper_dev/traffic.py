"""Real HTTP servers to put behind HAProxy, and a load generator to send real traffic through it.

Each backend answers 200 with its own "address:port" as the body, so the load generator can
count which backend served every request. Both run on their own thread and event loop, so
they can be used from plain code and from async tests alike (and keep their pace while the
test's loop is busy).

    backend = start_backend("127.0.0.2")          # or start_backend("127.0.0.3", delay=0.5)
    load = LoadGenerator(haproxy.frontend_url("web"), connections=8, rate=200).start(duration=5)
    report = load.wait()                           # or load.stop() at any time
    assert report.failed == 0, report.failures
    assert report.served_by[backend.name] > 0
    backend.stop()                                 # graceful: in-flight requests finish

The client side is a plain HTTP/1.1 keep-alive client on asyncio streams, not aiohttp's:
aiohttp (3.10+) silently re-sends an idempotent request that failed on a reused connection,
which hid every request HAProxy cut (18 of ~430 in a forced-removal control run read as 0).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class _LoopThread:
    """An event loop running on a daemon thread, for servers and clients that must not share ours."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class HTTPBackend:
    """A running HTTP server; `delay` (seconds, settable) makes every request slow.

    A request may also ask for its own delay with `?delay=SECONDS`, to hold a session open.
    """

    def __init__(self, address: str, sock: socket.socket, delay: float) -> None:
        self.address = address
        self.port: int = sock.getsockname()[1]
        self.delay = delay
        self.requests_served = 0  # answered requests
        self.in_flight = 0  # requests being handled right now
        self._thread = _LoopThread(f"http-backend-{self.name}")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0)
        self._thread.run(self._start(sock))

    @property
    def name(self) -> str:
        """What it answers: "address:port", the same text HAProxy's `add server` takes."""
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/"

    async def _start(self, sock: socket.socket) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            delay = float(request.query.get("delay", self.delay))
            if delay > 0:
                await asyncio.sleep(delay)
            self.requests_served += 1
            return web.Response(text=self.name)
        finally:
            self.in_flight -= 1

    def stop(self) -> None:
        """Stop listening, let in-flight requests finish (up to 10 s), close idle keep-alives."""
        if self._thread.loop.is_closed():
            return
        self._thread.run(self._runner.cleanup())
        self._thread.close()

    def __repr__(self) -> str:
        return f"HTTPBackend({self.name}, served={self.requests_served})"


def start_backend(address: str = "127.0.0.2", port: int = 0, *, delay: float = 0.0) -> HTTPBackend:
    """Start a backend on `address` (any 127.x.y.z works on Linux loopback); port 0 picks one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    return HTTPBackend(address, sock, delay)


@dataclass
class LoadReport:
    """Counts so far; `failures` holds the first few failures as text (status code or error)."""

    ok: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    served_by: Counter[str] = field(default_factory=Counter)  # response body -> count
    elapsed: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def copy(self) -> LoadReport:
        return LoadReport(self.ok, self.failed, list(self.failures), Counter(self.served_by), self.elapsed)


class HTTPConnection:
    """One keep-alive HTTP/1.1 client connection on asyncio streams.

    Deliberately plain: unlike aiohttp's client, it never re-sends a request that failed on a
    reused connection, so every request HAProxy lost is counted as lost.
    """

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// URL")
        self.host, self.port = parts.hostname, parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._request = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self) -> tuple[int, str]:
        """Send the GET, return (status, body); raises OSError/EOFError/ValueError when it fails."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        try:
            writer.write(self._request)
            status_line = await reader.readline()
            if not status_line:
                raise EOFError("connection closed before an answer")
            status = int(status_line.split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip().lower()
            body = await self._body(reader, headers)
        except BaseException:
            self.close()
            raise
        if headers.get("connection") == "close":
            self.close()
        return status, body.decode(errors="replace")

    @staticmethod
    async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding") == "chunked":
            chunks = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                chunks.append((await reader.readexactly(size + 2))[:-2])
            await reader.readline()
            return b"".join(chunks)
        return await reader.readexactly(int(headers.get("content-length", "0")))

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


class LoadGenerator:
    """`connections` keep-alive clients sending GETs to `url`, at most `rate` requests/s in total.

    `start(count=..., duration=...)` runs in the background until either bound (or `stop()`);
    `wait()` blocks until then. In async code use `await asyncio.to_thread(load.wait)`.
    A failure is any answer but 200, or any error; nothing is retried.
    """

    MAX_SAMPLES = 20

    def __init__(self, url: str, connections: int = 16, rate: float | None = None, timeout: float = 10.0) -> None:
        HTTPConnection(url)  # refuse a bad URL here, not on the thread
        self.url, self.connections, self.rate, self.timeout = url, connections, rate, timeout
        self._report = LoadReport()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def start(self, *, count: int | None = None, duration: float | None = None) -> LoadGenerator:
        if self._thread is not None:
            raise RuntimeError("a LoadGenerator runs once")
        self._started = time.monotonic()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(count, duration),),
                                        name="load-generator", daemon=True)
        self._thread.start()
        return self

    def snapshot(self) -> LoadReport:
        """The counts so far, while it runs."""
        with self._lock:
            report = self._report.copy()
        report.elapsed = time.monotonic() - self._started
        return report

    def wait(self, timeout: float | None = None) -> LoadReport:
        """Block until the count or duration is reached (TimeoutError after `timeout` s)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"load still running after {timeout} s: {self.snapshot()}")
        return self.snapshot()

    def stop(self) -> LoadReport:
        """Stop sending; requests already sent finish and are counted."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
        return self.snapshot()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def _main(self, count: int | None, duration: float | None) -> None:
        deadline = None if duration is None else time.monotonic() + duration
        issued = 0

        def more() -> bool:
            nonlocal issued
            if self._stopping.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return False
            if count is not None and issued >= count:
                return False
            issued += 1
            return True

        try:
            await asyncio.gather(*(self._worker(more) for _ in range(self.connections)))
        finally:
            self._done.set()

    async def _worker(self, more: Callable[[], bool]) -> None:
        connection = HTTPConnection(self.url)
        interval = self.connections / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        try:
            while more():
                try:
                    async with asyncio.timeout(self.timeout):
                        status, body = await connection.get()
                    self._record(status == 200, body, f"HTTP {status}: {body[:80]!r}")
                except (OSError, EOFError, ValueError, TimeoutError) as exc:
                    self._record(False, "", f"{type(exc).__name__}: {exc}")
                if interval:
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            connection.close()

    def _record(self, ok: bool, body: str, failure: str) -> None:
        with self._lock:
            if ok:
                self._report.ok += 1
                self._report.served_by[body] += 1
            else:
                self._report.failed += 1
                if len(self._report.failures) < self.MAX_SAMPLES:
                    self._report.failures.append(failure)
