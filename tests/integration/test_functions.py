"""FunctionPool with real worker processes: calls, timeouts that kill, load errors, reloads, concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from poolkeeper.functions.invoke_cli import invoke_main, sample_event
from poolkeeper.functions.pool import FunctionPool
from poolkeeper.functions.resolver import HandlerLoadError, check_handler

HANDLERS = '''
import asyncio, logging, os, sys, time

def info(event, context):
    return {
        "pid": os.getpid(),
        "event": event,
        "function_name": context.function_name,
        "event_id": context.event_id,
        "aws_request_id": context.aws_request_id,
        "attempt": context.attempt,
        "remaining_ms": context.remaining_time_ms(),
        "logger": context.log.name,
        "same_logger": context.logger is context.log,
    }

async def async_info(event, context):
    await asyncio.sleep(0.01)
    return {"running_loop": asyncio.get_running_loop().is_running(), "event_id": context.event_id}

def pid(event, context):
    return os.getpid()

def sleeps(event, context):
    time.sleep(60)

def burns(event, context):
    while True:
        pass

async def blocks_loop(event, context):
    time.sleep(60)

def slow(event, context):
    time.sleep(1.0)
    return "slow"

def fails(event, context):
    raise ValueError("bad input")

def fails_quietly(event, context):
    raise KeyError

def not_json(event, context):
    return {1, 2}

def nan(event, context):
    return float("nan")

def dies(event, context):
    os._exit(3)

def exits(event, context):
    sys.exit("bye")

def touches(event, context):
    with open(event["path"], "a") as marker:
        marker.write(f"{event['id']}\\n")
    return event["id"]

not_a_function = 42
'''

EVENT = {"id": "evt-1", "type": "dev.poolkeeper.instance.up", "data": {"x": 1}}


@pytest.fixture
def handlers(tmp_path: Path) -> Path:
    (tmp_path / "h.py").write_text(HANDLERS)
    return tmp_path


@pytest.fixture
async def pool() -> AsyncIterator[FunctionPool]:
    async with FunctionPool(size=2) as started:
        yield started


def gone(pid: int) -> bool:
    """No such process, or only a zombie (orphans may never be reaped where PID 1 doesn't)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # FileNotFoundError, or ProcessLookupError when it vanishes while being read
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def eventually(predicate: object, limit: float = 10.0) -> bool:
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        if callable(predicate) and predicate():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_sync_handler_gets_event_and_context(pool: FunctionPool, handlers: Path) -> None:
    result = await pool.invoke(handlers, "h.info", EVENT, timeout=5, attempt=2, function_name="shop/audit")
    assert result.ok and result.error is None and not result.timed_out
    value = result.value
    assert value["event"] == EVENT
    assert value["pid"] != os.getpid() and value["pid"] in pool.worker_pids()
    assert value["function_name"] == "shop/audit"
    assert value["event_id"] == value["aws_request_id"] == "evt-1"
    assert value["attempt"] == 2
    assert 3000 < value["remaining_ms"] <= 5000
    assert value["logger"] == "poolkeeper.function.shop/audit" and value["same_logger"]
    assert result.duration_ms > 0


async def test_async_handler_runs_in_its_own_loop(pool: FunctionPool, handlers: Path) -> None:
    result = await pool.invoke(handlers, "h.async_info", EVENT, timeout=5)
    assert result.ok, result.error
    assert result.value == {"running_loop": True, "event_id": "evt-1"}


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("h.fails", "ValueError: bad input"),
        ("h.fails_quietly", "KeyError"),
        ("h.exits", "SystemExit: bye"),
        ("h.not_json",
         "return value of h.not_json is not JSON-serialisable: Object of type set is not JSON serializable"),
        ("h.nan",
         "return value of h.nan is not JSON-serialisable: Out of range float values are not JSON compliant"),
    ],
)
async def test_handler_failures_are_results(pool: FunctionPool, handlers: Path, name: str, error: str) -> None:
    result = await pool.invoke(handlers, name, EVENT, timeout=5)
    assert (result.ok, result.value, result.error, result.timed_out) == (False, None, error, False)
    again = await pool.invoke(handlers, "h.pid", EVENT, timeout=5)
    assert again.ok  # the worker is still usable


