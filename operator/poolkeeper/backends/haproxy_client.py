"""A client for HAProxy's runtime API over one persistent connection in prompt mode.

One connection per endpoint costs about 0.1 ms per command against several ms for a new
connection or a `socat` process. In prompt mode every command's answer ends with "\\n> ",
which is what lets a pipelined batch be split back into one answer per command. A lost
connection (HAProxy restarted, or closed an idle session) is re-opened once and the batch
sent again; a second loss raises HAProxyUnreachable.

Every call is bounded: waiting for the connection (one exchange at a time per HAProxy), then
connect, send and read together, each within `timeout`. A HAProxy that accepts but never
answers (stopped with SIGSTOP, wedged, its backlog full) costs one timeout; after it, calls fail
at once until a probe (`probe=True`, the LoadBalancer health watch) is answered again, so
reconciles of its pools neither pile up behind it nor hold workers that other pools need.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from poolkeeper.core.lbprocess import is_stopping

log = logging.getLogger(__name__)
PROMPT = b"\n> "
IDLE_TIMEOUT_S = 600  # `set timeout cli`: how long HAProxy keeps our idle session open
_READ_LIMIT = 64 * 1024 * 1024  # `show stat` of a large backend is far above asyncio's 64 KiB default
_CHUNK = 1024 * 1024  # bytes read at once: thousands of short answers, or a good part of a big `show stat`
_LOST = (OSError, EOFError)  # broken pipe, reset, EOF (IncompleteReadError), TLS alerts

Endpoint = tuple[Literal["unix"], str] | tuple[Literal["tcp"], str, int]
_USAGE = "use unix:///path/to/admin.sock or tcp://host:port"


class HAProxyUnreachable(Exception):
    """The runtime API cannot be used right now; the message says why, for a condition or event."""


class HAProxyBusy(HAProxyUnreachable):
    """Another call held the connection for the whole wait: no sign that HAProxy itself is hung
    (that call has its own bound, and reports a hang if there is one)."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files for a TLS runtime socket: the CA that signed HAProxy's certificate, and ours."""

    ca_file: str | Path
    cert_file: str | Path
    key_file: str | Path


def parse_endpoint(endpoint: str) -> Endpoint:
    """`unix:///abs/path` -> ("unix", path); `tcp://host:port` -> ("tcp", host, port)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise ValueError(f"HAProxy endpoint {endpoint!r} has no scheme: {_USAGE}")
    if scheme == "unix":
        if not rest.startswith("/"):
            raise ValueError(f"HAProxy endpoint {endpoint!r} needs an absolute socket path: {_USAGE}")
        return ("unix", rest)
    if scheme == "tcp":
        parts = urllib.parse.urlsplit(endpoint)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"HAProxy endpoint {endpoint!r} has an invalid port: {_USAGE}") from None
        if not parts.hostname or port is None or port == 0 or parts.path not in ("", "/"):
            raise ValueError(f"HAProxy endpoint {endpoint!r} needs a host and a port: {_USAGE}")
        return ("tcp", parts.hostname, port)
    raise ValueError(f"HAProxy endpoint {endpoint!r} has an unknown scheme {scheme!r}: {_USAGE}")


def _why(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "the connection was closed"
    return str(exc) or type(exc).__name__


class AnswerSplitter:
    """Cuts what HAProxy sends back in prompt mode into one answer per command.

    Bytes come in chunks of any size; an answer is complete at its "\\n> " prompt, which may
    itself straddle two chunks. Pure, so big pipelined batches are read in large chunks
    instead of one `readuntil` per answer.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._searched = 0  # bytes of _pending known to hold no complete prompt

    def feed(self, data: bytes) -> list[str]:
        """The answers that `data` completes, in order, without their prompt."""
        self._pending += data
        answers = []
        start = 0
        at = self._pending.find(PROMPT, max(0, self._searched - len(PROMPT) + 1))
        while at >= 0:
            answers.append(self._pending[start:at].decode(errors="replace").rstrip("\n"))
            start = at + len(PROMPT)
            at = self._pending.find(PROMPT, start)
        del self._pending[:start]
        self._searched = len(self._pending)
        return answers

    @property
    def pending(self) -> int:
        """Bytes received that no prompt has ended yet."""
        return len(self._pending)


class _Protocol(asyncio.StreamReaderProtocol):
    """A stream protocol that says when HAProxy ended the connection on its own (EOF or a
    reset), even while nothing is being read: a restarted HAProxy closes every session at once,
    sooner than the next probe would notice."""

    def __init__(self, reader: asyncio.StreamReader, on_lost: Callable[[], None] | None) -> None:
        super().__init__(reader)
        self.on_lost = on_lost  # None once we close the connection ourselves

    def eof_received(self) -> bool:
        self._lost()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        super().connection_lost(exc)

    def _lost(self) -> None:
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()


