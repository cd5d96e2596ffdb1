"""One poolkeeper pool inside one HAProxy backend section, driven through the runtime API.

HAProxy keeps no metadata on a runtime server, so ownership is the name: only servers whose
name starts with the pool's prefix are read or touched; servers from the config file are
never touched. Every read and every plan is one round trip on the shared client.
"""

from __future__ import annotations

import asyncio
import csv
import ipaddress
import re
import weakref
import zlib
from collections.abc import Sequence

from poolkeeper.backends import ActionResult
from poolkeeper.backends.haproxy_client import HAProxyClient, HAProxyUnreachable
from poolkeeper.core.model import Action, ActualMember, AddMember, Admin, RemoveMember, SetAdmin, SetWeight
from poolkeeper.core.naming import LEGACY_INSTANCE
from poolkeeper.core.poolspec import HealthCheck

__all__ = ["BackendMissing", "HAProxyPool", "HealthCheck", "normalise_health"]

# Bits and values of `show servers state` (HAProxy 2.6 include/haproxy/server-t.h, check-t.h).
SRV_ST_STOPPED = 0  # srv_op_state: 0 stopped, 1 starting, 2 running, 3 stopping
ADMF_MAINT = 0x01 | 0x02 | 0x04 | 0x20  # forced, inherited, from config, DNS resolution failed
ADMF_DRAIN = 0x08 | 0x10  # forced, inherited
CHK_ST_ENABLED = 0x04  # checks are switched on (`enable health`)
CHK_ST_PAUSED = 0x08  # ... but suspended while the server is in maintenance
# `show stat` check_status of a check that passed ("* " in front while the next one runs)
CHECK_PASSED = frozenset({"L4OK", "L6OK", "L7OK", "L7OKC", "PROCOK"})

# Answers that mean success; `set`, `enable` and `shutdown` answer nothing when they work.
_SUCCESS = frozenset({"", "New server registered.", "Server deleted."})
_NO_SUCH_SERVER = "No such server."
_BUSY = "Server still has connections attached to it, cannot remove it."
_EXISTS = "Already exists"
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # HAProxy's allowed characters; ours are 36-41 long
_POOLING = "pool-max-conn -1 pool-purge-delay 5s"  # without it runtime servers get no idle pool
# `add server` without `id` makes HAProxy 2.6 look for the lowest free id from 1 up, one tree
# lookup per id in use: 10,000 adds into one backend cost it 5 s of CPU, against 1.5 s with ids
# given. Ours come from the name, far above the ids HAProxy hands out itself (config servers,
# other tools): stable across restarts, which also keeps a member's place on a consistent-hash
# ring (hash-type consistent keys servers by id). Two names may hash alike: the second add is
# refused ("custom id ... already used") and sent again without an id.
SERVER_ID_BASE = 1 << 24
SERVER_ID_SPAN = (1 << 31) - 1 - SERVER_ID_BASE  # HAProxy takes ids 1 .. 2**31-1
_ID_USED = re.compile(r"'id' : custom id \d+ already used")
# The columns read, and where they are in a parsed `show servers state` row.
STATE_COLUMNS = ("be_name", "srv_name", "srv_addr", "srv_port", "srv_op_state", "srv_admin_state", "srv_uweight",
                 "srv_check_state", "srv_check_health")
_BACKEND, _NAME_COL, _ADDR, _PORT, _OP, _ADMIN, _UWEIGHT, _CHECK_STATE, _CHECK_HEALTH = range(len(STATE_COLUMNS))
_LEGACY_REST = re.compile(LEGACY_INSTANCE)  # compiled once: a pattern per pool would thrash re's cache
STAT_COLUMNS = ("pxname", "svname", "scur", "qcur", "check_status", "check_rise", "check_fall")


Members = dict[str, ActualMember]


class BackendMissing(Exception):
    """The backend section named in the pool does not exist in this HAProxy's config."""


