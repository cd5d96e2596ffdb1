"""Big pipelined batches against a real HAProxy 2.6: one result per command, failures per member,
timeouts bounded by progress, and a restart noticed from the lost connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from poolkeeper.backends.haproxy import HAProxyPool, server_id
from poolkeeper.backends.haproxy_client import HAProxyClient
from poolkeeper.controller.loadbalancers import LoadBalancers
from poolkeeper.core.model import Action, AddMember, Admin, SetAdmin
from poolkeeper.core.naming import member_name, pool_prefix
from poolkeeper.kube.status import StatusBody
from poolkeeper_dev.haproxy import HAProxyProcess

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(120)]

NS, POOL = "shop", "big"
PREFIX = pool_prefix(NS, POOL)


def name(i: int) -> str:
    return member_name(NS, POOL, f"uid-{i}")


def address(i: int) -> str:
    return f"127.{60 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


def adds(count: int) -> list[Action]:
    return [a for i in range(count) for a in (AddMember(name(i), address(i), 8080), SetAdmin(name(i), Admin.READY))]


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    proc = HAProxyProcess(tmp_path / "haproxy", ["web"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def client(haproxy: HAProxyProcess) -> AsyncIterator[HAProxyClient]:
    client = HAProxyClient(haproxy.admin_endpoint, timeout=30)
    yield client
    await client.close()


async def servers(client: HAProxyClient) -> dict[str, tuple[int, str, int]]:
    """name -> (srv_id, srv_addr, srv_admin_state) from `show servers state web`."""
    (state,) = await client.execute(["show servers state web"])
    rows = [line.split() for line in state.splitlines()[2:] if line.strip()]
    return {r[3]: (int(r[2]), r[4], int(r[6])) for r in rows}


async def test_two_thousand_adds_in_one_call_get_one_result_each_and_are_all_applied(client: HAProxyClient) -> None:
    pool = HAProxyPool(client, "web", PREFIX, None)
    actions = adds(2000)
    results = await pool.apply(actions)
    assert [r.action for r in results] == actions
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    found = await servers(client)
    assert len(found) == 2000
    assert all(found[name(i)] == (server_id(name(i)), address(i), 0) for i in range(2000))  # ids ours, in rotation


async def test_failures_in_the_middle_of_a_big_batch_are_reported_for_those_members_only(
        client: HAProxyClient) -> None:
    pool = HAProxyPool(client, "web", PREFIX, None)
    taken, clash = 700, 1400
    # a server outside the pool already holds the id member 700 would get; member 1400's name
    # already exists at another address
    assert await client.execute([f"add server web/other 127.0.0.9:80 id {server_id(name(taken))}",
                                 f"add server web/{name(clash)} 127.0.0.8:80"]) == ["New server registered."] * 2
    actions = adds(2000)
    results = await pool.apply(actions)
    assert [r.action for r in results] == actions
    failed = {(r.action.name, type(r.action).__name__) for r in results if not r.ok}
    assert failed == {(name(clash), "AddMember")}, failed
    (refused,) = [r for r in results if not r.ok]
    assert refused.message.startswith("Already exists") and "(at 127.0.0.8:80)" in refused.message
    found = await servers(client)
    assert found["other"] == (server_id(name(taken)), "127.0.0.9", 1)  # untouched, still in maintenance
    assert found[name(taken)][1:] == (address(taken), 0)  # added without an id, and set in rotation
    assert found[name(taken)][0] != server_id(name(taken))
    assert found[name(clash)][1] == "127.0.0.8"  # the clashing server was not replaced
    assert all(found[name(i)] == (server_id(name(i)), address(i), 0) for i in range(2000) if i not in (taken, clash))


async def test_a_batch_longer_than_the_timeout_passes_while_answers_keep_coming(haproxy: HAProxyProcess) -> None:
    """The bound is the time between answers: a batch HAProxy works through for longer than
    `timeout` succeeds, while one HAProxy stops answering still fails after `timeout`."""
    client = HAProxyClient(haproxy.admin_endpoint, timeout=0.5)
    try:
        pool = HAProxyPool(client, "web", PREFIX, None)
        await client.info()
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Stalls shorter than the timeout, longer than it all together. The first comes before any
        # answer, the next ones a moment after answers resumed: a quick HAProxy works through 3,000
        # adds in well under 0.1 s, so stalls that waited for it could all fall after the batch.
        stalls = 0
        haproxy.pause()
        task = asyncio.ensure_future(pool.apply(adds(3000)))
        while True:
            await asyncio.sleep(0.3)
            haproxy.resume()
            stalls += 1
            await asyncio.sleep(0.005)
            if stalls == 3 or task.done():
                break
            haproxy.pause()
        results = await task
        assert stalls >= 2, "the batch ended before a second stall: the test did not test anything"
        assert loop.time() - started > 0.5
        assert len(results) == 6000 and all(r.ok for r in results)
    finally:
        haproxy.resume()
        await client.close()


class Recorded:
    def __init__(self) -> None:
        self.events: list[str] = []

    def post(self, obj: Any, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append(reason)

    def submit(self, path: str, status: StatusBody, observed: Any = None) -> None:
        pass

    def forget(self, path: str) -> None:
        pass


async def test_a_restart_is_noticed_from_the_lost_connection_before_the_next_probe(haproxy: HAProxyProcess) -> None:
    recorded, queued = Recorded(), []
    notified = asyncio.Event()

    def enqueue(key: tuple[str, str]) -> None:
        queued.append(key)
        notified.set()
    lbs = LoadBalancers(None, recorded, recorded, lambda lb: [("shop", "web")], enqueue,  # type: ignore[arg-type]
                        interval=30.0)  # the regular probe would come 30 s later
    body = {"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "LoadBalancer",
            "metadata": {"name": "edge", "uid": "uid-edge", "generation": 1},
            "spec": {"type": "HAProxy", "haproxy": {"endpoint": haproxy.admin_endpoint, "backends": [{"name": "web"}]}}}
    runner = None
    try:
        await lbs.upsert(body)  # probes once: the connection is open
        runner = asyncio.create_task(lbs.run())
        await asyncio.sleep(0.1)
        assert queued == [] and recorded.events == []
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(haproxy.restart)
        restarted = loop.time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await notified.wait()
        noticed = loop.time() - restarted
        assert queued == [("shop", "web")], (queued, recorded.events)
        assert recorded.events == ["Restarted"]  # no Unreachable while the new process was starting
        assert noticed < 1.0, noticed
    finally:
        if runner is not None:
            runner.cancel()
        await lbs.close()
