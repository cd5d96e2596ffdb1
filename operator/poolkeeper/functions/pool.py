"""A pool of warm worker processes that run handler functions for the asyncio operator.

Processes, not threads: a handler that hangs, spins on the CPU or blocks inside `async def` can
only be stopped reliably by killing its process. Each worker serves one invocation at a time over
a pipe; the operator waits on the pipe's fd with `loop.add_reader`, so nothing here blocks the
event loop, and kills + replaces a worker whose invocation overran its deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from poolkeeper.core.retry import backoff_delay
from poolkeeper.functions import worker as worker_module
from poolkeeper.functions.worker import Reply

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InvocationResult:
    """The outcome of one invocation; duration_ms is what the caller waited, queueing included."""

    ok: bool
    value: Any  # the handler's return value after a JSON round trip; None unless ok
    error: str | None
    duration_ms: float
    timed_out: bool = False


def default_size() -> int:
    """One worker per core, but at least two so one slow handler doesn't stall every other."""
    return max(2, os.cpu_count() or 1)


@dataclass(eq=False, slots=True)
class _Worker:
    process: BaseProcess
    conn: Connection

    @property
    def pid(self) -> int | None:
        return self.process.pid


class _WorkerDied(Exception):
    """The worker's pipe closed mid-invocation: it crashed, exited, or the pool is closing."""