@pytest.mark.parametrize("name", ["h.sleeps", "h.burns", "h.blocks_loop"])
async def test_overrunning_worker_is_killed_and_replaced(pool: FunctionPool, handlers: Path, name: str) -> None:
    before = set(pool.worker_pids())
    started = time.monotonic()
    result = await pool.invoke(handlers, name, EVENT, timeout=0.5)
    elapsed = time.monotonic() - started
    assert (result.ok, result.timed_out, result.error) == (False, True, "timed out after 0.5s")
    assert elapsed < 1.5
    killed = before - set(pool.worker_pids())
    assert len(killed) == 1
    assert await eventually(lambda: all(gone(pid) for pid in killed)), "the overrunning worker still exists"
    assert await eventually(lambda: len(pool.worker_pids()) == 2), "no replacement worker"
    after = [await pool.invoke(handlers, "h.pid", EVENT, timeout=5) for _ in range(4)]
    assert all(r.ok for r in after)
    assert not {r.value for r in after} & killed


async def test_the_event_loop_keeps_running_during_a_cpu_bound_call(pool: FunctionPool, handlers: Path) -> None:
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await pool.invoke(handlers, "h.burns", EVENT, timeout=0.6)
    task.cancel()
    assert len(gaps) > 20
    assert max(gaps) < 0.25


async def test_crashed_worker_is_reported_and_replaced(pool: FunctionPool, handlers: Path) -> None:
    result = await pool.invoke(handlers, "h.dies", EVENT, timeout=5)
    assert (result.ok, result.timed_out) == (False, False)
    assert result.error == "worker process died during the call (exit code 3)"
    assert await eventually(lambda: len(pool.worker_pids()) == 2)
    assert (await pool.invoke(handlers, "h.pid", EVENT, timeout=5)).ok


async def test_a_slow_call_does_not_delay_another(pool: FunctionPool, handlers: Path) -> None:
    await asyncio.gather(*(pool.invoke(handlers, "h.pid", EVENT, timeout=5) for _ in range(2)))  # warm both
    slow = asyncio.create_task(pool.invoke(handlers, "h.slow", EVENT, timeout=5))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    fast = await pool.invoke(handlers, "h.pid", EVENT, timeout=5)
    assert fast.ok and time.monotonic() - started < 0.3
    assert not slow.done()
    assert (await slow).value == "slow"


async def test_waiting_for_a_free_worker_counts_against_the_timeout(handlers: Path) -> None:
    async with FunctionPool(size=1) as single:
        slow = asyncio.create_task(single.invoke(handlers, "h.slow", EVENT, timeout=5))
        await asyncio.sleep(0.05)
        queued = await single.invoke(handlers, "h.pid", EVENT, timeout=0.2)
        assert queued.timed_out and queued.error == "timed out after 0.2s waiting for a free worker"
        assert (await slow).ok


async def test_start_invoke_sends_before_the_event_loop_turns(pool: FunctionPool, handlers: Path,
                                                              tmp_path: Path) -> None:
    """The call is on its worker's pipe when start_invoke returns: the function runs while the
    caller still holds the event loop (here: sleeps without yielding)."""
    marker = tmp_path / "entered"
    await pool.invoke(handlers, "h.pid", EVENT, timeout=5)  # the module is loaded in one worker at least
    sent = pool.start_invoke(handlers, "h.touches", {"id": "e1", "path": str(marker)}, timeout=5)
    assert sent is not None
    give_up = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < give_up:
        time.sleep(0.01)  # noqa: ASYNC251 - on purpose: the loop must not turn
    assert marker.read_text() == "e1\n"
    result = await sent.result()
    assert result.ok and result.value == "e1"


async def test_queued_calls_go_to_the_first_freed_worker_in_order(handlers: Path, tmp_path: Path) -> None:
    """With every worker busy, start_invoke queues the call; the worker's answer hands it over."""
    marker = tmp_path / "order"
    async with FunctionPool(size=1) as single:
        slow = asyncio.create_task(single.invoke(handlers, "h.slow", EVENT, timeout=5))
        await asyncio.sleep(0.05)
        queued = [single.start_invoke(handlers, "h.touches", {"id": f"e{i}", "path": str(marker)}, timeout=5)
                  for i in range(3)]
        assert all(q is not None for q in queued)
        results = [await q.result() for q in queued if q is not None]
        assert [r.value for r in results] == ["e0", "e1", "e2"] and all(r.ok for r in results)
        assert marker.read_text() == "e0\ne1\ne2\n"
        assert (await slow).value == "slow"


