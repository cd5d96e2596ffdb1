"""The HAProxy backend against a real HAProxy 2.6 with real HTTP traffic through it.

Every test starts its own HAProxy (about 0.1 s) and real HTTP servers on 127.0.0.x, and
judges by what clients actually received, not only by what the runtime API says.
"""

from __future__ import annotations

import asyncio
import csv
import io
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from poolkeeper.backends import ActionResult
from poolkeeper.backends.haproxy import BackendMissing, HAProxyPool, HealthCheck, normalise_health
from poolkeeper.backends.haproxy_client import HAProxyClient, HAProxyUnreachable, TLSFiles, parse_endpoint
from poolkeeper.core.model import (
    Action,
    ActualMember,
    AddMember,
    Admin,
    DesiredMember,
    InstanceState,
    Phase,
    RemoveMember,
    SetAdmin,
)
from poolkeeper.core.naming import legacy_pool_prefix, member_name, pool_prefix
from poolkeeper.core.planner import plan_pool
from poolkeeper_dev.haproxy import DECLARED_SERVER, HAProxyProcess, issue_cert, make_ca
from poolkeeper_dev.ports import free_port
from poolkeeper_dev.rollout import NO_ERRORS, backend_errors
from poolkeeper_dev.traffic import HTTPBackend, HTTPConnection, LoadGenerator, LoadReport, start_backend

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(60)]

NS, POOL = "shop", "web"
PREFIX = pool_prefix(NS, POOL)
T = TypeVar("T")


def name(i: int) -> str:
    return member_name(NS, POOL, f"uid-{i}")