def normalise_health(*, op_state: int, admin_state: int, check_state: int, check_health: int,
                     check_status: str, rise: int, fall: int) -> str:
    """HAProxy's health verdict for the planner: "", "CHECKING", "DOWN" or "UP".

    - "": no checks switched on.
    - "CHECKING": no check has finished since HAProxy (re)started judging the server. A new
      server, and one leaving maintenance, starts "up, one failure from down" (health = rise,
      shown `DRAIN 1/2`), with status INI or the stale result from before maintenance; the
      first passing check lifts health to rise+fall-1 at once, so running with a passed status
      but a lower health can only be that reset. In maintenance checks are paused: "CHECKING".
    - "DOWN": checks took it out (`DOWN`, and `DOWN 1/2` while going back up).
    - "UP": in rotation as far as checks go, including `UP 1/2` after a failure: HAProxy
      applies `fall` itself.
    With fall=1 a reset server cannot be told from a checked one and reads "UP".
    """
    if not check_state & CHK_ST_ENABLED:
        return ""
    status = check_status.removeprefix("* ")
    if check_state & CHK_ST_PAUSED or admin_state & ADMF_MAINT or status in ("", "INI", "UNK"):
        return "CHECKING"
    if op_state == SRV_ST_STOPPED:
        return "DOWN"
    if status in CHECK_PASSED and check_health < rise + fall - 1:
        return "CHECKING"
    return "UP"


_NO_COUNTERS = (0, "", "", "")  # no `show stat` read: no sessions, no check status


def _int(text: str | None) -> int:
    return int(text) if text else 0


def _admin(admin_state: int) -> Admin:
    if admin_state & ADMF_MAINT:
        return Admin.MAINT
    if admin_state & ADMF_DRAIN:
        return Admin.DRAIN
    return Admin.READY


def _target(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)  # dynamic servers take an IP: a DNS name is never resolved
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _weight(weight: int) -> int:
    if not 0 <= weight <= 256:
        raise ValueError(f"weight {weight} is out of HAProxy's range 0-256")
    return weight


def _same_target(address: str, port: int, other_address: str, other_port: int) -> bool:
    try:
        return port == other_port and ipaddress.ip_address(address) == ipaddress.ip_address(other_address)
    except ValueError:
        return False


def server_id(name: str) -> int:
    """The `id` our `add server` gives a server: from its name, in HAProxy's range, above its own ids."""
    return SERVER_ID_BASE + zlib.crc32(name.encode()) % SERVER_ID_SPAN


def _result(action: Action, answers: Sequence[str]) -> ActionResult:
    if isinstance(action, RemoveMember) and all(a == _NO_SUCH_SERVER for a in answers):
        return ActionResult(action, True, "already removed")
    failed = next((a for a in answers if a not in _SUCCESS), None)
    return ActionResult(action, failed is None, failed or "")


def _clashed(result: ActionResult) -> bool:
    return isinstance(result.action, AddMember) and result.message.startswith(_EXISTS)


def _sets_after_add(add: ActionResult, following: ActionResult) -> bool:
    """The action after an add refused for its id changes the same server: it found no server
    then, and is sent again after the add is."""
    return following.action.name == add.action.name and not isinstance(following.action, (AddMember, RemoveMember))


def _settle_add(result: ActionResult, row: Sequence[str] | None) -> ActionResult:
    """An add refused because the name exists is done when the server there has the same address."""
    action = result.action
    if row is None or not isinstance(action, AddMember):
        return result
    if _same_target(row[_ADDR], int(row[_PORT]), action.address, action.port):
        return ActionResult(action, True, "already present")
    return ActionResult(action, False, f"{result.message} (at {row[_ADDR]}:{row[_PORT]})")