async def test_an_abandoned_queued_call_never_runs(handlers: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    async with FunctionPool(size=1) as single:
        slow = asyncio.create_task(single.invoke(handlers, "h.slow", EVENT, timeout=5))
        await asyncio.sleep(0.05)
        pid_before = single.worker_pids()
        queued = single.start_invoke(handlers, "h.touches", {"id": "gone", "path": str(marker)}, timeout=5)
        assert queued is not None
        queued.abandon()
        assert (await slow).ok
        after = await single.invoke(handlers, "h.pid", EVENT, timeout=5)
        assert after.ok and [after.value] == pid_before  # the worker was not killed
        assert not marker.exists()


async def test_an_abandoned_sent_call_kills_its_worker(pool: FunctionPool, handlers: Path) -> None:
    before = set(pool.worker_pids())
    sent = pool.start_invoke(handlers, "h.sleeps", EVENT, timeout=30)
    assert sent is not None
    assert sent.abandon()
    assert not sent.abandon()  # twice is harmless
    killed = before - set(pool.worker_pids())
    assert len(killed) == 1 and await eventually(lambda: all(gone(pid) for pid in killed))
    assert await eventually(lambda: len(pool.worker_pids()) == 2)
    with pytest.raises(RuntimeError, match="twice"):
        await sent.result()


async def test_a_namespace_past_its_share_queues_while_others_go_first(handlers: Path) -> None:
    """per_namespace=1 of 2 workers: team-a's second call waits for its first, team-b's goes at once."""
    async with FunctionPool(size=2, per_namespace=1) as shared:
        first = shared.start_invoke(handlers, "h.slow", EVENT, timeout=5, namespace="team-a")
        second = shared.start_invoke(handlers, "h.pid", EVENT, timeout=0.5, namespace="team-a")
        other = shared.start_invoke(handlers, "h.pid", EVENT, timeout=5, namespace="team-b")
        assert first is not None and second is not None and other is not None
        waited = asyncio.create_task(second.result())
        started = time.monotonic()
        assert (await other.result()).ok and time.monotonic() - started < 0.5
        assert not waited.done()
        assert (await first.result()).value == "slow"
        late = await waited
        assert late.ok and late.duration_ms >= 900  # its 0.5 s timeout ran from its slot, not from the start


async def test_cancelled_call_kills_its_worker(pool: FunctionPool, handlers: Path) -> None:
    before = set(pool.worker_pids())
    task = asyncio.create_task(pool.invoke(handlers, "h.sleeps", EVENT, timeout=30))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    killed = before - set(pool.worker_pids())
    assert len(killed) == 1 and await eventually(lambda: all(gone(pid) for pid in killed))
    assert await eventually(lambda: len(pool.worker_pids()) == 2)


@pytest.mark.parametrize(
    ("files", "name", "message"),
    [
        ({}, "audit.handle", "{dir}/audit.py not found"),
        ({"audit.py": "def handle(:\n"}, "audit.handle",
         "audit.py failed to import: SyntaxError: invalid syntax (audit.py, line 1)"),
        ({"audit.py": "import no_such_module_here\n"}, "audit.handle",
         "audit.py failed to import: ModuleNotFoundError: No module named 'no_such_module_here'"),
        ({"audit.py": "raise RuntimeError('boom at import')\n"}, "audit.handle",
         "audit.py failed to import: RuntimeError: boom at import"),
        ({"audit.py": "def other(e, c): pass\n"}, "audit.handle", "audit.py has no function 'handle'"),
        ({"audit.py": "handle = 42\n"}, "audit.handle",
         "audit.py: 'handle' is not a function defined with def (it is a int)"),
        ({"audit.py": "def handle(e, c): pass\n"}, "audit.__class__",
         "audit.py: '__class__' is private (names starting with '_' can't be handlers)"),
        ({"audit.py": "def _client(): pass\n"}, "audit._client", "audit.py: '_client' is private"),
        ({"audit.py": "class Handle:\n    def __init__(self, e, c): pass\n"}, "audit.Handle",
         "audit.py: 'Handle' is not a function defined with def (it is a type)"),
        ({"audit.py": "from os import getcwd as handle\n"}, "audit.handle",
         "audit.py: 'handle' is not a function defined with def (it is a builtin_function_or_method)"),
        ({"audit.py": "from json import dumps as handle\n"}, "audit.handle",
         "audit.py: 'handle' is imported from json, not defined in this file"),
        ({}, "audit", "handler 'audit' must be FILE.FUNCTION"),
        ({}, "../etc/passwd.x", "handler '../etc/passwd.x' must be FILE.FUNCTION"),
    ],
)
async def test_load_errors(pool: FunctionPool, tmp_path: Path, files: dict[str, str], name: str, message: str) -> None:
    for file, text in files.items():
        (tmp_path / file).write_text(text)
    expected = message.format(dir=tmp_path)
    result = await pool.invoke(tmp_path, name, EVENT, timeout=5)
    assert not result.ok and result.error is not None and result.error.startswith(expected), result.error
    checked = await pool.check(tmp_path, name)
    assert checked is not None and checked.startswith(expected)
    with pytest.raises(HandlerLoadError) as raised:
        check_handler(tmp_path, name)
    assert str(raised.value).startswith(expected)


async def test_fixing_a_file_takes_effect_without_a_restart(pool: FunctionPool, tmp_path: Path) -> None:
    path = tmp_path / "audit.py"
    path.write_text("def handle(event, context):\n    return 'v1'\n")
    assert {(await pool.invoke(tmp_path, "audit.handle", EVENT, timeout=5)).value for _ in range(2)} == {"v1"}
    path.write_text("def handle(event, context):\n    return 'v2' +\n")  # broken, same size as a fix below
    broken = [await pool.invoke(tmp_path, "audit.handle", EVENT, timeout=5) for _ in range(2)]
    assert all(r.error and r.error.startswith("audit.py failed to import: SyntaxError") for r in broken)
    assert await pool.check(tmp_path, "audit.handle") is not None
    path.write_text("def handle(event, context):\n    return 'v2'\n")
    fixed = [await pool.invoke(tmp_path, "audit.handle", EVENT, timeout=5) for _ in range(2)]
    assert [r.value for r in fixed] == ["v2", "v2"]  # both workers, no restart
    assert await pool.check(tmp_path, "audit.handle") is None
    check_handler(tmp_path, "audit.handle")  # and in-process too


async def test_module_hanging_at_import_only_costs_a_worker(pool: FunctionPool, tmp_path: Path) -> None:
    (tmp_path / "hang.py").write_text("import time\ntime.sleep(60)\ndef handle(e, c): pass\n")
    message = await pool.check(tmp_path, "hang.handle", timeout=0.5)
    assert message == "loading hang.handle timed out after 0.5s (does its module hang at import?)"
    assert await eventually(lambda: len(pool.worker_pids()) == 2)


async def test_close_stops_every_worker(handlers: Path) -> None:
    started = FunctionPool(size=2)
    await started.start()
    busy = asyncio.create_task(started.invoke(handlers, "h.sleeps", EVENT, timeout=30))
    await asyncio.sleep(0.2)
    waiting = [asyncio.create_task(started.invoke(handlers, "h.sleeps", EVENT, timeout=30)) for _ in range(2)]
    await asyncio.sleep(0.2)
    pids = started.worker_pids()
    await started.close()
    for call in (busy, *waiting):
        result = await call
        assert not result.ok and result.error == "the function pool was closed during the call"
    assert await eventually(lambda: all(gone(pid) for pid in pids))
    with pytest.raises(RuntimeError, match="closed"):
        await started.invoke(handlers, "h.pid", EVENT, timeout=1)


def test_invoke_cli_prints_id_and_result(handlers: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = invoke_main(["h.info", "--handlers-dir", str(handlers), "--event", "draining", "--instance", "Node/worker-1",
                        "--address", "10.0.0.7", "--port", "9000"])
    out = capsys.readouterr().out
    assert code == 0, out
    first, rest = out.split("\n", 1)
    value = json.loads(rest)
    assert first == f"event id: {value['event']['id']}"
    assert value["event"]["type"] == "dev.poolkeeper.instance.draining"
    assert value["event"]["subject"] == "Node/worker-1"
    assert value["event"]["data"]["instance"]["address"] == "10.0.0.7"
    assert value["function_name"] == "h"
    expected = sample_event(event="draining", kind="Node", namespace="", name="worker-1", pool="sample-pool",
                            address="10.0.0.7", port=9000)
    assert value["event"]["id"] == expected["id"]  # stable across runs


def test_invoke_cli_reports_failures(handlers: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert invoke_main(["h.fails", "--handlers-dir", str(handlers)]) == 1
    assert capsys.readouterr().err == "error: ValueError: bad input\n"
    assert invoke_main(["h.sleeps", "--handlers-dir", str(handlers), "--timeout", "0.3"]) == 1
    assert capsys.readouterr().err == "error: timed out after 0.3s\n"


ORPHAN_SCRIPT = """
import asyncio, sys
from poolkeeper.functions.pool import FunctionPool

async def main():
    pool = FunctionPool(size=2)
    await pool.start()
    print(" ".join(map(str, pool.worker_pids())), flush=True)
    await pool.invoke(sys.argv[1], "h.burns", {"id": "x"}, timeout=60)

asyncio.run(main())
"""


async def test_workers_do_not_outlive_a_killed_operator(handlers: Path) -> None:
    operator = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ORPHAN_SCRIPT, str(handlers), stdout=asyncio.subprocess.PIPE
    )
    assert operator.stdout is not None
    pids = [int(pid) for pid in (await asyncio.wait_for(operator.stdout.readline(), 10)).split()]
    assert len(pids) == 2
    await asyncio.sleep(0.3)  # one worker is now spinning on the CPU
    operator.kill()
    await operator.wait()
    assert await eventually(lambda: all(gone(pid) for pid in pids), limit=5.0), "workers outlived the operator"