class FunctionPool:
    """Run `handle(event, context)` functions from a handlers dir in killable worker processes.

    Use from one event loop: `await start()` once, then `invoke()` concurrently (at most `size`
    run at once, the rest wait for a free worker within their own timeout), then `await close()`.
    """

    def __init__(
        self,
        size: int | None = None,
        *,
        preload: Sequence[str] = (),
        start_method: Literal["forkserver", "spawn"] = "forkserver",
        kubeconfig: str | None = None,
        per_namespace: int | None = None,
    ) -> None:
        self.size = default_size() if size is None else size
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        self._preload = tuple(preload)  # modules every worker imports once at start
        # Workers run without the operator's credentials; with `kubeconfig` (--handler-credentials)
        # they get that one as KUBECONFIG (worker.handler_environment).
        self._kubeconfig = kubeconfig
        # At most this many workers busy for one namespace: the others stay free for the rest.
        self.per_namespace = per_namespace if per_namespace is not None else max(1, self.size - 1)
        self._namespace_slots: dict[str, asyncio.Semaphore] = {}
        # Never fork: the operator has threads and an event loop a forked child would inherit.
        self._mp: ForkServerContext | SpawnContext
        if start_method == "forkserver":
            self._mp = multiprocessing.get_context("forkserver")
            # Imported once in the fork server (if it isn't running yet), so workers share the pages.
            self._mp.set_forkserver_preload([worker_module.__name__, *self._preload])
        elif start_method == "spawn":
            self._mp = multiprocessing.get_context("spawn")
        else:
            raise ValueError(f"start_method must be forkserver or spawn, got {start_method!r}")
        # One thread does all process starting and reaping: both block, and serialising them
        # avoids races inside multiprocessing's bookkeeping.
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="poolkeeper-spawner")
        # Workers hold the read end and exit when it hits EOF: when we close it, or die.
        self._lifeline_r, self._lifeline_w = self._mp.Pipe(duplex=False)
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers: set[_Worker] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._all_stopped = asyncio.Event()  # set once closed and the last worker is stopped

    async def __aenter__(self) -> FunctionPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start `size` workers and wait until they exist (they warm up on their own)."""
        if self._idle is not None:
            raise RuntimeError("FunctionPool.start() was already called")
        self._idle = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            new = await loop.run_in_executor(self._spawner, self._spawn)
            self._workers.add(new)
            self._idle.put_nowait(new)

    def _spawn(self) -> _Worker:
        """Start one worker process (blocking: runs on the spawner thread)."""
        parent_end, child_end = self._mp.Pipe(duplex=True)
        process = self._mp.Process(
            target=worker_module.worker_main,
            args=(child_end, self._lifeline_r, self._preload, self._kubeconfig),
            name="poolkeeper-function-worker",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_end.close()
        return _Worker(process, parent_end)

    def worker_pids(self) -> list[int]:
        """Pids of the live workers, busy or idle (for tests and diagnostics)."""
        return sorted(w.pid for w in self._workers if w.pid is not None)

    async def invoke(
        self,
        handlers_dir: str | os.PathLike[str],
        name: str,
        event: dict[str, Any],
        *,
        timeout: float,  # noqa: ASYNC109 - enforced by killing the worker, not by cancelling us
        attempt: int = 1,
        function_name: str | None = None,
        namespace: str | None = None,
    ) -> InvocationResult:
        """Call FILE.FUNCTION `name` with `event`; never raises for anything the handler does.

        With `namespace`, first wait for one of that namespace's `per_namespace` slots (so one
        namespace's slow functions never hold every worker); the timeout runs from then. Waiting for
        a free worker counts against it. On timeout the worker is SIGKILLed and replaced and the
        result says `timed out after <timeout>s`.
        """
        if namespace is None:
            return await self._invoke(handlers_dir, name, event, timeout, attempt, function_name)
        slots = self._namespace_slots.setdefault(namespace, asyncio.Semaphore(self.per_namespace))
        async with slots:
            return await self._invoke(handlers_dir, name, event, timeout, attempt, function_name)

    async def _invoke(self, handlers_dir: str | os.PathLike[str], name: str, event: dict[str, Any],
                      timeout: float,  # noqa: ASYNC109 - as for invoke
                      attempt: int, function_name: str | None) -> InvocationResult:
        deadline = time.monotonic() + timeout
        request = ("invoke", os.fspath(handlers_dir), name, event, attempt, function_name or name, deadline)
        return await self._call(request, deadline, timeout)

    async def check(
        self,
        handlers_dir: str | os.PathLike[str],
        name: str,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109 - as for invoke
    ) -> str | None:
        """Why `name` can't be called (a HandlerLoadError text), or None when it can.

        Runs the module's top-level code in a worker, never in the operator; this also warms that
        worker's module cache.
        """
        deadline = time.monotonic() + timeout
        result = await self._call(("check", os.fspath(handlers_dir), name), deadline, timeout)
        if result.timed_out:
            return f"loading {name} timed out after {timeout:g}s (does its module hang at import?)"
        return result.error

    async def _call(self, request: tuple[Any, ...], deadline: float, limit: float) -> InvocationResult:
        started = time.monotonic()

        def result(ok: bool, value: Any, error: str | None, timed_out: bool = False) -> InvocationResult:
            return InvocationResult(ok, value, error, (time.monotonic() - started) * 1000, timed_out)

        worker = await self._acquire(deadline)
        if worker is None:
            return result(False, None, f"timed out after {limit:g}s waiting for a free worker", True)
        try:
            ok, payload, error = await self._exchange(worker, request, deadline)
        except TimeoutError:
            log.warning("killing function worker %s: %s overran %gs", worker.pid, request[2], limit)
            self._discard(worker)
            return result(False, None, f"timed out after {limit:g}s", timed_out=True)
        except _WorkerDied as exc:
            self._discard(worker)
            return result(False, None, str(exc))
        except BaseException:
            self._discard(worker)  # cancelled mid-call: the handler must not run on unobserved
            raise
        self._release(worker)
        return result(ok, None if payload is None else json.loads(payload), error)

    async def _acquire(self, deadline: float) -> _Worker | None:
        """A live idle worker, or None if none frees up before the deadline."""
        if self._idle is None:
            raise RuntimeError("FunctionPool.start() must be awaited before use")
        if self._closed:
            raise RuntimeError("FunctionPool is closed")
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                while True:
                    worker = await self._idle.get()
                    if worker.process.is_alive():
                        return worker
                    self._discard(worker)  # died while idle (OOM killer, stray signal...)
        except TimeoutError:
            return None

    async def _exchange(self, worker: _Worker, request: tuple[Any, ...], deadline: float) -> Reply:
        """Send a request and wait for the reply without blocking the loop; TimeoutError at deadline."""
        loop = asyncio.get_running_loop()
        try:
            worker.conn.send(request)
        except OSError as exc:
            raise _WorkerDied(f"worker process died before the call ({exc})") from exc
        readable = loop.create_future()
        fd = worker.conn.fileno()
        loop.add_reader(fd, _set_done, readable)
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await readable
        finally:
            loop.remove_reader(fd)
        try:
            reply: Reply = worker.conn.recv()
        except (EOFError, OSError) as exc:
            raise _WorkerDied(await self._death_notice(worker)) from exc
        return reply

    async def _death_notice(self, worker: _Worker) -> str:
        """Why a worker's pipe closed, with its exit status when it can be had quickly."""
        if self._closed:
            return "the function pool was closed during the call"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._spawner, worker.process.join, 1.0)
        code = worker.process.exitcode
        if code is not None and code < 0:
            return f"worker process died during the call (killed by {signal.Signals(-code).name})"
        return f"worker process died during the call (exit code {code})"

    def _release(self, worker: _Worker) -> None:
        assert self._idle is not None
        if self._closed:
            self._stop(worker, kill=False)
        else:
            self._idle.put_nowait(worker)

    def _discard(self, worker: _Worker) -> None:
        """Kill a worker that can't be reused and start its replacement in the background."""
        self._stop(worker, kill=True)
        if not self._closed:
            self._track(asyncio.get_running_loop().create_task(self._replace()))

    def _stop(self, worker: _Worker, *, kill: bool) -> None:
        """Close the pipe (an idle worker exits on EOF), SIGKILL if asked, reap on the spawner."""
        self._workers.discard(worker)
        if self._closed and not self._workers:
            self._all_stopped.set()
        if kill and worker.process.exitcode is None:
            with contextlib.suppress(OSError):  # already gone
                worker.process.kill()
        worker.conn.close()
        try:
            self._spawner.submit(_reap, worker.process)
        except RuntimeError:  # the pool has shut down its spawner: reap only if it's quick
            worker.process.join(0.1)

    async def _replace(self) -> None:
        """Spawn a worker into the idle queue, retrying with backoff if the system refuses."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while not self._closed:
            attempt += 1
            try:
                new = await loop.run_in_executor(self._spawner, self._spawn)
            except (OSError, RuntimeError, ValueError) as exc:
                delay = backoff_delay(attempt, 0.1, 5.0)
                log.error("could not start a function worker (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            self._workers.add(new)
            self._release(new)
            return

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace: float = 2.0) -> None:
        """Stop every worker: idle ones exit on EOF, busy ones are killed (their calls fail)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._spawner, _noop)  # let a replacement being started finish
        while self._idle is not None and not self._idle.empty():
            self._stop(self._idle.get_nowait(), kill=False)
        for busy in list(self._workers):
            busy.process.kill()  # its caller sees EOF, reports the pool closed and discards it
        if self._workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_stopped.wait(), grace)
        await loop.run_in_executor(self._spawner, _noop)  # wait for the queued reaping
        self._spawner.shutdown(wait=False)
        self._lifeline_r.close()
        self._lifeline_w.close()  # any straggler exits now


def _noop() -> None:
    pass


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _reap(process: BaseProcess) -> None:
    """Wait for an exiting worker; kill it if it ignores EOF (a handler thread keeping it alive)."""
    process.join(2.0)
    if process.exitcode is None:
        process.kill()
        process.join()
    process.close()


