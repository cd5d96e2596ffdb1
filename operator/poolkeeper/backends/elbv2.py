"""One pool's targets in one ELBv2 target group, behind the Backend protocol.

Target groups carry no per-target tags, so which targets are poolkeeper's is kept in the pool's
`status.elbv2Targets`: an entry is written before its target is registered (a crash in between
leaves an entry whose target is not there, which the next read drops), and only targets listed
there are ever deregistered. A target already in the group that is not listed is someone
else's: the member is refused, the target left alone.

The planner's admin states map onto registration: READY and DRAIN keep a target registered
(DRAIN of a healthy target deregisters it: the group drains its connections), MAINT (a blocking
hook holds the member) deregisters it but keeps it owned; RemoveMember deregisters and forgets.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from poolkeeper.aws import NOT_LEADING, AWSError
from poolkeeper.aws.elbv2_client import ELBv2Client
from poolkeeper.backends import ActionResult
from poolkeeper.backends.haproxy import BackendMissing
from poolkeeper.core.elbv2 import NOT_REGISTERED, Target, TargetHealth, member_of, ownership_refusal
from poolkeeper.core.model import Action, ActualMember, AddMember, Admin, RemoveMember, SetAdmin, SetWeight

CHECK_TTL = 60.0  # seconds a target group's type and tags stay checked
# DescribeTargetHealth is eventually consistent: a target registered this recently and not listed
# yet is still ours (taken as just registered), not forgotten.
SETTLE_SECONDS = 30.0
# the whole reconcile fails, not one action
FATAL = ("Throttled", "AWSUnreachable", "AWSSupportNotInstalled", NOT_LEADING)

Persist = Callable[[list[dict[str, Any]]], Awaitable[None]]


@dataclass
class OwnedTargets:
    """The targets one pool registered, in every target group it used (status.elbv2Targets)."""

    persist: Persist
    targets: dict[tuple[str, str, int], Target] = field(default_factory=dict)  # (arn, id, port) -> target
    parked: set[tuple[str, str]] = field(default_factory=set)  # (arn, name): owned, deregistered while held
    registered_at: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (arn, id, port) -> clock
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def from_status(cls, raw: Any, persist: Persist) -> OwnedTargets:
        owned = cls(persist)
        for item in raw if isinstance(raw, list) else []:
            fields = ("targetGroupARN", "name", "id")
            if isinstance(item, Mapping) and all(isinstance(item.get(k), str) for k in fields):
                port = item.get("port")
                if isinstance(port, int):
                    address = item.get("address") if isinstance(item.get("address"), str) else ""
                    owned.targets[(item["targetGroupARN"], item["id"], port)] = Target(
                        item["name"], item["id"], port, str(address or ""))
        return owned

    def of(self, arn: str) -> dict[str, Target]:
        return {t.name: t for (group, _, _), t in self.targets.items() if group == arn}

    def rows(self) -> list[dict[str, Any]]:
        return [{"targetGroupARN": arn, "name": t.name, "id": t.id, "port": t.port,
                 **({"address": t.address} if t.address else {})}
                for (arn, _, _), t in sorted(self.targets.items())]

    async def change(self, arn: str, add: Sequence[Target] = (), forget: Sequence[Target] = ()) -> None:
        before = self.rows()
        for t in forget:
            self.targets.pop((arn, t.id, t.port), None)
            self.registered_at.pop((arn, t.id, t.port), None)
            self.parked.discard((arn, t.name))
        for t in add:
            self.targets[(arn, t.id, t.port)] = t
        if self.rows() != before:
            await self.persist(self.rows())

    def settling(self, arn: str, target: Target) -> bool:
        """Registered so recently that DescribeTargetHealth may not list it yet."""
        at = self.registered_at.get((arn, target.id, target.port))
        return at is not None and self.clock() - at < SETTLE_SECONDS


class ELBv2Backend:
    """The pool's own targets in target group `arn`."""

    def __init__(self, client: ELBv2Client, arn: str, owned: OwnedTargets, target_type: str = "ip") -> None:
        self.client, self.arn, self.owned, self.target_type = client, arn, owned, target_type
        self._health: dict[str, TargetHealth] = {}  # by member name, from the last read

    async def read_members(self) -> dict[str, ActualMember]:
        mine = self.owned.of(self.arn)
        try:
            health = await self.client.health(self.arn, list(mine.values())) if mine else {}
        except AWSError as exc:
            if exc.reason == "TargetGroupNotFound":
                raise BackendMissing(str(exc)) from exc  # with it went every target of ours
            raise
        self._health, members, gone = {}, {}, []
        for name, target in mine.items():
            found = health.get((target.id, target.port), TargetHealth("unavailable", NOT_REGISTERED))
            if found.registered:
                self._health[name] = found
                members[name] = member_of(target, found)
            elif (self.arn, name) in self.owned.parked:
                members[name] = ActualMember(name, target.member_address, target.port, Admin.MAINT, "", 0)
            elif self.owned.settling(self.arn, target):
                members[name] = member_of(target, TargetHealth("initial"))
            else:
                gone.append(target)  # deregistration finished (or someone removed it): no longer ours
        await self.owned.change(self.arn, forget=gone)
        return members

    async def apply(self, actions: Sequence[Action]) -> list[ActionResult]:
        """All registrations in batched calls, then all deregistrations; one result per action."""
        mine = self.owned.of(self.arn)
        foreign = await self._foreign([a for a in actions if isinstance(a, AddMember)], mine)
        results: list[ActionResult | None] = [None] * len(actions)
        own: list[Target] = []
        register: dict[str, Target] = {}
        deregister: dict[str, Target] = {}
        forget: list[Target] = []
        for i, action in enumerate(actions):
            if isinstance(action, AddMember):
                if action.name in foreign:
                    results[i] = ActionResult(action, False, foreign[action.name])
                    continue
                register[action.name] = mine[action.name] = self._target(action)
                own.append(register[action.name])
                self.owned.parked.discard((self.arn, action.name))
            elif action.name not in mine:
                results[i] = ActionResult(action, True)  # nothing of ours under that name
            elif isinstance(action, SetAdmin):
                self._set_admin(action, mine[action.name], register, deregister)
            elif isinstance(action, SetWeight):  # the spec refuses weights here: never planned
                results[i] = ActionResult(action, False, "ELBv2 target groups have no weights")
            else:
                results[i] = self._remove(action, mine[action.name], register, deregister, forget)
        await self.owned.change(self.arn, add=own)  # owned before registered
        failed = {**await self._call(self.client.deregister, deregister),
                  **await self._call(self.client.register, register)}
        for target in deregister.values():
            self.owned.registered_at.pop((self.arn, target.id, target.port), None)
        for name, target in register.items():
            if name not in failed:
                self.owned.registered_at[(self.arn, target.id, target.port)] = self.owned.clock()
        kept = {(t.id, t.port) for t in own}  # e.g. an instance at a new address: the same target again
        await self.owned.change(self.arn, forget=[t for t in forget if t.name not in failed
                                                  and (t.id, t.port) not in kept])
        return [r if r is not None else ActionResult(a, a.name not in failed, failed.get(a.name, ""))
                for a, r in zip(actions, results, strict=True)]

    def _target(self, action: AddMember) -> Target:
        if self.target_type == "instance":
            ec2_id = action.instance.ec2_id if action.instance is not None else ""
            return Target(action.name, ec2_id, action.port, action.address)
        return Target(action.name, action.address, action.port)

    def _set_admin(self, action: SetAdmin, target: Target, register: dict[str, Target],
                   deregister: dict[str, Target]) -> None:
        parked = (self.arn, action.name) in self.owned.parked
        health = self._health.get(action.name)
        if action.admin is Admin.MAINT:
            register.pop(action.name, None)
            if health is not None:
                deregister[action.name] = target
            self.owned.parked.add((self.arn, action.name))
        elif parked:
            self.owned.parked.discard((self.arn, action.name))
            register[action.name] = target
        elif action.admin is Admin.DRAIN and health is not None and health.state == "healthy":
            deregister[action.name] = target  # out of rotation: the target group drains its connections

    def _remove(self, action: RemoveMember, target: Target, register: dict[str, Target],
                deregister: dict[str, Target], forget: list[Target]) -> ActionResult | None:
        health = self._health.get(action.name)
        if health is not None and health.state == "draining" and not action.force:
            return ActionResult(action, False, "the target group is still draining the target's connections")
        if register.get(action.name) == target:
            register.pop(action.name)
        if health is not None and health.state != "draining":
            deregister[action.name] = target
        forget.append(target)
        return None

    async def _foreign(self, adds: Sequence[AddMember], mine: Mapping[str, Target]) -> dict[str, str]:
        """Targets to add that are registered already but not by this pool: refused, left alone."""
        ours = {(t.id, t.port) for t in mine.values()}
        fresh = [t for t in map(self._target, adds) if (t.id, t.port) not in ours]
        health = await self.client.health(self.arn, fresh) if fresh else {}
        return {t.name: (f"target {t.id}:{t.port} is already registered in target group {self.arn} and "
                         "poolkeeper did not register it; it is left alone")
                for t in fresh if (h := health.get((t.id, t.port))) is not None and h.registered}

    async def _call(self, call: Callable[[str, Sequence[Target]], Awaitable[None]],
                    targets: Mapping[str, Target]) -> dict[str, str]:
        """Member name -> error for the targets of a failed call ({} when it worked)."""
        if not targets:
            return {}
        try:
            await call(self.arn, list(targets.values()))
        except AWSError as exc:
            if exc.reason in FATAL:
                raise
            return dict.fromkeys(targets, str(exc))
        return {}


