"""The code that runs inside a worker process: receive a request on a pipe, call the handler, reply.

It never enforces timeouts itself: the operator kills a worker that overruns, which also stops
handlers that block their own event loop or never release the GIL-free C code they are in.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from poolkeeper.functions.resolver import HandlerLoadError, check_handler, load_handler

LOGGER_PREFIX = "poolkeeper.function."

# Requests and replies are small tuples pickled over the pipe:
#   ("invoke", handlers_dir, name, event, attempt, function_name, deadline) -> (ok, json_text, error)
#   ("check", handlers_dir, name) -> (ok, None, error)
Reply = tuple[bool, str | None, str | None]


class InvocationContext:
    """The `context` a handler gets, shaped like AWS Lambda's so existing habits carry over."""

    def __init__(self, *, function_name: str, event_id: str, attempt: int, deadline: float) -> None:
        self.function_name = function_name
        self.event_id = event_id
        self.aws_request_id = event_id
        self.attempt = attempt
        self.deadline = deadline  # time.monotonic() value; the same clock in every process
        self.logger = logging.getLogger(LOGGER_PREFIX + function_name)
        self.log = self.logger

    def remaining_time_ms(self) -> int:
        """Milliseconds until the operator kills this invocation (0 once it has passed)."""
        return max(0, int((self.deadline - time.monotonic()) * 1000))

    get_remaining_time_in_millis = remaining_time_ms

    def __repr__(self) -> str:
        return (
            f"InvocationContext(function_name={self.function_name!r}, event_id={self.event_id!r}, "
            f"attempt={self.attempt}, remaining_time_ms={self.remaining_time_ms()})"
        )


def describe_exception(exc: BaseException) -> str:
    """`ExceptionType: message`, or just the type when the message is empty."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def run_invocation(
    handlers_dir: str, name: str, event: dict[str, Any], attempt: int, function_name: str, deadline: float
) -> Reply:
    """Call the handler once; a coroutine result is run to completion in a fresh event loop."""
    try:
        handler = load_handler(handlers_dir, name)
    except HandlerLoadError as exc:
        return False, None, str(exc)
    context = InvocationContext(
        function_name=function_name, event_id=str(event.get("id", "")), attempt=attempt, deadline=deadline
    )
    try:
        result = handler(event, context)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    except (Exception, SystemExit) as exc:
        context.log.error("%s failed on event %s", name, context.event_id, exc_info=True)
        return False, None, describe_exception(exc)
    try:
        return True, json.dumps(result, allow_nan=False), None
    except (TypeError, ValueError) as exc:
        return False, None, f"return value of {name} is not JSON-serialisable: {exc}"


def run_check(handlers_dir: str, name: str) -> Reply:
    """check_handler as a reply: (True, None, None) or (False, None, why)."""
    try:
        check_handler(handlers_dir, name)
    except HandlerLoadError as exc:
        return False, None, str(exc)
    return True, None, None


def handle_request(request: tuple[Any, ...]) -> Reply:
    """Dispatch one request tuple."""
    match request:
        case ("invoke", str(directory), str(name), dict(event), int(attempt), str(function_name), deadline):
            return run_invocation(directory, name, event, attempt, function_name, float(deadline))
        case ("check", str(handlers_dir), str(name)):
            return run_check(handlers_dir, name)
    return False, None, f"worker got a malformed request: {request[:1]!r}"


def _exit_with_the_operator(lifeline: Connection) -> None:
    """Exit as soon as the operator's end of `lifeline` closes, even mid-call in a stuck handler.

    Only the operator holds the write end, so EOF means it died or closed the pool. (The parent
    pid is no use: under forkserver it is the fork server, which outlives a killed operator.)
    """
    try:
        while True:
            lifeline.recv_bytes()
    except (EOFError, OSError):
        os._exit(0)


# What a handler function must not inherit from the operator: where the operator's credentials
# are, and the in-cluster variables client libraries use to find the API server.
# (Handler settings such as POOLKEEPER_AUDIT_LOG or WARMUP_PATH stay.)
_DROPPED_WORDS = ("KUBE", "SERVICEACCOUNT", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def handler_environment(env: Mapping[str, str], kubeconfig: str | None) -> dict[str, str]:
    """The environment a worker runs handler functions in: the operator's, minus anything that
    leads to its credentials, with KUBECONFIG set to `kubeconfig` (`--handler-credentials`) or
    to /dev/null, so Kubernetes clients find no identity (not even ~/.kube/config)."""
    kept = {k: v for k, v in env.items()
            if not any(word in k.upper() for word in _DROPPED_WORDS)}
    kept["KUBECONFIG"] = kubeconfig or os.devnull
    return kept


def worker_main(conn: Connection, lifeline: Connection, preload: Sequence[str] = (),
                kubeconfig: str | None = None) -> None:
    """Entry point of a worker process: serve requests until the pipe closes."""
    scrubbed = handler_environment(os.environ, kubeconfig)
    os.environ.clear()
    os.environ.update(scrubbed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the operator's to handle
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    threading.Thread(target=_exit_with_the_operator, args=(lifeline,), name="lifeline", daemon=True).start()
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception:  # a missing optional module must not stop the worker
            logging.getLogger(__name__).warning("could not preload %s", module, exc_info=True)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        reply = handle_request(request)
        try:
            conn.send(reply)
        except OSError:
            return