class BackendReads:
    """The reads of one HAProxy's backends, batched: one round trip for every pool asking at once.

    Pools reconciling at the same moment each need `show servers state` and `show stat` of
    their backend. A read asked for while another is in flight waits for the next batch, which
    is sent only after it was asked for: so an answer is never older than the asker's own last
    write (level-triggered reconciles read after they applied). Pools of one backend share its
    answer; each keeps only its own servers (by name prefix).
    """

    def __init__(self, client: HAProxyClient) -> None:
        self.client = client
        self._next: dict[str, asyncio.Future[tuple[str, str]]] = {}  # backend -> its answer in the next batch
        self._stats: set[str] = set()  # the backends of the next batch whose `show stat` someone wants
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0  # round trips sent (for tests and benchmarks)

    async def read(self, backend: str, *, stat: bool = True) -> tuple[str, str]:
        """(`show servers state <backend>`, `show stat <backend> 4 -1`), from a batch sent after this call.

        With stat=False the second may be "" (not asked for, unless another asker of the batch wants it).
        """
        if stat:
            self._stats.add(backend)
        future = self._next.get(backend)
        if future is None:
            future = self._next[backend] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieved)
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send())
        return await asyncio.shield(future)  # one asker cancelled does not cancel the others' read

    async def _send(self) -> None:
        try:
            await asyncio.sleep(0)  # the workers that are ready to run ask within this turn of the loop
            while self._next:
                batch, self._next = self._next, {}
                stats, self._stats = self._stats, set()
                commands = [c for backend in batch for c in (
                    f"show servers state {backend}", *([f"show stat {backend} 4 -1"] if backend in stats else []))]
                self.batches += 1
                try:
                    answers = await self.client.execute(commands)
                except Exception as exc:  # every asker of the batch sees the failure it would have had
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException:
                    for future in (*batch.values(), *self._next.values()):
                        future.cancel()
                    self._next, self._stats = {}, set()
                    raise
                at = iter(answers)
                for backend, future in batch.items():
                    state, stat = next(at), next(at) if backend in stats else ""
                    if not future.done():
                        future.set_result((state, stat))
        finally:
            self._sender = None


def _retrieved(future: asyncio.Future[tuple[str, str]]) -> None:
    """Every asker may have been cancelled: a failed read is then dropped quietly."""
    if not future.cancelled():
        future.exception()


_READS: weakref.WeakKeyDictionary[HAProxyClient, BackendReads] = weakref.WeakKeyDictionary()


def backend_reads(client: HAProxyClient) -> BackendReads:
    """The batched reader of one runtime-API client (one per LoadBalancer), made on first use."""
    reads = _READS.get(client)
    if reads is None:
        reads = _READS[client] = BackendReads(client)
    return reads