@dataclass
class _Checked:
    at: float
    refusal: tuple[str, str] | None


class ELBv2Backends:
    """The ELBv2 backends of every pool: owned-target lists per pool and target group checks."""

    def __init__(self, write_status: Callable[[str, str, list[dict[str, Any]]], Awaitable[None]],
                 cluster_id: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.write_status, self.cluster_id, self.clock = write_status, cluster_id, clock
        self._owned: dict[str, OwnedTargets] = {}  # by pool uid
        self._checked: dict[tuple[int, str, str], _Checked] = {}

    def owned(self, namespace: str, name: str, uid: str, status: Mapping[str, Any]) -> OwnedTargets:
        found = self._owned.get(uid)
        if found is None:
            async def persist(rows: list[dict[str, Any]]) -> None:
                await self.write_status(namespace, name, rows)
            found = self._owned[uid] = OwnedTargets.from_status(status.get("elbv2Targets"), persist)
        return found

    def forget(self, uid: str) -> None:
        self._owned.pop(uid, None)

    async def refusal(self, client: ELBv2Client, arn: str, target_type: str) -> tuple[str, str] | None:
        """(reason, message) when the target group may not be driven: another controller's, or of
        another target type. Checked once a minute per client and target group."""
        key = (id(client), arn, target_type)
        cached = self._checked.get(key)
        if cached is not None and self.clock() - cached.at < CHECK_TTL:
            return cached.refusal
        kind, tags = await client.target_group(arn)
        refusal: tuple[str, str] | None = None
        why = ownership_refusal(arn, tags, self.cluster_id)
        if why is not None:
            refusal = ("TargetGroupNotOwned", why)
        elif kind != target_type:
            refusal = ("TargetTypeMismatch", f"target group {arn} has target type {kind}, the pool's "
                                             f"spec.backend.elbv2.targetType is {target_type}")
        self._checked[key] = _Checked(self.clock(), refusal)
        return refusal