# ----- fixtures


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    proc = HAProxyProcess(tmp_path / "haproxy", ["web", "checked"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def client(haproxy: HAProxyProcess) -> AsyncIterator[HAProxyClient]:
    client = HAProxyClient(haproxy.admin_endpoint)
    yield client
    await client.close()


@pytest.fixture
def pool(client: HAProxyClient) -> HAProxyPool:
    return HAProxyPool(client, "web", PREFIX, None)


@pytest.fixture
def http() -> Iterator[Callable[..., HTTPBackend]]:
    """Start real HTTP backends on given loopback addresses; all stopped at the end."""
    started: list[HTTPBackend] = []

    def start(address: str, delay: float = 0.0) -> HTTPBackend:
        started.append(start_backend(address, delay=delay))
        return started[-1]

    yield start
    for backend in started:
        backend.stop()


# ----- helpers


def add(member: str, backend: HTTPBackend, admin: Admin = Admin.READY) -> list[Action]:
    return [AddMember(member, backend.address, backend.port), SetAdmin(member, admin)]


async def apply_ok(pool: HAProxyPool, actions: Sequence[Action]) -> list[ActionResult]:
    results = await pool.apply(actions)
    assert [r.action for r in results] == list(actions)
    assert all(r.ok for r in results), results
    return results


async def load(url: str, count: int, connections: int = 4) -> LoadReport:
    generator = LoadGenerator(url, connections=connections).start(count=count)
    return await asyncio.to_thread(generator.wait, 30)


async def until(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str,
                within: float = 8.0) -> T:
    """Poll `probe` until `done(value)`; fail with the last value after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await probe()
        if done(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what}: still {value!r} after {within} s")
        await asyncio.sleep(0.02)


async def stat_rows(client: HAProxyClient, backend: str) -> dict[str, dict[str, str]]:
    """`show stat` rows of a backend by svname (BACKEND is the backend's own row)."""
    (answer,) = await client.execute([f"show stat {backend} -1 -1"])
    return {row["svname"]: row for row in csv.DictReader(io.StringIO(answer.removeprefix("# ")))}


async def slow_request(url: str, delay: float) -> tuple[int, str]:
    """One request the backend holds for `delay` s; (0, error) when the connection is cut."""
    connection = HTTPConnection(f"{url}/?delay={delay}")
    try:
        return await connection.get()
    except (OSError, EOFError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


# ----- pure parts


@pytest.mark.parametrize(("endpoint", "parsed"), [
    ("unix:///run/haproxy/admin.sock", ("unix", "/run/haproxy/admin.sock")),
    ("tcp://127.0.0.1:9999", ("tcp", "127.0.0.1", 9999)),
    ("tcp://[::1]:9999", ("tcp", "::1", 9999)),
    ("tcp://haproxy.lb.svc:9999", ("tcp", "haproxy.lb.svc", 9999)),
])
def test_parse_endpoint(endpoint: str, parsed: tuple[str, ...]) -> None:
    assert parse_endpoint(endpoint) == parsed


@pytest.mark.parametrize(("endpoint", "why"), [
    ("/run/haproxy/admin.sock", "no scheme"),
    ("unix://admin.sock", "absolute socket path"),
    ("tcp://127.0.0.1", "host and a port"),
    ("tcp://127.0.0.1:99999", "invalid port"),
    ("http://127.0.0.1:80", "unknown scheme"),
])
def test_parse_endpoint_refuses(endpoint: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_endpoint(endpoint)


# (srv_op_state, srv_admin_state, srv_check_state, srv_check_health) from `show servers state` and
# check_status from `show stat`, as HAProxy 2.6.12 showed them for rise 2, fall 2 (stat status in the id)
@pytest.mark.parametrize(("op", "admin", "checks", "health", "status", "expected"), [
    pytest.param(2, 0, 0, 0, "", "", id="no check"),
    pytest.param(0, 1, 2, 0, "", "", id="MAINT, added with check, not enabled"),
    pytest.param(2, 8, 6, 2, "INI", "CHECKING", id="DRAIN 1/2 INI: just added"),
    pytest.param(2, 8, 6, 3, "L4OK", "UP", id="DRAIN L4OK"),
    pytest.param(0, 8, 6, 0, "L4CON", "DOWN", id="DOWN L4CON while drained"),
    pytest.param(2, 0, 6, 3, "L4OK", "UP", id="UP L4OK"),
    pytest.param(2, 0, 7, 3, "* L4OK", "UP", id="UP, next check running"),
    pytest.param(2, 0, 6, 2, "L4CON", "UP", id="UP 1/2 L4CON: going down"),
    pytest.param(0, 0, 6, 1, "L4OK", "DOWN", id="DOWN 1/2 L4OK: going up"),
    pytest.param(0, 1, 14, 0, "", "CHECKING", id="MAINT: checks paused"),
    pytest.param(2, 8, 6, 2, "L4OK", "CHECKING", id="DRAIN 1/2 L4OK: stale, just left MAINT"),
])
def test_normalise_health(op: int, admin: int, checks: int, health: int, status: str, expected: str) -> None:
    assert normalise_health(op_state=op, admin_state=admin, check_state=checks, check_health=health,
                            check_status=status, rise=2, fall=2) == expected


async def test_commands_cannot_smuggle_more_commands(client: HAProxyClient) -> None:
    for bad in ["show info; show stat", "show info\nshow stat", ""]:
        with pytest.raises(ValueError, match="single runtime API command"):
            await client.execute([bad])


async def test_a_replica_that_no_longer_leads_sends_nothing(haproxy: HAProxyProcess) -> None:
    """The fence is checked just before the bytes go out: a leader paused mid-reconcile that wakes
    after another took over sends none of what it planned, while probes (reads) still work."""
    leading = True
    client = HAProxyClient(haproxy.admin_endpoint, may_act=lambda: leading)
    try:
        assert "Pid" in await client.info()
        leading = False
        with pytest.raises(HAProxyUnreachable, match="no longer leads"):
            await client.execute(["add server web/pk-fenced 127.0.0.1:9"])
        assert "Pid" in await client.info(probe=True)
    finally:
        await client.close()
    check = HAProxyClient(haproxy.admin_endpoint)
    try:
        (state,) = await check.execute(["show servers state web"])
        assert "pk-fenced" not in state
    finally:
        await check.close()


# ----- membership and traffic


async def test_added_ready_members_get_traffic(
        pool: HAProxyPool, haproxy: HAProxyProcess, http: Callable[..., HTTPBackend]) -> None:
    a, b = http("127.0.0.2"), http("127.0.0.3")
    results = await apply_ok(pool, [*add(name(1), a), *add(name(2), b)])
    assert [r.message for r in results] == ["", "", "", ""]
    assert await pool.read_members() == {
        name(1): ActualMember(name(1), a.address, a.port, Admin.READY, "", 0, 1),
        name(2): ActualMember(name(2), b.address, b.port, Admin.READY, "", 0, 1),
    }
    report = await load(haproxy.frontend_url("web"), 200)
    assert report.failed == 0, report.failures
    assert await asyncio.to_thread(backend_errors, haproxy.admin_endpoint, "web") == NO_ERRORS
    assert report.served_by[a.name] > 50 and report.served_by[b.name] > 50, report.served_by


async def test_added_member_stays_out_of_rotation_until_set_admin(
        pool: HAProxyPool, haproxy: HAProxyProcess, http: Callable[..., HTTPBackend]) -> None:
    a, b = http("127.0.0.2"), http("127.0.0.3")
    await apply_ok(pool, [*add(name(1), a), AddMember(name(2), b.address, b.port)])
    assert (await pool.read_members())[name(2)].admin is Admin.MAINT
    report = await load(haproxy.frontend_url("web"), 50)
    assert report.served_by == {a.name: 50} and b.requests_served == 0


async def test_drained_member_gets_no_new_requests(
        pool: HAProxyPool, haproxy: HAProxyProcess, http: Callable[..., HTTPBackend]) -> None:
    a, b = http("127.0.0.2"), http("127.0.0.3")
    await apply_ok(pool, [*add(name(1), a), *add(name(2), b)])
    await apply_ok(pool, [SetAdmin(name(1), Admin.DRAIN)])
    assert (await pool.read_members())[name(1)].admin is Admin.DRAIN
    before = a.requests_served
    report = await load(haproxy.frontend_url("web"), 200)
    assert report.failed == 0, report.failures
    assert await asyncio.to_thread(backend_errors, haproxy.admin_endpoint, "web") == NO_ERRORS
    assert report.served_by == {b.name: 200}
    assert a.requests_served == before


async def test_remove_waits_for_sessions(
        pool: HAProxyPool, haproxy: HAProxyProcess, http: Callable[..., HTTPBackend]) -> None:
    a = http("127.0.0.2")
    await apply_ok(pool, add(name(1), a))
    request = asyncio.create_task(slow_request(haproxy.frontend_url("web"), 1.0))
    await until(pool.read_members, lambda m: m[name(1)].sessions == 1, "session visible")

    (result,) = await pool.apply([RemoveMember(name(1), "drained")])
    assert not result.ok
    assert result.message == "Server still has connections attached to it, cannot remove it."
    assert (await pool.read_members())[name(1)].admin is Admin.MAINT  # no new traffic meanwhile

    assert await request == (200, a.name)  # the in-flight request was not cut
    await until(lambda: pool.apply([RemoveMember(name(1), "drained")]), lambda r: r[0].ok, "removed")
    assert await pool.read_members() == {}


async def test_a_drain_is_read_back_in_the_same_round_trip_sessions_included(
        pool: HAProxyPool, haproxy: HAProxyProcess, http: Callable[..., HTTPBackend]) -> None:
    a, b = http("127.0.0.2"), http("127.0.0.3")
    await apply_ok(pool, [*add(name(1), a), *add(name(2), b)])
    request = asyncio.create_task(slow_request(haproxy.frontend_url("web"), 1.0))
    busy = await until(pool.read_members, lambda m: sum(x.sessions or 0 for x in m.values()) == 1, "session visible")
    (held,) = [n for n, m in busy.items() if m.sessions]
    results, after = await pool.apply_and_read([SetAdmin(name(1), Admin.DRAIN), SetAdmin(name(2), Admin.DRAIN)])
    assert all(r.ok for r in results) and after is not None
    assert after == await pool.read_members(), "what the batch read is what HAProxy shows"
    assert {n: m.admin for n, m in after.items()} == {name(1): Admin.DRAIN, name(2): Admin.DRAIN}
    assert after[held].sessions == 1, "the drained server's in-flight session is counted"
    assert await request == (200, a.name if held == name(1) else b.name)
    results, after = await pool.apply_and_read([RemoveMember(name(1), "drained"), RemoveMember(name(2), "drained")])
    assert all(r.ok for r in results) and await pool.read_members() == {}
    assert after in ({}, None), "None: a del waited for idle connections to close (a second round trip)"


async def test_servers_read_without_stat_are_the_members_without_sessions(
        pool: HAProxyPool, haproxy: HAProxyProcess, http: Callable[..., HTTPBackend]) -> None:
    """The resync's read of a pool without checks: `show servers state` alone, alone in its batch
    or beside a pool that wants `show stat` too (each gets its own backend's answers)."""
    a, b = http("127.0.0.2"), http("127.0.0.3")
    await apply_ok(pool, [*add(name(1), a), *add(name(2), b), SetAdmin(name(2), Admin.DRAIN)])
    request = asyncio.create_task(slow_request(haproxy.frontend_url("web"), 1.0))
    full = await until(pool.read_members, lambda m: sum(x.sessions or 0 for x in m.values()) == 1, "session visible")
    servers = await pool.read_servers()
    assert servers == {n: replace(m, sessions=0) for n, m in full.items()}
    assert {n: m.admin for n, m in servers.items()} == {name(1): Admin.READY, name(2): Admin.DRAIN}
    other = HAProxyPool(pool.client, "checked", pool_prefix("ns", "other"), None)
    together = await asyncio.gather(pool.read_servers(), other.read_members(), pool.read_members())
    assert together[0] == servers and together[1] == {}
    assert together[2][name(1)].sessions == 1, "an asker wanting `show stat` in the same batch still gets it"
    assert await request == (200, a.name)


async def test_forced_remove_cuts_sessions(
        pool: HAProxyPool, haproxy: HAProxyProcess, http: Callable[..., HTTPBackend]) -> None:
    a = http("127.0.0.2")
    await apply_ok(pool, add(name(1), a))
    request = asyncio.create_task(slow_request(haproxy.frontend_url("web"), 1.5))
    await until(pool.read_members, lambda m: m[name(1)].sessions == 1, "session visible")
    (result,) = await pool.apply([RemoveMember(name(1), "delay over", force=True)])
    assert result.ok and result.message == ""
    status, body = await asyncio.wait_for(request, 1)  # cut at once, long before the backend answers
    assert status in (0, 502), body
    assert await pool.read_members() == {}


async def test_removing_a_missing_member_is_done(pool: HAProxyPool) -> None:
    (result,) = await pool.apply([RemoveMember(name(9), "gone")])
    assert result.ok and result.message == "already removed"


async def test_servers_outside_the_pool_are_never_touched_nor_reported(
        tmp_path: Path, http: Callable[..., HTTPBackend]) -> None:
    static, a = http("127.0.0.5"), http("127.0.0.2")
    proc = HAProxyProcess(tmp_path / "declared", ["web"], declared={"web": static.name})
    proc.start()
    client = HAProxyClient(proc.admin_endpoint)
    try:
        pool = HAProxyPool(client, "web", PREFIX, None)
        other = HAProxyPool(client, "web", pool_prefix(NS, "other"), None)
        other_name = member_name(NS, "other", "uid-1")
        await apply_ok(other, [AddMember(other_name, a.address, a.port), SetAdmin(other_name, Admin.DRAIN)])
        before = await stat_rows(client, "web")

        await apply_ok(pool, add(name(1), a))
        assert set(await pool.read_members()) == {name(1)}
        refused = await pool.apply([SetAdmin(DECLARED_SERVER, Admin.MAINT), RemoveMember(DECLARED_SERVER, "x"),
                                    RemoveMember(other_name, "x", force=True)])
        assert [r.ok for r in refused] == [False, False, False]
        assert all("does not belong to this pool" in r.message for r in refused), refused
        report = await load(proc.frontend_url("web"), 100)
        await apply_ok(pool, [SetAdmin(name(1), Admin.DRAIN)])
        # like the operator: `del` waits for attached (idle keep-alive) connections
        await until(lambda: pool.apply([RemoveMember(name(1), "gone")]), lambda r: r[0].ok, "removed", within=10.0)

        after = await stat_rows(client, "web")
        assert set(after) == {DECLARED_SERVER, other_name, "BACKEND"}
        for server in (DECLARED_SERVER, other_name):
            assert after[server]["status"] == before[server]["status"]
        assert report.failed == 0 and report.served_by[static.name] > 0
        assert set(await other.read_members()) == {other_name}
    finally:
        await client.close()
        proc.stop()


async def test_legacy_servers_of_the_pool_are_removed_and_only_they(
        pool: HAProxyPool, client: HAProxyClient, http: Callable[..., HTTPBackend]) -> None:
    """After an upgrade to 80-bit prefixes, a pool that won its backend removes servers named by its
    old 32-bit prefix (exactly that format), and no others: not a look-alike, not another pool's."""
    a = http("127.0.0.2")
    legacy = legacy_pool_prefix(NS, POOL)
    old = legacy + "0123456789ab"
    look_alike = legacy + "evil"  # the legacy prefix, but not a name poolkeeper ever made
    other_old = legacy_pool_prefix(NS, "other") + "0123456789ab-abcd"
    writer = HAProxyPool(client, "web", "pk-", None)  # stands in for the old release
    await apply_ok(writer, [*add(old, a), *add(look_alike, a), *add(other_old, a)])
    upgraded = HAProxyPool(client, "web", PREFIX, None, legacy_prefix=legacy)
    assert set(await upgraded.read_members()) == {old}
    assert set(await pool.read_members()) == set()  # without the legacy prefix: not its own
    await apply_ok(upgraded, [SetAdmin(old, Admin.DRAIN)])
    await until(lambda: upgraded.apply([RemoveMember(old, "renamed")]), lambda r: r[0].ok, "removed", within=10.0)
    refused = await upgraded.apply([RemoveMember(look_alike, "x", force=True),
                                    RemoveMember(other_old, "x", force=True)])
    assert [r.ok for r in refused] == [False, False]
    assert {look_alike, other_old} <= set(await stat_rows(client, "web"))
    assert old not in set(await stat_rows(client, "web"))


async def test_applying_the_same_plan_twice_changes_nothing(
        pool: HAProxyPool, http: Callable[..., HTTPBackend]) -> None:
    a, b, c = http("127.0.0.2"), http("127.0.0.3"), http("127.0.0.4")
    plan = [*add(name(1), a), *add(name(2), b, Admin.DRAIN), *add(name(3), c, Admin.MAINT)]
    await apply_ok(pool, plan)
    first = await pool.read_members()
    again = await apply_ok(pool, plan)
    assert [r.message for r in again if isinstance(r.action, AddMember)] == ["already present"] * 3
    assert await pool.read_members() == first
    assert {n: m.admin for n, m in first.items()} == {
        name(1): Admin.READY, name(2): Admin.DRAIN, name(3): Admin.MAINT}

    # the planner reads it back as it wrote it: a serving member and a held one need nothing more
    # (the drained one, with no sessions left, would rightly be removed)
    desired = {name(1): desired_member(name(1), a, Phase.UP), name(3): desired_member(name(3), c, Phase.UP, held=True)}
    actual = {n: m for n, m in first.items() if n in desired}
    plan_again = plan_pool(desired=desired, actual=actual, draining_since={}, now=1.0,
                           deregistration_delay=30, health_checks=False)
    assert plan_again.actions == ()


async def test_an_add_clashing_with_another_address_fails(
        pool: HAProxyPool, http: Callable[..., HTTPBackend]) -> None:
    a, b = http("127.0.0.2"), http("127.0.0.3")
    await apply_ok(pool, add(name(1), a))
    (result,) = await pool.apply([AddMember(name(1), b.address, b.port)])
    assert not result.ok and f"(at {a.address}:{a.port})" in result.message


def desired_member(member: str, backend: HTTPBackend, phase: Phase, held: bool = False) -> DesiredMember:
    instance = InstanceState(kind="Pod", namespace=NS, name=member, uid=member, address=backend.address,
                             labels={}, phase=phase, reason="")
    return DesiredMember(member, instance, backend.address, backend.port, serving=phase is Phase.UP, held=held)


# ----- health checks


async def test_health_checks_keep_traffic_off_until_the_first_check_passes(
        client: HAProxyClient, haproxy: HAProxyProcess, http: Callable[..., HTTPBackend]) -> None:
    pool = HAProxyPool(client, "checked", PREFIX, HealthCheck(interval_seconds=1, rise=2, fall=2))
    first, late = http("127.0.0.2"), http("127.0.0.3")
    dead_port = free_port("127.0.0.4")  # nothing listens there
    desired = {name(1): desired_member(name(1), first, Phase.UP)}

    def plan(actual: dict[str, ActualMember]) -> tuple[Action, ...]:
        return plan_pool(desired=desired, actual=actual, draining_since={}, now=0.0,
                         deregistration_delay=30, health_checks=True).actions

    async def reconcile() -> dict[str, ActualMember]:
        """What the operator does on every event: read, plan, apply; returns what it read."""
        actual = await pool.read_members()
        await apply_ok(pool, plan(actual))
        return actual

    await until(reconcile, lambda m: m.get(name(1), None) is not None and m[name(1)].admin is Admin.READY,
                "first member in rotation")
    assert (await pool.read_members())[name(1)].health == "UP"

    traffic = LoadGenerator(haproxy.frontend_url("checked"), connections=4, rate=200).start()
    dead = InstanceState(kind="Pod", namespace=NS, name="dead", uid="dead", address="127.0.0.4",
                         labels={}, phase=Phase.UP, reason="")
    desired[name(2)] = desired_member(name(2), late, Phase.UP)
    desired[name(3)] = DesiredMember(name(3), dead, "127.0.0.4", dead_port, serving=True)

    actions = plan(await pool.read_members())
    assert set(actions) == {AddMember(name(2), late.address, late.port), SetAdmin(name(2), Admin.DRAIN),
                            AddMember(name(3), "127.0.0.4", dead_port), SetAdmin(name(3), Admin.DRAIN)}
    await apply_ok(pool, actions)
    after_add = await pool.read_members()
    assert after_add[name(2)].admin is Admin.DRAIN and after_add[name(3)].admin is Admin.DRAIN
    assert after_add[name(2)].health in {"CHECKING", "UP"}
    assert after_add[name(3)].health in {"CHECKING", "DOWN"}

    seen_dead: set[str] = set()

    async def step() -> dict[str, ActualMember]:
        actual = await reconcile()
        seen_dead.add(f"{actual[name(3)].admin.value}/{actual[name(3)].health}")
        return actual

    actual = await until(step, lambda m: m[name(2)].admin is Admin.READY and m[name(3)].health == "DOWN",
                         "late member in rotation, dead one DOWN")
    await asyncio.sleep(0.5)  # traffic reaches the late member too
    report = await asyncio.to_thread(traffic.stop)

    assert seen_dead <= {"drain/CHECKING", "drain/DOWN"}, seen_dead
    assert report.failed == 0, report.failures
    assert await asyncio.to_thread(backend_errors, haproxy.admin_endpoint, "checked") == NO_ERRORS
    assert report.served_by[late.name] > 0
    rows = await stat_rows(client, "checked")
    assert rows[name(3)]["stot"] == "0" and rows[name(3)]["econ"] == "0"  # not one connection tried
    assert rows["BACKEND"]["wredis"] == "0"
    assert actual[name(1)].health == "UP"


async def test_a_member_leaving_maintenance_is_checked_afresh(
        client: HAProxyClient, http: Callable[..., HTTPBackend]) -> None:
    """HAProxy keeps the pre-maintenance check result: it must not read UP for a target that died meanwhile."""
    pool = HAProxyPool(client, "checked", PREFIX, HealthCheck(interval_seconds=1, rise=2, fall=2))
    a = http("127.0.0.2")
    await apply_ok(pool, add(name(1), a, Admin.DRAIN))
    await until(pool.read_members, lambda m: m[name(1)].health == "UP", "checks passed")
    await apply_ok(pool, [SetAdmin(name(1), Admin.MAINT)])
    assert (await pool.read_members())[name(1)].health == "CHECKING"  # checks are paused

    a.stop()  # the target dies while held
    await apply_ok(pool, [SetAdmin(name(1), Admin.DRAIN)])
    seen: list[str] = []

    async def health() -> str:
        seen.append((await pool.read_members())[name(1)].health)
        return seen[-1]

    await until(health, lambda h: h == "DOWN", "dead target found DOWN")
    assert set(seen) <= {"CHECKING", "DOWN"} and seen[0] == "CHECKING", seen


async def test_marked_up_a_server_leaves_maintenance_fully_up_and_fall_checks_take_it_out(
        client: HAProxyClient, http: Callable[..., HTTPBackend]) -> None:
    """initialState Up: `set server ... health up` after `state ready` (before it, leaving MAINT resets
    health to rise: one failure from down). Live: UP before any check; dead: out after `fall` failures."""
    pool = HAProxyPool(client, "checked", PREFIX, HealthCheck(interval_seconds=1, rise=2, fall=3))
    live = http("127.0.0.2")
    dead_port = free_port("127.0.0.4")
    up = [AddMember(name(1), live.address, live.port), SetAdmin(name(1), Admin.READY, mark_up=True),
          AddMember(name(2), "127.0.0.4", dead_port), SetAdmin(name(2), Admin.READY, mark_up=True)]
    await apply_ok(pool, up)
    lines = (await client.execute(["show servers state checked"]))[0].splitlines()
    header = lines[1].lstrip("# ").split()
    state = {row["srv_name"]: row for row in (dict(zip(header, line.split(), strict=False)) for line in lines[2:])}
    for member in (name(1), name(2)):  # running, in rotation, and health rise + fall - 1: `fall` failures from down
        row = state[member]
        assert (row["srv_op_state"], row["srv_admin_state"], row["srv_check_health"]) == ("2", "0", "4"), row
    assert (await pool.read_members())[name(1)].admin is Admin.READY
    rows = await until(lambda: stat_rows(client, "checked"), lambda r: r[name(2)]["status"] == "DOWN",
                       "dead server DOWN")
    assert rows[name(2)]["chkfail"] == "3" and rows[name(2)]["chkdown"] == "1", rows[name(2)]
    assert rows[name(1)]["status"] == "UP"
    assert (await pool.read_members())[name(2)].health == "DOWN"


# ----- connection handling


async def test_restart_loses_runtime_servers_and_the_client_reconnects(
        pool: HAProxyPool, client: HAProxyClient, haproxy: HAProxyProcess,
        http: Callable[..., HTTPBackend]) -> None:
    a = http("127.0.0.2")
    await apply_ok(pool, add(name(1), a))
    pid = (await client.info())["Pid"]

    haproxy.restart()
    assert await pool.read_members() == {}  # same client: reconnected transparently
    assert (await client.info())["Pid"] != pid
    await apply_ok(pool, add(name(1), a))
    assert (await load(haproxy.frontend_url("web"), 20)).served_by == {a.name: 20}

    haproxy.stop()
    with pytest.raises(HAProxyUnreachable, match=r"cannot connect to HAProxy at unix://.*refused"):
        await pool.read_members()
    haproxy.start()
    assert await pool.read_members() == {}


async def test_a_reload_keeps_our_session_on_the_old_worker_until_current_info_moves_on(
        tmp_path: Path, http: Callable[..., HTTPBackend]) -> None:
    """HAProxy in master-worker mode, reloaded as `systemctl reload` does (SIGUSR2 to the master)."""
    with HAProxyProcess(tmp_path / "mw", ["web"], master_worker=True) as haproxy:
        client = HAProxyClient(haproxy.admin_endpoint)
        pool = HAProxyPool(client, "web", PREFIX, None)
        try:
            a = http("127.0.0.2")
            await apply_ok(pool, add(name(1), a))
            old, _ = await client.current_info()  # opens the probes' own session
            new_pid = haproxy.reload()
            # what HAProxy does: open sessions stay with the old worker, which answers for itself
            for probe in (True, False):
                stale = await client.info(probe=probe)
                assert (stale["Pid"], stale["Stopping"]) == (old["Pid"], "1")
            assert set(await pool.read_members()) == {name(1)}
            # what the probe does: leave the stopping worker, reach the new one (without our server)
            info, left_stopping = await client.current_info()
            assert (int(info["Pid"]), info["Stopping"], left_stopping) == (new_pid, "0", True)
            assert await pool.read_members() == {}
            again, left_stopping = await client.current_info()
            assert (again["Pid"], left_stopping) == (info["Pid"], False)
            await apply_ok(pool, add(name(1), a))
            assert (await load(haproxy.frontend_url("web"), 20)).served_by == {a.name: 20}
        finally:
            await client.close()


async def test_a_hung_runtime_api_costs_one_timeout_then_calls_fail_fast_until_a_probe_answers(
        haproxy: HAProxyProcess) -> None:
    """SIGSTOP: the stats socket still accepts (into the backlog) and never answers."""
    client = HAProxyClient(haproxy.admin_endpoint, timeout=0.5)
    try:
        assert (await client.info())["Pid"]
        loop = asyncio.get_running_loop()
        haproxy.pause()
        try:
            started = loop.time()
            outcomes = await asyncio.gather(*(client.execute(["show info"]) for _ in range(20)),
                                            return_exceptions=True)
            elapsed = loop.time() - started
            assert all(isinstance(o, HAProxyUnreachable) for o in outcomes), outcomes
            assert "did not answer within 0.5 s" in str(outcomes[0])
            assert elapsed < 1.5, f"20 callers took {elapsed:.1f} s: they queued behind the hung call"
            started = loop.time()
            with pytest.raises(HAProxyUnreachable, match="waiting for it to answer the health probe"):
                await client.execute(["show info"])  # no new connection to a process known not to answer
            assert loop.time() - started < 0.1
            with pytest.raises(HAProxyUnreachable, match=r"did not answer within 0\.2 s"):
                await client.info(probe=True, within=0.2)  # a probe is still sent, with its own bound
        finally:
            haproxy.resume()
        info, left_stopping = await client.current_info(within=2.0)
        assert info["Pid"] and not left_stopping
        assert (await client.execute(["show info"]))[0].startswith("Name: HAProxy")
    finally:
        await client.close()


async def test_a_probe_that_gets_no_answer_ends_the_call_stuck_on_the_same_haproxy(
        haproxy: HAProxyProcess, client: HAProxyClient) -> None:
    """The probe has its own connection: it is not queued behind the stuck call, and it frees it."""
    assert client.timeout == 5.0
    await client.info()
    loop = asyncio.get_running_loop()
    haproxy.pause()
    try:
        started = loop.time()
        stuck = asyncio.ensure_future(client.execute(["show servers state web"]))
        await asyncio.sleep(0.1)
        with pytest.raises(HAProxyUnreachable, match=r"did not answer within 0\.5 s"):
            await client.info(probe=True, within=0.5)
        with pytest.raises(HAProxyUnreachable, match=r"did not answer within 0\.5 s; waiting for it to answer"):
            await stuck
        assert loop.time() - started < 2.0  # not the call's own 5 s
    finally:
        haproxy.resume()
    info, _ = await client.current_info()
    assert info["Pid"]
    assert (await client.execute(["show servers state web"]))[0].startswith("1\n")


async def test_an_idle_session_closed_by_haproxy_is_reopened(client: HAProxyClient, pool: HAProxyPool) -> None:
    assert await client.execute(["set timeout cli 1"]) == [""]
    await asyncio.sleep(1.5)  # HAProxy closes the idle session
    assert await pool.read_members() == {}


async def test_concurrent_callers_get_their_own_answers(client: HAProxyClient) -> None:
    async def ask(i: int) -> None:
        answers = await client.execute(["show info", f"show servers state {'web' if i % 2 else 'checked'}"])
        assert answers[0].startswith("Name: HAProxy")
        assert answers[1].startswith("1\n# be_id")

    await asyncio.gather(*(ask(i) for i in range(50)))


async def test_backend_missing(client: HAProxyClient) -> None:
    with pytest.raises(BackendMissing, match="backend 'nosuch' not found in HAProxy"):
        await HAProxyPool(client, "nosuch", PREFIX, None).read_members()


async def test_tls_endpoint_requires_a_client_certificate(
        tmp_path: Path, http: Callable[..., HTTPBackend]) -> None:
    proc = HAProxyProcess(tmp_path / "tls", ["web"], tls=True)
    proc.start()
    client = HAProxyClient(proc.tcp_endpoint, proc.tls_files)
    try:
        a = http("127.0.0.2")
        pool = HAProxyPool(client, "web", PREFIX, None)
        await apply_ok(pool, add(name(1), a))
        assert set(await pool.read_members()) == {name(1)}
        assert (await load(proc.frontend_url("web"), 10)).served_by == {a.name: 10}

        # no client certificate: the handshake is refused
        context = ssl.create_default_context(cafile=str(proc.tls_files.ca_file))
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.tls_port, ssl=context)
        writer.write(b"show info\n")
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await reader.readuntil(b"\n")
        writer.close()

        # a certificate from another CA: refused too
        rogue = make_ca(tmp_path / "rogue", "rogue")
        cert, key = issue_cert(rogue, tmp_path / "rogue", "intruder", server=False)
        intruder = HAProxyClient(proc.tcp_endpoint, TLSFiles(proc.tls_files.ca_file, cert, key))
        with pytest.raises(HAProxyUnreachable, match="refused the session"):
            await intruder.info()
        await intruder.close()

        # plain text on the TLS port gets nothing
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.tls_port)
        writer.write(b"show info\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await client.close()
        proc.stop()


# ----- the whole story


async def test_rolling_replace_under_load_loses_no_request(
        pool: HAProxyPool, haproxy: HAProxyProcess, http: Callable[..., HTTPBackend]) -> None:
    old = {name(i): http(f"127.0.0.{10 + i}", delay=0.05) for i in range(5)}  # always some in flight
    new = {name(10 + i): http(f"127.0.0.{20 + i}") for i in range(5)}
    await apply_ok(pool, [action for member, backend in old.items() for action in add(member, backend)])

    async def replace(gone: str, coming: str) -> None:
        """Add the new member, drain the old one, wait for its sessions to end, then remove it."""
        await apply_ok(pool, [*add(coming, new[coming]), SetAdmin(gone, Admin.DRAIN)])

        async def sessions() -> int | None:
            return (await pool.read_members())[gone].sessions

        async def remove() -> ActionResult:
            return (await pool.apply([RemoveMember(gone, "replaced")]))[0]

        await until(sessions, lambda n: n == 0, f"{gone} drained")
        await until(remove, lambda r: r.ok, f"{gone} removed")
        await asyncio.to_thread(old[gone].stop)  # the old instance really goes away

    traffic = LoadGenerator(haproxy.frontend_url("web"), connections=8, rate=300).start()
    await asyncio.sleep(0.3)
    for gone, coming in zip(old, new, strict=True):
        await replace(gone, coming)
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    report = await asyncio.to_thread(traffic.stop)

    assert report.failed == 0, report.failures
    assert await asyncio.to_thread(backend_errors, haproxy.admin_endpoint, "web") == NO_ERRORS
    assert report.total > 200, report
    assert set(await pool.read_members()) == set(new)
    assert all(report.served_by[b.name] > 0 for b in new.values()), report.served_by
