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
from collections import deque
from collections.abc import Callable, Sequence
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


Request = Callable[[float], tuple[Any, ...]]  # the request to send, given its deadline


@dataclass(eq=False, slots=True)
class _Call:
    """One call from its beginning to its answer.

    It waits in the pool's queue for a slot of its namespace (from then its timeout runs: the
    deadline is set) and for a free worker; whoever frees the last of the two sends it and
    resolves `handed` with the worker.
    """

    request: Request
    namespace: str | None
    limit: float  # the timeout, seconds
    handed: asyncio.Future[_Worker]
    slotted: asyncio.Event
    deadline: float | None = None  # set when it takes its namespace slot
    holds_slot: bool = False


class Invocation:
    """A call begun by FunctionPool.start_invoke: sent to a worker already, or queued to be sent
    by whoever frees what it waits for. `await result()` once, or `abandon()` it."""

    def __init__(self, pool: FunctionPool, call: _Call) -> None:
        self._pool, self._call = pool, call
        self._started = time.monotonic()
        self._taken = False

    async def result(self) -> InvocationResult:
        if self._taken:
            raise RuntimeError("Invocation.result() awaited twice")
        self._taken = True
        return await self._pool._finish(self._call, self._started)

    def abandon(self) -> bool:
        """Give the call up unread (its caller was cancelled before it could wait): a worker that
        has it is killed, a queued one is withdrawn. False (nothing done) once `result()` was awaited."""
        if self._taken:
            return False
        self._taken = True
        self._pool._give_up(self._call)
        return True


class _WorkerDied(Exception):
    """The worker's pipe closed mid-invocation: it crashed, exited, or the pool is closing."""