class HAProxyPool:
    """Backend protocol for the servers of one pool (by name prefix) in one backend section."""

    def __init__(self, client: HAProxyClient, backend: str, prefix: str,
                 health_check: HealthCheck | None, legacy_prefix: str = "") -> None:
        if not _NAME.fullmatch(backend):
            raise ValueError(f"{backend!r} is not a valid HAProxy backend name")
        if not prefix:
            raise ValueError("a pool needs a name prefix: without one it would own every server")
        self.client, self.backend, self.prefix, self.health_check = client, backend, prefix, health_check
        # servers named before 80-bit prefixes (core.naming.legacy_pool_prefix): only ever removed
        self.legacy_prefix = legacy_prefix
        # how the pool's `show stat` lines start (with legacy servers: what both prefixes start with)
        common = next((i for i, (a, b) in enumerate(zip(prefix, legacy_prefix, strict=False)) if a != b),
                      min(len(prefix), len(legacy_prefix))) if legacy_prefix else len(prefix)
        self._stat_line = f"{backend},{prefix[:common]}"

    def owns(self, name: str) -> bool:
        legacy = self.legacy_prefix
        return name.startswith(self.prefix) or bool(
            legacy and name.startswith(legacy) and _LEGACY_REST.fullmatch(name, len(legacy)))

    async def read_members(self) -> dict[str, ActualMember]:
        """Address, admin state, health and sessions of the pool's servers.

        `show servers state` has the admin and operational state; `show stat` the sessions and
        the check status as text. Both come from this HAProxy's batched reader (BackendReads):
        one round trip serves every pool of it that asks meanwhile, and is sent after this call.
        """
        state, stat = await backend_reads(self.client).read(self.backend)
        return self._members(state, stat)

    async def read_servers(self) -> Members:
        """The pool's servers from `show servers state` alone: address, port, admin state and
        weight as read_members has them, without sessions (0) or the text of checks, so only a
        server without checks has its health ("") right. What the periodic resync compares for
        a pool without health checks: half the answers to read."""
        state, _ = await backend_reads(self.client).read(self.backend, stat=False)
        return self._members(state, None)

    def _members(self, state: str, stat: str | None) -> Members:
        rows = self._own_rows(state)  # first: it tells a missing backend
        stats = self._stat_rows(stat) if stat is not None else None
        members = {}
        for name, row in rows.items():
            counters = stats.get(name) if stats is not None else _NO_COUNTERS
            if counters is None:
                continue  # deleted between the two commands
            admin_state = int(row[_ADMIN])
            health = normalise_health(
                op_state=int(row[_OP]), admin_state=admin_state,
                check_state=int(row[_CHECK_STATE]), check_health=int(row[_CHECK_HEALTH]),
                check_status=counters[1], rise=_int(counters[2]), fall=_int(counters[3]))
            members[name] = ActualMember(
                name=name, address=row[_ADDR], port=int(row[_PORT]), admin=_admin(admin_state),
                health=health, sessions=counters[0],
                weight=int(row[_UWEIGHT]))  # the weight `set server ... weight` sets
        return members

    @property
    def _show_state(self) -> str:
        return f"show servers state {self.backend}"

    def _own_rows(self, state: str) -> dict[str, list[str]]:
        """The pool's rows of `show servers state` (a version line, a `# a b c` header, rows),
        as lists in the column order of STATE_COLUMNS."""
        lines = state.splitlines()
        if not lines or lines[0] != "1" or len(lines) < 2 or not lines[1].startswith("#"):
            if "find backend" in state:
                raise BackendMissing(f"backend {self.backend!r} not found in HAProxy")
            raise HAProxyUnreachable(
                f"HAProxy at {self.client.endpoint} answered {state!r} to {self._show_state!r}")
        header = lines[1].lstrip("# ").split()
        try:
            at = [header.index(column) for column in STATE_COLUMNS]
        except ValueError:
            raise HAProxyUnreachable(f"HAProxy at {self.client.endpoint} answered {lines[1]!r}: "
                                     f"a `show servers state` without {STATE_COLUMNS}") from None
        width = max(at) + 1
        rows = {}
        for line in lines[2:]:
            fields = line.split()
            if len(fields) < width or fields[at[_BACKEND]] != self.backend or not self.owns(fields[at[_NAME_COL]]):
                continue
            rows[fields[at[_NAME_COL]]] = [fields[i] for i in at]
        return rows

    def _stat_rows(self, stat: str) -> dict[str, tuple[int, str, str, str]]:
        """(current + queued sessions, check_status, check_rise, check_fall) of the pool's servers
        in `show stat` CSV (`del` waits for both kinds of sessions). Only the pool's own lines
        are parsed: the CSV has about a hundred columns."""
        if not stat.startswith("# "):
            raise HAProxyUnreachable(f"HAProxy at {self.client.endpoint} answered {stat[:200]!r} to 'show stat'")
        header, _, body = stat[2:].partition("\n")
        columns = header.split(",")
        try:
            px, sv, scur, qcur, status, rise, fall = (columns.index(c) for c in STAT_COLUMNS)
        except ValueError:
            raise HAProxyUnreachable(f"HAProxy at {self.client.endpoint} answered a `show stat` without "
                                     f"{STAT_COLUMNS}") from None
        ours = [line for line in body.split("\n") if line.startswith(self._stat_line)]
        out = {}
        for fields in csv.reader(ours):  # quoted fields (check descriptions) may hold commas
            if len(fields) == len(columns) and fields[px] == self.backend and self.owns(fields[sv]):
                out[fields[sv]] = (_int(fields[scur]) + _int(fields[qcur]), fields[status], fields[rise], fields[fall])
        return out

    async def apply(self, actions: Sequence[Action]) -> list[ActionResult]:
        """All actions in one round trip, in order; each result is judged on its own answers."""
        results, _ = await self._apply(actions, read=False)
        return results

    async def apply_and_read(self, actions: Sequence[Action]) -> tuple[list[ActionResult], Members | None]:
        """`apply`, with the pool's servers read in the same round trip after the actions: a drain's
        sessions are known without another one. The read is None when it cannot be taken as what
        the actions left (a second round trip was needed, or the answers did not parse)."""
        return await self._apply(actions, read=True)

    async def _apply(self, actions: Sequence[Action], read: bool) -> tuple[list[ActionResult], Members | None]:
        commands: list[str] = []
        spans: list[tuple[Action, int, int] | ActionResult] = []
        for action in actions:
            try:
                these = self._commands(action)
            except ValueError as exc:
                spans.append(ActionResult(action, False, f"not sent to HAProxy: {exc}"))
                continue
            spans.append((action, len(commands), len(commands) + len(these)))
            commands.extend(these)
        reads = [self._show_state, f"show stat {self.backend} 4 -1"] if read else []
        answers = await self.client.execute([*commands, *reads])
        results = [span if isinstance(span, ActionResult) else _result(span[0], answers[span[1]:span[2]])
                   for span in spans]
        settled = await self._second_round(results)
        if not read or settled is not results:
            return settled, None
        try:
            return settled, self._members(answers[-2], answers[-1])
        except (BackendMissing, HAProxyUnreachable):
            return settled, None  # the next reconcile reads, and says what is wrong

    async def _second_round(self, results: list[ActionResult]) -> list[ActionResult]:
        """One more round trip, only when an answer calls for it.

        - `del server` refused while HAProxy was still closing the idle connections that the
          drain -> maint flip released (they go on another thread, within a millisecond): ask again.
        - `add server` refused for its id (another name hashed alike): sent again without one.
        - `add server` of a name that exists: done if it has the same address, so re-sending a
          batch after a lost connection, or applying a plan twice, stays harmless.
        A SetAdmin that followed a refused add in the batch was answered "No such server." or
        set the server that already existed, as before ids were given.
        """
        busy = [i for i, r in enumerate(results) if isinstance(r.action, RemoveMember) and r.message == _BUSY]
        again = [i for i, r in enumerate(results) if isinstance(r.action, AddMember) and _ID_USED.match(r.message)]
        settle = bool(again) or any(_clashed(r) for r in results)  # sent again, an add may find its name taken
        if not busy and not settle:
            return results
        sends = [(i, [f"del server {self.backend}/{results[i].action.name}"]) for i in busy]
        sends += [(i, self._commands(results[i].action, with_id=False)) for i in again]
        follow = {i + 1 for i in again if i + 1 < len(results) and _sets_after_add(results[i], results[i + 1])}
        sends += [(i, self._commands(results[i].action)) for i in sorted(follow)]
        commands = [c for _, these in sends for c in these]
        answers = await self.client.execute([*commands, *([self._show_state] if settle else [])])
        settled = list(results)
        at = 0
        for i, these in sends:
            settled[i] = _result(results[i].action, answers[at:at + len(these)])
            at += len(these)
        if not settle:
            return settled
        rows = self._own_rows(answers[-1])
        return [_settle_add(r, rows.get(r.action.name)) if _clashed(r) else r for r in settled]

    def _commands(self, action: Action, *, with_id: bool = True) -> list[str]:
        server = self._server(action.name)
        match action:
            case AddMember():
                add = f"add server {server} {_target(action.address, action.port)}"
                if action.weight is not None:
                    add += f" weight {_weight(action.weight)}"
                if with_id:
                    add += f" id {server_id(action.name)}"
                check = self.health_check
                if check is None:
                    return [f"{add} {_POOLING}"]
                # Checks on, still in MAINT: the SetAdmin that follows decides. initialState
                # Checking drains until UP, so no request reaches a target before its first check
                # has passed; Up puts it in rotation and marks it healthy (SetAdmin.mark_up).
                checks = f"check inter {check.interval_seconds}s rise {check.rise} fall {check.fall}"
                return [f"{add} {checks} {_POOLING}", f"enable health {server}"]
            case SetAdmin():
                state = f"set server {server} state {action.admin.value}"
                # After leaving MAINT, HAProxy 2.6 counts a checked server up but one failed check
                # from down (health = rise), and resets any health set before: so `health up`
                # comes second, and lifts it to rise + fall - 1 (3.x `init-state fully-up`).
                return [state, f"set server {server} health up"] if action.mark_up else [state]
            case SetWeight():
                return [f"set server {server} weight {_weight(action.weight)}"]
            case RemoveMember():
                # Entering MAINT closes the server's idle keep-alive connections, which `del` counts
                # as attached. Connections that went idle while it already was in MAINT (a request
                # that finished after a refused del) stay forever, so every attempt flips
                # drain -> maint: no new traffic in either state, idle connections closed each time.
                cut = [f"shutdown sessions server {server}"] if action.force else []
                return [f"set server {server} state drain", f"set server {server} state maint", *cut,
                        f"del server {server}"]
        raise ValueError(f"unknown action {action!r}")

    def _server(self, name: str) -> str:
        if not self.owns(name):
            raise ValueError(f"server {name!r} does not belong to this pool (prefix {self.prefix!r})")
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid HAProxy server name")
        return f"{self.backend}/{name}"