class _Session:
    """One open connection already in prompt mode."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: _Protocol) -> None:
        self.reader, self.writer, self.protocol = reader, writer, protocol

    async def roundtrip(self, commands: Sequence[str], progress: Callable[[], None] = lambda: None) -> list[str]:
        """Write every command at once, then read one prompt-terminated answer per command.

        Answers are read while the rest of the batch is still being sent (the transport sends
        it in the background), and `progress` is called whenever some arrive: a big batch is
        bounded by the time between answers, not by its size.
        """
        self.writer.write("".join(f"{command}\n" for command in commands).encode())
        splitter = AnswerSplitter()
        answers: list[str] = []
        while len(answers) < len(commands):
            data = await self.reader.read(_CHUNK)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            got = splitter.feed(data)
            if got:
                answers += got
                if len(answers) < len(commands):  # more to come: their deadline moves on
                    progress()
        if len(answers) > len(commands) or splitter.pending:  # cannot happen: commands hold no ';' or newline
            raise HAProxyUnreachable(f"HAProxy sent {len(answers) - len(commands)} answer(s) and "
                                     f"{splitter.pending} byte(s) more than the batch asked for")
        await self.writer.drain()  # everything was sent (it was answered): surfaces a write error, if any
        return answers

    def discard(self) -> None:
        self.protocol.on_lost = None  # our own close is no sign of a restart
        self.writer.close()


class _Line:
    """One connection slot: a session opened when needed, one exchange on it at a time."""

    def __init__(self) -> None:
        self.session: _Session | None = None
        self.lock = asyncio.Lock()

    def discard(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.discard()

    async def close(self) -> None:
        async with self.lock:
            session, self.session = self.session, None
            if session is not None:
                session.discard()
                try:
                    async with asyncio.timeout(1):
                        await session.writer.wait_closed()
                except (*_LOST, TimeoutError):
                    pass


class HAProxyClient:
    """Runtime API of one HAProxy; safe to share between pools (calls are serialised).

    Probes (`probe=True`) have a connection of their own, so a probe is not stuck behind a
    call that HAProxy does not answer: it times out on its own, and then ends that call too.
    """

    def __init__(self, endpoint: str, tls: TLSFiles | None = None, timeout: float = 5.0,
                 may_act: Callable[[], bool] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._address = parse_endpoint(endpoint)
        if tls is not None and self._address[0] != "tcp":
            raise ValueError(f"HAProxy endpoint {endpoint!r}: TLS is only supported on tcp:// endpoints")
        self._tls = tls
        self._calls, self._probes = _Line(), _Line()
        self.unanswered = ""  # why the last exchange got no answer; set: only probes are sent
        self.may_act = may_act  # None: always (no leader election); probes are only reads
        # Called (in the loop, must not block) when HAProxy ends an open connection by itself:
        # it restarted, was reloaded, or closed an idle session. The LoadBalancer probes at once.
        self.on_lost: Callable[[], None] | None = None

    async def execute(self, commands: Sequence[str], *, probe: bool = False,
                      within: float | None = None) -> list[str]:
        """Send `commands` in one write and return their answers, in order, without the prompt.

        Raises HAProxyUnreachable when HAProxy cannot be reached, the connection is lost
        twice, no answer comes `within` seconds (default: the client's `timeout`) of the batch
        being sent or of the answer before (a batch of 20,000 commands takes HAProxy seconds,
        and is bounded by its progress), or an earlier call got none and no probe has been
        answered since (`probe=True` calls are sent anyway).
        """
        for command in commands:
            if not command or any(c in command for c in ";\r\n"):
                raise ValueError(f"not a single runtime API command: {command!r}")
        if not commands:
            return []
        limit = self.timeout if within is None else within
        line = self._probes if probe else self._calls
        loop = asyncio.get_running_loop()
        self._refuse_while_unanswered(probe)
        try:
            if line.lock.locked():
                async with asyncio.timeout(limit):  # the holder is bounded too: this wait ends
                    await line.lock.acquire()
            else:
                await line.lock.acquire()  # free: taken without waiting (no timer to arm)
        except TimeoutError:
            raise HAProxyBusy(
                f"HAProxy at {self.endpoint} was still busy with another call after {limit:g} s") from None
        try:
            self._refuse_while_unanswered(probe)  # the call we waited for may have found it hung
            try:
                async with asyncio.timeout(limit) as deadline:  # moved on by every answer that arrives
                    answers = await self._execute(line, commands, probe,
                                                  lambda: deadline.reschedule(loop.time() + limit))
            except TimeoutError:
                self.unanswered = f"did not answer within {limit:g} s"
                line.discard()
                self._calls.discard()  # after a probe: ends the call HAProxy is not answering either
                raise HAProxyUnreachable(f"HAProxy at {self.endpoint} {self.unanswered}") from None
            except BaseException:
                line.discard()  # cancelled mid-batch: the answers left in flight would desync the next one
                raise
            self.unanswered = ""
            return answers
        finally:
            line.lock.release()

    def _refuse_while_unanswered(self, probe: bool) -> None:
        if self.unanswered and not probe:
            raise HAProxyUnreachable(f"HAProxy at {self.endpoint} {self.unanswered}; "
                                     "waiting for it to answer the health probe again")

    async def info(self, *, probe: bool = False, within: float | None = None) -> dict[str, str]:
        """`show info` as a dict (Version, Pid, Uptime_sec, ...): a cheap liveness and restart probe."""
        (answer,) = await self.execute(["show info"], probe=probe, within=within)
        fields = {}
        for line in answer.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return fields

    async def current_info(self, within: float | None = None) -> tuple[dict[str, str], bool]:
        """`show info` of the process that serves new connections, and whether the one our
        sessions were open to turned out to be soft-stopping (a reload).

        After a reload the old process keeps our open sessions and answers them for itself (Pid
        unchanged, `Stopping: 1`) while a new one, with only the config file's servers, takes
        the traffic. Both sessions are closed, so this probe and every later call reach the new
        process, and the old one can exit.
        """
        info = await self.info(probe=True, within=within)
        if not is_stopping(info):
            return info, False
        log.info("HAProxy at %s (pid %s) is stopping after a reload; reconnecting", self.endpoint, info.get("Pid"))
        self._calls.discard()  # a call in flight on the old process fails over to the new one (lost connection)
        await self._probes.close()
        return await self.info(probe=True, within=within), True

    async def close(self) -> None:
        """Close the connections; a later call opens a new one."""
        await self._calls.close()
        await self._probes.close()

    async def _execute(self, line: _Line, commands: Sequence[str], probe: bool,
                       progress: Callable[[], None]) -> list[str]:
        for attempt in (1, 2):
            if line.session is None:
                line.session = await self._open()
            if not probe and self.may_act is not None and not self.may_act():
                # checked at the last moment: a leader paused mid-reconcile wakes after another took
                # over, and must not send what it planned back then
                raise HAProxyUnreachable(f"not sent to HAProxy at {self.endpoint}: this replica no longer leads")
            try:
                return await line.session.roundtrip(commands, progress)
            except _LOST as exc:
                line.discard()
                if attempt == 2:
                    raise HAProxyUnreachable(
                        f"lost the connection to HAProxy at {self.endpoint} twice: {_why(exc)}") from exc
                self._refuse_while_unanswered(probe)  # a probe ended this call: HAProxy does not answer
        raise AssertionError("unreachable")

    async def _open(self) -> _Session:
        """A new connection (what asyncio.open_connection does, with a protocol that reports its loss)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        protocol = _Protocol(reader, self._connection_lost)
        try:
            if self._address[0] == "unix":
                transport, _ = await loop.create_unix_connection(lambda: protocol, self._address[1])
            else:
                context = await asyncio.to_thread(self._ssl_context) if self._tls else None
                transport, _ = await loop.create_connection(
                    lambda: protocol, self._address[1], self._address[2], ssl=context)
        except (*_LOST, ValueError) as exc:
            raise HAProxyUnreachable(f"cannot connect to HAProxy at {self.endpoint}: {_why(exc)}") from exc
        session = _Session(reader, asyncio.StreamWriter(transport, protocol, reader, loop), protocol)
        try:
            greeting = await session.roundtrip(["prompt", f"set timeout cli {IDLE_TIMEOUT_S}"])
        except _LOST as exc:
            session.discard()
            raise HAProxyUnreachable(f"HAProxy at {self.endpoint} refused the session: {_why(exc)}") from exc
        except BaseException:
            session.discard()  # timed out or cancelled while HAProxy did not greet: never leak the socket
            raise
        if any(greeting):
            session.discard()
            raise HAProxyUnreachable(
                f"HAProxy at {self.endpoint} answered {' '.join(greeting)!r} to 'prompt'")
        return session

    def _connection_lost(self) -> None:
        if self.on_lost is not None:
            self.on_lost()

    def _ssl_context(self) -> ssl.SSLContext:
        """Built on every connect, so files rewritten after a Secret rotation are picked up."""
        assert self._tls is not None
        context = ssl.create_default_context(cafile=str(self._tls.ca_file))
        context.load_cert_chain(str(self._tls.cert_file), str(self._tls.key_file))
        return context