class _PoolClosed(Exception):
    """The pool closed while a call waited for a worker."""


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
        self._running: dict[str, int] = {}  # namespace -> its calls holding a slot
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
        self._idle: deque[_Worker] | None = None  # None until started
        # Calls not yet sent, oldest first: a freed worker or slot is given to them at once.
        self._waiting: deque[_Call] = deque()
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
        self._idle = deque()
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            new = await loop.run_in_executor(self._spawner, self._spawn)
            self._workers.add(new)
            self._idle.append(new)

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
        started = time.monotonic()
        call = self._begin(self._invoke_request(handlers_dir, name, event, attempt, function_name), timeout,
                           namespace)
        return await self._finish(call, started)

    def start_invoke(
        self,
        handlers_dir: str | os.PathLike[str],
        name: str,
        event: dict[str, Any],
        *,
        timeout: float,
        attempt: int = 1,
        function_name: str | None = None,
        namespace: str | None = None,
    ) -> Invocation | None:
        """`invoke`, begun before this returns: sent down a free worker's pipe, or queued to be sent
        the moment a worker (and a slot of the namespace) frees. None if the pool is not running.

        Why: the caller is a watch event's callback. Sending from it puts the function to work
        without waiting for the event loop to reach a new task; on a busy loop that wait was most
        of the dispatch time.
        """
        if self._idle is None or self._closed:
            return None
        request = self._invoke_request(handlers_dir, name, event, attempt, function_name)
        return Invocation(self, self._begin(request, timeout, namespace))

    @staticmethod
    def _invoke_request(handlers_dir: str | os.PathLike[str], name: str, event: dict[str, Any], attempt: int,
                        function_name: str | None) -> Request:
        directory = os.fspath(handlers_dir)
        return lambda deadline: ("invoke", directory, name, event, attempt, function_name or name, deadline)

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
        directory = os.fspath(handlers_dir)
        call = self._begin(lambda _deadline: ("check", directory, name), timeout, None)
        result = await self._finish(call, time.monotonic())
        if result.timed_out:
            return f"loading {name} timed out after {timeout:g}s (does its module hang at import?)"
        return result.error

    # ----- the queue: every call waits here for a slot of its namespace, then for a worker
    def _begin(self, request: Request, limit: float, namespace: str | None) -> _Call:
        if self._idle is None:
            raise RuntimeError("FunctionPool.start() must be awaited before use")
        if self._closed:
            raise RuntimeError("FunctionPool is closed")
        loop = asyncio.get_running_loop()
        call = _Call(request, namespace, limit, loop.create_future(), asyncio.Event())
        self._waiting.append(call)
        self._dispatch()
        return call

    def _dispatch(self) -> None:
        """Give free slots and free workers to the waiting calls, oldest first; send what can go.

        Runs wherever a slot or a worker frees, including the callback that reads a worker's
        answer, so the next call is on its way before the event loop turns.
        """
        if self._closed:
            return
        for call in list(self._waiting):
            if call.handed.done():  # its caller stopped waiting
                self._waiting.remove(call)
                self._return_slot(call)
                continue
            if not call.holds_slot:
                if call.namespace is not None and self._running.get(call.namespace, 0) >= self.per_namespace:
                    continue
                self._take_slot(call)
            worker = self._idle_worker()
            if worker is None:
                continue  # others may still take a slot (their timeout starts)
            assert call.deadline is not None
            if not self._send(worker, call.request(call.deadline)):
                continue  # that worker is gone (replaced in the background); this call waits on
            self._waiting.remove(call)
            call.handed.set_result(worker)

    def _take_slot(self, call: _Call) -> None:
        call.holds_slot, call.deadline = True, time.monotonic() + call.limit
        if call.namespace is not None:
            self._running[call.namespace] = self._running.get(call.namespace, 0) + 1
        call.slotted.set()

    def _return_slot(self, call: _Call) -> bool:
        """The call is over (answered, failed, withdrawn): its namespace slot is free. False when
        it held none (any more): nothing for `_dispatch` to give out."""
        if not call.holds_slot:
            return False
        call.holds_slot = False
        if call.namespace is not None:
            left = self._running[call.namespace] - 1
            if left:
                self._running[call.namespace] = left
            else:
                del self._running[call.namespace]
        return True

    def _idle_worker(self) -> _Worker | None:
        """A live idle worker if there is one now, without waiting."""
        assert self._idle is not None
        while self._idle:
            worker = self._idle.popleft()
            if worker.process.is_alive():
                return worker
            self._discard(worker)  # died while idle (OOM killer, stray signal...)
        return None

    def _send(self, worker: _Worker, request: tuple[Any, ...]) -> bool:
        """Write a request down a worker's pipe; False (and the worker replaced) if it is gone."""
        try:
            worker.conn.send(request)
        except OSError:
            self._discard(worker)
            return False
        return True

    def _give_up(self, call: _Call) -> None:
        """Nobody will wait for this call: withdraw it if queued, else kill the worker running it."""
        if not call.handed.cancel() and (worker := _handed_worker(call.handed)) is not None:
            self._discard(worker)  # its replacement is released (and dispatched to) when it starts
        if self._return_slot(call):
            self._dispatch()

    # ----- waiting for the answer
    async def _finish(self, call: _Call, started: float) -> InvocationResult:
        """Wait for the call to be sent, then for its answer; a worker that overruns is replaced."""
        limit = call.limit

        def result(ok: bool, value: Any, error: str | None, timed_out: bool = False) -> InvocationResult:
            return InvocationResult(ok, value, error, (time.monotonic() - started) * 1000, timed_out)

        try:
            worker = await self._handed(call)
        except _PoolClosed:
            return result(False, None, "the function pool was closed during the call")
        if worker is None:
            return result(False, None, f"timed out after {limit:g}s waiting for a free worker", True)
        assert call.deadline is not None
        loop = asyncio.get_running_loop()
        replied: asyncio.Future[Reply] = loop.create_future()
        fd = worker.conn.fileno()
        loop.add_reader(fd, self._on_reply, call, worker, fd, replied)
        try:
            async with asyncio.timeout(call.deadline - time.monotonic()):
                ok, payload, error = await replied
        except _WorkerDied:
            message = await self._death_notice(worker)
            self._discard(worker)
            return result(False, None, message)
        except TimeoutError:
            if _answer(replied) is None:
                loop.remove_reader(fd)
                log.warning("killing function worker %s: an invocation overran %gs", worker.pid, limit)
                self._discard(worker)
                return result(False, None, f"timed out after {limit:g}s", timed_out=True)
            ok, payload, error = replied.result()  # answered in time; the loop came to it late
        except BaseException:
            if _answer(replied) is None:  # cancelled mid-call: the handler must not run on unobserved
                loop.remove_reader(fd)
                self._discard(worker)
            raise
        finally:
            if self._return_slot(call):  # not already given back by _on_reply
                self._dispatch()
        return result(ok, None if payload is None else json.loads(payload), error)

    async def _handed(self, call: _Call) -> _Worker | None:
        """The worker the call was sent on; None if it got its slot but no worker before its deadline."""
        try:
            await call.slotted.wait()
            if call.deadline is None:
                raise _PoolClosed  # close() woke it without a slot
            async with asyncio.timeout(call.deadline - time.monotonic()):
                await call.handed
        except TimeoutError:
            pass
        except BaseException:
            self._give_up(call)  # cancelled: withdrawn, or its worker killed if already sent
            raise
        worker = _handed_worker(call.handed)
        if worker is None:
            self._give_up(call)
        return worker

    def _on_reply(self, call: _Call, worker: _Worker, fd: int, replied: asyncio.Future[Reply]) -> None:
        """The worker's pipe is readable: take the answer, and give the freed slot and worker to
        the next calls right here, before the caller's task even wakes."""
        asyncio.get_running_loop().remove_reader(fd)
        if replied.done():
            return  # its caller was cancelled and has discarded the worker
        try:
            reply: Reply = worker.conn.recv()
        except (EOFError, OSError):
            replied.set_exception(_WorkerDied())
            return
        self._return_slot(call)
        self._release(worker)
        replied.set_result(reply)

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
        """A worker is free: the oldest call that can go is sent on it, else it waits idle."""
        assert self._idle is not None
        if self._closed:
            self._stop(worker, kill=False)
            return
        self._idle.append(worker)
        self._dispatch()

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
        while self._idle:
            self._stop(self._idle.popleft(), kill=False)
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.handed.done():
                waiting.handed.set_exception(_PoolClosed())
                waiting.handed.exception()  # seen: a call begun and never awaited is no error
            waiting.slotted.set()
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


def _answer(replied: asyncio.Future[Reply]) -> Reply | None:
    """The worker's answer if it arrived (the worker is then already free again), else None."""
    if replied.done() and not replied.cancelled() and replied.exception() is None:
        return replied.result()
    return None


def _handed_worker(handed: asyncio.Future[_Worker]) -> _Worker | None:
    """The worker a waiting call was sent on, if it was."""
    if handed.done() and not handed.cancelled() and handed.exception() is None:
        return handed.result()
    return None


def _reap(process: BaseProcess) -> None:
    """Wait for an exiting worker; kill it if it ignores EOF (a handler thread keeping it alive)."""
    process.join(2.0)
    if process.exitcode is None:
        process.kill()
        process.join()
    process.close()


