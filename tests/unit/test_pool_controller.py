"""PoolController's recipe without a cluster: fake backends, status and Event sinks, LoadBalancers.

Day-2 rules proved step by step: a pool moved to another backend fills the new one first and
empties the old one after (also across a restart, from status.placements); a port change
replaces members beside the old ones; a pool's own servers always leave before its finalizer.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from poolkeeper.backends import ActionResult
from poolkeeper.controller.pools import FINALIZER, FOLLOW_UP_SECONDS, Outcome, PoolController
from poolkeeper.controller.store import Store
from poolkeeper.core.model import (
    Action,
    ActualMember,
    AddMember,
    Admin,
    InstanceState,
    Phase,
    RemoveMember,
    SetAdmin,
    SetWeight,
)
from poolkeeper.core.poolspec import LoadBalancerSpec, parse_load_balancer
from poolkeeper.core.selectors import LabelSelector
from poolkeeper.core.tenancy import NodeSourcePolicy
from poolkeeper.kube.status import StatusBody

NS = "shop"


@dataclass
class FakeHAProxy:
    """The servers of every backend section of one HAProxy: (backend, name) -> member."""

    servers: dict[tuple[str, str], ActualMember] = field(default_factory=dict)
    health: str = "UP"  # what checks say of a server once it is added with checks on
    log: list[tuple[str, Action]] = field(default_factory=list)
    reads: int = 0  # read_members calls
    reads_with_apply: int = 0  # apply_and_read calls

    def in_backend(self, backend: str) -> dict[str, ActualMember]:
        return {n: m for (b, n), m in self.servers.items() if b == backend}


class FakePool:
    """The Backend protocol over FakeHAProxy, owning names by prefix like HAProxyPool."""

    def __init__(self, lb: FakeHAProxy, backend: str, prefix: str, check: Any, legacy_prefix: str = "") -> None:
        self.lb, self.backend, self.prefix, self.check = lb, backend, prefix, check

    async def read_members(self) -> dict[str, ActualMember]:
        self.lb.reads += 1
        return {n: m for n, m in self.lb.in_backend(self.backend).items() if n.startswith(self.prefix)}

    async def read_servers(self) -> dict[str, ActualMember]:
        """HAProxyPool's `show servers state` alone: no sessions, no check results."""
        return {n: replace(m, sessions=0) for n, m in (await self.read_members()).items()}

    async def apply_and_read(self, actions: Sequence[Action]) -> tuple[list[ActionResult], dict[str, ActualMember]]:
        """HAProxyPool's: the actions, then the pool's servers as they left them, in one round trip."""
        results = await self.apply(actions)
        self.lb.reads_with_apply += 1
        return results, {n: m for n, m in self.lb.in_backend(self.backend).items() if n.startswith(self.prefix)}

    async def apply(self, actions: Sequence[Action]) -> list[ActionResult]:
        out = []
        for action in actions:
            assert action.name.startswith(self.prefix), "a pool touched a server it does not own"
            key = (self.backend, action.name)
            self.lb.log.append((self.backend, action))
            if isinstance(action, SetAdmin | SetWeight) and key not in self.lb.servers:
                out.append(ActionResult(action, False, "No such server."))  # as HAProxy answers
                continue
            if isinstance(action, AddMember):
                health = self.lb.health if self.check else ""
                self.lb.servers[key] = ActualMember(action.name, action.address, action.port, Admin.MAINT, health, 0,
                                                    action.weight)
            elif isinstance(action, SetAdmin):
                self.lb.servers[key] = replace(self.lb.servers[key], admin=action.admin)
            elif isinstance(action, SetWeight):
                self.lb.servers[key] = replace(self.lb.servers[key], weight=action.weight)
            elif isinstance(action, RemoveMember):
                have = self.lb.servers.get(key)
                if have is not None and have.sessions and not action.force:
                    out.append(ActionResult(action, False, "Server still has connections attached to it"))
                    continue
                self.lb.servers.pop(key, None)
            out.append(ActionResult(action, True))
        return out


class FakeLoadBalancers:
    def __init__(self) -> None:
        self.specs: dict[str, LoadBalancerSpec] = {}
        self.clients: dict[str, FakeHAProxy] = {}
        self.retired: dict[str, FakeHAProxy] = {}
        self.generations: dict[str, int] = {}  # LoadBalancers.generation: moved by a restart or lost connection

    def generation(self, name: str) -> int:
        return self.generations.get(name, 0) if name in self.specs else -1

    def add(self, name: str, backends: Sequence[str], **spec: Any) -> FakeHAProxy:
        self.specs[name] = parse_load_balancer({"metadata": {"name": name}, "spec": {
            "type": "HAProxy", "allowedTargetCIDRs": ["10.0.0.0/8"], **spec,
            "haproxy": {"endpoint": f"{name}:9999", "backends": [{"name": b} for b in backends]}}})
        return self.clients.setdefault(name, FakeHAProxy())

    def delete(self, name: str) -> None:
        self.specs.pop(name)
        self.retired[name] = self.clients.pop(name)

    def get(self, name: str) -> tuple[LoadBalancerSpec, FakeHAProxy] | None:
        return (self.specs[name], self.clients[name]) if name in self.specs else None

    def client_for_cleanup(self, name: str) -> FakeHAProxy | None:
        return self.clients.get(name) or self.retired.get(name)

    def invalid(self, name: str) -> str | None:
        return None


class Sinks:
    """Status writes, Events, API patches and readiness-gate syncs, recorded."""

    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []
        self.patches: list[Any] = []
        self.gates: dict[str, str] = {}  # pod ref -> the member state its readiness gate follows

    def submit(self, path: str, status: StatusBody, observed: Any = None) -> None:
        self.statuses.append(status() if callable(status) else status)

    def post(self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append((reason, message))

    async def patch(self, path: str, body: Any, content_type: str = "") -> dict[str, Any]:
        self.patches.append(body)
        return {}

    async def sync(self, pool: str, pods: Any, reports: Any, release: bool = False) -> None:
        for pod in pods:
            self.gates[pod.ref] = "released" if release else reports[pod.ref].state.value

    async def flush(self) -> None:
        return None

    @property
    def status(self) -> dict[str, Any]:
        return self.statuses[-1]


def pool_body(backend: dict[str, Any], *, port: int = 8080, delay: int = 30, uid: str = "pool-uid",
              name: str = "web", created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"metadata": {"namespace": NS, "name": name, "uid": uid, "generation": 1, "resourceVersion": "1",
                         "creationTimestamp": created, "finalizers": [FINALIZER]},
            "spec": {"source": {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}}, "port": port,
                     "deregistrationDelaySeconds": delay, "backend": backend}}


def haproxy(lb: str, backend: str, check: bool = False, initial: str = "Checking") -> dict[str, Any]:
    extra = {"healthCheck": {"intervalSeconds": 1, "rise": 1, "fall": 1, "initialState": initial}} if check else {}
    return {"type": "HAProxy", "haproxy": {"loadBalancerRef": {"name": lb}, "backend": backend, **extra}}


class World:
    """A store with pods, fake LoadBalancers, and a PoolController over them."""

    def __init__(self) -> None:
        self.store = Store()
        self.store.namespace_labels[NS] = {}
        self.lbs = FakeLoadBalancers()
        self.sinks = Sinks()
        self.now = 1000.0
        self.controller = self.new_controller()

    def new_controller(self) -> PoolController:
        """A fresh controller: what a restarted operator has (nothing in memory)."""
        s = self.sinks
        c = PoolController(self.store, s, s, s, self.lbs, s, clock=lambda: self.now)  # type: ignore[arg-type]
        c.haproxy_pool = FakePool
        self.controller = c
        return c

    def pods(self, count: int, gate: str = "") -> None:
        """`gate`: the status of the pods' readiness gate of pool `web` ("" for no gate)."""
        for i in range(count):
            gates = {"poolkeeper.dev/web": gate} if gate else {}
            self.store.put_instance(InstanceState("Pod", NS, f"web-{i}", f"uid-{i}", f"10.0.0.{i + 1}",
                                                  {"app": "web"}, Phase.UP, "pod ready", gates))

    def put_pool(self, body: dict[str, Any], version: str) -> None:
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = version
        if self.sinks.statuses:
            body["status"] = copy.deepcopy(self.sinks.status)  # our status write came back
        self.store.pools[(NS, body["metadata"]["name"])] = body
        self.controller.invalidate_claims()

    def reconcile(self, name: str = "web") -> Outcome:
        return asyncio.run(self.controller.reconcile((NS, name)))

    def settle(self, name: str = "web", rounds: int = 20) -> Outcome:
        """Reconcile until nothing is due sooner than a resync (or `rounds` ran out)."""
        outcome = Outcome()
        for _ in range(rounds):
            outcome = self.reconcile(name)
            self.now += 1
            if outcome.after is None or outcome.after >= 30:
                break
        return outcome


def admins(lb: FakeHAProxy, backend: str) -> dict[str, Admin]:
    return {n: m.admin for n, m in lb.in_backend(backend).items()}


def placements(world: World) -> list[dict[str, str]]:
    return list(world.sinks.status["placements"])


@pytest.fixture()
def world() -> World:
    return World()


def test_a_moved_pool_fills_the_new_backend_first_then_empties_the_old(world: World) -> None:
    lb = world.lbs.add("edge", ["b1", "b2"])
    world.pods(3)
    body = pool_body(haproxy("edge", "b1", check=True))
    world.put_pool(body, "1")
    world.settle()
    assert set(admins(lb, "b1").values()) == {Admin.READY} and len(admins(lb, "b1")) == 3
    assert placements(world) == [{"type": "HAProxy", "loadBalancer": "edge", "backend": "b1"}]

    lb.health = "CHECKING"  # the new servers have not passed a check yet
    world.put_pool(pool_body(haproxy("edge", "b2", check=True)), "2")
    world.reconcile()
    assert set(admins(lb, "b2").values()) == {Admin.DRAIN}, "new servers wait for their checks"
    assert set(admins(lb, "b1").values()) == {Admin.READY}, "the old backend serves until the new one does"
    assert {p["backend"] for p in placements(world)} == {"b1", "b2"}

    for key, member in list(lb.servers.items()):
        lb.servers[key] = replace(member, health="UP")
    world.reconcile()
    assert set(admins(lb, "b2").values()) == {Admin.READY}
    assert set(admins(lb, "b1").values()) == {Admin.DRAIN}, "drained first, not removed"
    world.now += 1
    world.settle()
    assert admins(lb, "b1") == {} and len(admins(lb, "b2")) == 3
    assert placements(world) == [{"type": "HAProxy", "loadBalancer": "edge", "backend": "b2"}]
    assert ("Moved", "all servers removed from LoadBalancer edge, backend b1, where the pool was before") \
        in world.sinks.events
    moved_at = next(i for i, (b, _) in enumerate(lb.log) if b == "b2")
    b1_drained = next(i for i, (b, a) in enumerate(lb.log)
                      if i > moved_at and b == "b1" and a == SetAdmin(a.name, Admin.DRAIN))
    ready_b2 = {a.name for b, a in lb.log[:b1_drained] if b == "b2" and a == SetAdmin(a.name, Admin.READY)}
    assert len(ready_b2) == 3, "every new server was in rotation before the first old one drained"


def test_old_servers_with_sessions_wait_for_them(world: World) -> None:
    lb = world.lbs.add("edge", ["b1", "b2"])
    world.pods(1)
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")
    world.settle()
    (name,) = admins(lb, "b1")
    lb.servers[("b1", name)] = replace(lb.servers[("b1", name)], sessions=2)
    world.put_pool(pool_body(haproxy("edge", "b2")), "2")
    world.settle(rounds=5)  # 5 s < deregistrationDelaySeconds
    assert admins(lb, "b1") == {name: Admin.DRAIN}
    lb.servers[("b1", name)] = replace(lb.servers[("b1", name)], sessions=0)
    world.settle()
    assert admins(lb, "b1") == {}


def test_a_restarted_operator_empties_the_old_backend_from_status(world: World) -> None:
    edge, other = world.lbs.add("edge", ["b1"]), world.lbs.add("other", ["b1"])
    world.pods(2)
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")
    world.settle()
    assert len(admins(edge, "b1")) == 2
    world.new_controller()  # the operator restarts; the spec changes while it is away
    world.put_pool(pool_body(haproxy("other", "b1")), "2")
    world.settle()
    assert admins(edge, "b1") == {} and len(admins(other, "b1")) == 2
    assert placements(world) == [{"type": "HAProxy", "loadBalancer": "other", "backend": "b1"}]


def test_a_port_change_keeps_every_instance_serving(world: World) -> None:
    lb = world.lbs.add("edge", ["b1"])
    world.pods(3)
    world.put_pool(pool_body(haproxy("edge", "b1", check=True)), "1")
    world.settle()
    before = dict(lb.in_backend("b1"))
    lb.health = "CHECKING"
    world.put_pool(pool_body(haproxy("edge", "b1", check=True), port=9090), "2")
    world.reconcile()
    now = lb.in_backend("b1")
    assert all(m.admin is Admin.READY for n, m in now.items() if n in before), "old servers still serve"
    assert len([m for m in now.values() if m.port == 9090]) == 3
    assert not [a for _, a in lb.log if isinstance(a, RemoveMember) and a.force], "nothing cut at once"
    for i, key in enumerate(sorted(k for k, m in lb.servers.items() if m.port == 9090)):
        lb.servers[key] = replace(lb.servers[key], health="UP")  # one successor passes its checks
        world.reconcile()
        world.now += 1
        world.reconcile()
        serving = {m.address for m in lb.in_backend("b1").values() if m.admin is Admin.READY}
        assert len(serving) == 3, f"every instance still has a server in rotation (step {i})"
    world.settle()
    assert {(m.port, m.admin) for m in lb.in_backend("b1").values()} == {(9090, Admin.READY)}
    assert len(lb.in_backend("b1")) == 3


def test_a_port_change_without_checks_replaces_beside(world: World) -> None:
    lb = world.lbs.add("edge", ["b1"])
    world.pods(2)
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")
    world.settle()
    world.put_pool(pool_body(haproxy("edge", "b1"), port=9090), "2")
    world.reconcile()
    assert len(lb.in_backend("b1")) == 4, "new servers beside the old ones"
    world.settle()
    assert {m.port for m in lb.in_backend("b1").values()} == {9090} and len(lb.in_backend("b1")) == 2
    removals = {a.reason for _, a in lb.log if isinstance(a, RemoveMember)}
    assert removals == {"address changed"}, "handlers hear no deregistration: the instance is still registered"
    # and back again: the names alternate, so the pool never needs a third
    world.put_pool(pool_body(haproxy("edge", "b1"), port=8080), "3")
    world.settle()
    assert {m.port for m in lb.in_backend("b1").values()} == {8080} and len(lb.in_backend("b1")) == 2


def delete(world: World, body: dict[str, Any], version: str) -> None:
    body = copy.deepcopy(body)
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    world.put_pool(body, version)


def finalizer_removed(world: World) -> bool:
    return any(isinstance(p, list) and p[-1].get("op") == "remove" for p in world.sinks.patches)


def test_the_finalizer_waits_for_the_pools_own_servers_everywhere(world: World) -> None:
    lb = world.lbs.add("edge", ["b1", "b2"])
    world.pods(2)
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")
    world.settle()
    lb.health = "CHECKING"
    moved = pool_body(haproxy("edge", "b2", check=True))
    world.put_pool(moved, "2")
    world.reconcile()  # b2 filled, not in rotation: b1 still serves
    name = next(iter(admins(lb, "b1")))
    lb.servers[("b1", name)] = replace(lb.servers[("b1", name)], sessions=1)
    delete(world, moved, "3")
    world.settle(rounds=5)
    assert not finalizer_removed(world), "a server with a session is still in b1"
    assert admins(lb, "b2") == {} and admins(lb, "b1") == {name: Admin.DRAIN}
    lb.servers[("b1", name)] = replace(lb.servers[("b1", name)], sessions=0)
    world.settle()
    assert finalizer_removed(world) and lb.servers == {}


def test_a_pool_whose_load_balancer_is_gone_still_removes_its_servers(world: World) -> None:
    lb = world.lbs.add("edge", ["b1"])
    world.pods(2)
    body = pool_body(haproxy("edge", "b1"))
    world.put_pool(body, "1")
    world.settle()
    world.lbs.delete("edge")
    delete(world, body, "2")
    world.settle()
    assert lb.servers == {} and finalizer_removed(world)


def test_the_older_of_two_claimants_deleted_leaves_and_the_newer_takes_over(world: World) -> None:
    lb = world.lbs.add("edge", ["b1"])
    world.pods(2)
    older = pool_body(haproxy("edge", "b1"))
    newer = pool_body(haproxy("edge", "b1"), name="web2", uid="uid-2", created="2026-01-02T00:00:00Z")
    world.put_pool(older, "1")
    world.settle()
    world.put_pool(newer, "2")
    world.settle("web2")
    assert world.sinks.status["conditions"][-1]["reason"] == "Conflict"
    delete(world, older, "3")
    world.settle()
    assert finalizer_removed(world)
    world.store.pools.pop((NS, "web"))
    world.controller.invalidate_claims()
    world.settle("web2")
    prefix = world.controller.spec((NS, "web2")).prefix  # type: ignore[union-attr]
    assert len(admins(lb, "b1")) == 2 and all(n.startswith(prefix) for n in admins(lb, "b1"))


def test_a_pool_that_becomes_not_allowed_drains_its_own_servers(world: World) -> None:
    lb = world.lbs.add("edge", ["b1"])
    world.pods(2)
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")
    world.settle()
    lb.servers[("b1", "pk-not-ours")] = ActualMember("pk-not-ours", "10.9.9.9", 80, Admin.READY)
    world.lbs.add("edge", ["b1"], allowedNamespaces={"from": "Selector",
                                                      "selector": {"matchLabels": {"team": "x"}}})
    world.controller.invalidate_claims()
    world.reconcile()
    assert {n: a for n, a in admins(lb, "b1").items() if n != "pk-not-ours"} == dict.fromkeys(
        [n for n in admins(lb, "b1") if n != "pk-not-ours"], Admin.DRAIN)
    world.now += 1
    world.settle()
    assert admins(lb, "b1") == {"pk-not-ours": Admin.READY}, "only the pool's own servers left"
    assert world.sinks.status["conditions"][-1]["reason"] == "NotAllowed"


def test_backend_failures_back_off_in_the_queue(world: World) -> None:
    world.lbs.add("edge", ["b1"])
    world.pods(1)
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")

    class Down(FakePool):
        async def read_members(self) -> dict[str, ActualMember]:
            raise OSError("connection refused")

    world.controller.haproxy_pool = Down
    assert world.reconcile() == Outcome(failed=True)
    assert world.reconcile() == Outcome(failed=True)
    assert [r for r, _ in world.sinks.events].count("BackendUnreachable") == 1, "one Event per outage"
    world.controller.haproxy_pool = FakePool
    assert not world.reconcile().failed


def test_a_node_pool_whose_namespace_loses_node_sources_drains_its_own_servers(world: World) -> None:
    lb = world.lbs.add("edge", ["b1"])
    world.controller.node_sources = NodeSourcePolicy(selector=LabelSelector.parse({"matchLabels": {"nodes": "ok"}}),
                                                     text="nodes=ok")
    world.store.namespace_labels[NS] = {"nodes": "ok"}
    world.store.put_instance(InstanceState("Node", "", "n1", "uid-n1", "10.1.0.1", {}, Phase.UP, "node ready"))
    body = pool_body(haproxy("edge", "b1"))
    body["spec"]["source"] = {"kind": "Node"}
    world.put_pool(body, "1")
    world.settle()
    assert list(admins(lb, "b1").values()) == [Admin.READY]
    world.store.namespace_labels[NS] = {}
    world.controller.invalidate_claims()
    world.settle()
    assert admins(lb, "b1") == {}
    assert world.sinks.status["conditions"][-1]["reason"] == "NodeSourceNotAllowed"


def test_readiness_gates_stay_true_while_the_pool_moves(world: World) -> None:
    lb = world.lbs.add("edge", ["b1", "b2"])
    world.pods(2, gate="True")
    world.put_pool(pool_body(haproxy("edge", "b1", check=True)), "1")
    world.settle()
    assert set(world.sinks.gates.values()) == {"Active"}
    lb.health = "CHECKING"
    world.put_pool(pool_body(haproxy("edge", "b2", check=True)), "2")
    world.reconcile()
    assert set(admins(lb, "b2").values()) == {Admin.DRAIN}
    assert set(world.sinks.gates.values()) == {"Active"}, "serving in b1: the pods stay Ready"
    assert {m["state"] for m in world.sinks.status["members"]} == {"Registering"}, "status tells the truth"


def unready(world: World, i: int, ready: bool = False) -> None:
    """Pod web-i turns unready (alive, not terminating: InstanceState.unready) or Ready again."""
    pod = world.store.get_instance("Pod", NS, f"web-{i}")
    assert pod is not None
    world.store.put_instance(replace(pod, phase=Phase.UP if ready else Phase.DOWN,
                                     reason="pod ready" if ready else "pod not ready", unready=not ready))


def test_an_unready_pod_keeps_its_checked_server_for_the_delay(world: World) -> None:
    lb = world.lbs.add("edge", ["b1"])
    world.pods(2)
    world.put_pool(pool_body(haproxy("edge", "b1", check=True), delay=30), "1")
    world.settle()
    before, flapped = dict(lb.in_backend("b1")), len(lb.log)
    unready(world, 0)
    world.settle(rounds=10)  # 10 s < deregistrationDelaySeconds, and no sessions
    name = next(n for n, m in before.items() if m.address == "10.0.0.1")
    assert admins(lb, "b1") == {name: Admin.DRAIN, **{n: Admin.READY for n in before if n != name}}
    row = next(m for m in world.sinks.status["members"] if m["instance"] == f"Pod/{NS}/web-0")
    assert row["state"] == "Draining" and row["reason"].startswith("pod not ready: out of rotation")
    assert world.sinks.status["desired"] == 1 and world.sinks.status["active"] == 1
    assert world.sinks.status["draining"] == 1
    unready(world, 0, ready=True)
    world.reconcile()
    assert set(admins(lb, "b1").values()) == {Admin.READY}
    assert not [a for _, a in lb.log[flapped:] if isinstance(a, AddMember | RemoveMember)], \
        "the same server all along"
    unready(world, 0)
    world.settle(rounds=40)
    assert name not in lb.in_backend("b1"), "unready past the delay: removed"
    assert (("b1", RemoveMember(name, "not ready for longer than the deregistration delay", force=True))
            in lb.log)


def test_an_unready_pod_leaves_a_pool_without_checks_as_before(world: World) -> None:
    lb = world.lbs.add("edge", ["b1"])
    world.pods(2)
    world.put_pool(pool_body(haproxy("edge", "b1"), delay=30), "1")
    world.settle()
    unready(world, 0)
    world.settle(rounds=3)
    assert [m.address for m in lb.in_backend("b1").values()] == ["10.0.0.2"], "removed once idle"


def resync_due(world: World, name: str = "web") -> list[tuple[str, str]]:
    return asyncio.run(world.controller.resync_due([(NS, name)]))


def test_a_settled_pool_is_only_re_read_by_the_resync_while_its_servers_stay_as_they_were(world: World) -> None:
    lb = world.lbs.add("edge", ["b1"])
    world.pods(3)
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")
    assert world.settle() == Outcome(), "in place: no timer of its own, the periodic resync looks again"
    statuses = len(world.sinks.statuses)
    (first, *_) = sorted(lb.in_backend("b1"))
    lb.servers[("b1", first)] = replace(lb.servers[("b1", first)], sessions=7)  # traffic changes nothing
    assert resync_due(world) == []
    assert len(world.sinks.statuses) == statuses, "a resync that found everything in place did nothing else"

    lb.servers[("b1", first)] = replace(lb.servers[("b1", first)], admin=Admin.MAINT)  # someone else's change
    assert resync_due(world) == [(NS, "web")]
    world.settle()
    assert set(admins(lb, "b1").values()) == {Admin.READY}, "the reconcile the resync asked for repaired it"
    assert resync_due(world) == []


def test_a_settled_pool_is_reconciled_in_full_every_so_often_and_after_any_change(world: World) -> None:
    from poolkeeper.controller.pools import FULL_RESYNC_EVERY

    world.lbs.add("edge", ["b1"])
    world.pods(2)
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")
    world.settle()
    assert [resync_due(world) for _ in range(FULL_RESYNC_EVERY)] == [[]] * (FULL_RESYNC_EVERY - 1) + [[(NS, "web")]]
    world.settle()
    assert resync_due(world) == []
    world.put_pool(pool_body(haproxy("edge", "b1"), port=9090), "2")  # a changed spec: never taken as settled
    assert resync_due(world) == [(NS, "web")]
    world.reconcile()  # the port change starts (new servers beside the old): not settled until done
    assert resync_due(world) == [(NS, "web")]
    world.settle()
    assert resync_due(world) == []
    world.lbs.delete("edge")
    assert resync_due(world) == [(NS, "web")]


def test_a_pool_whose_readiness_gates_disagree_is_not_settled(world: World) -> None:
    world.lbs.add("edge", ["b1"])
    world.pods(2, gate="False")  # the gate writes are recorded by the sinks, the pods still show False
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")
    world.settle()
    assert resync_due(world) == [(NS, "web")], "a gate write that did not arrive is retried by the resync"


def flip(world: World, index: int, phase: Phase) -> None:
    pod = world.store.get_instance("Pod", NS, f"web-{index}")
    assert pod is not None
    world.store.put_instance(replace(pod, phase=phase, reason=f"pod {phase.value}", unready=phase is Phase.DOWN))


def settled_pool(world: World, pods: int) -> FakeHAProxy:
    """`pods` pods in pool `web` on LoadBalancer edge, backend b1 (no checks), reconciled until settled."""
    lb = world.lbs.add("edge", ["b1"])
    world.pods(pods)
    world.put_pool(pool_body(haproxy("edge", "b1")), "1")
    world.settle()
    return lb


def test_a_settled_pool_plans_an_instance_event_from_the_servers_it_left_without_reading_haproxy(
        world: World) -> None:
    lb = settled_pool(world, 3)
    reads = lb.reads
    flip(world, 0, Phase.DOWN)
    world.reconcile()
    assert lb.reads == reads, "the event was planned from the view the last reconcile left"
    assert sorted(admins(lb, "b1").values()) == [Admin.READY, Admin.READY], \
        "drained, read idle in the same round trip, and removed by the same reconcile"
    flip(world, 0, Phase.UP)
    world.settle()
    assert set(admins(lb, "b1").values()) == {Admin.READY}


def test_a_drained_server_read_idle_after_its_drain_is_removed_by_the_same_reconcile(world: World) -> None:
    lb = settled_pool(world, 3)
    busy = next(k for k, m in lb.servers.items() if m.address == "10.0.0.1")  # pod web-0's server
    lb.servers[busy] = replace(lb.servers[busy], sessions=2)
    flip(world, 0, Phase.DOWN)
    outcome = world.reconcile()
    assert admins(lb, "b1")[busy[1]] is Admin.DRAIN, "sessions in flight: drained, not removed"
    assert outcome.after is not None and outcome.after > FOLLOW_UP_SECONDS, "it waits for them"
    removals = [a for _, a in lb.log if isinstance(a, RemoveMember)]
    assert removals == []
    lb.servers[busy] = replace(lb.servers[busy], sessions=0)
    world.reconcile()
    assert busy not in lb.servers


def test_removals_after_a_drain_that_fail_are_left_to_the_follow_up(world: World) -> None:
    lb = settled_pool(world, 2)

    class RemovalsFail(FakePool):
        async def apply(self, actions: Sequence[Action]) -> list[ActionResult]:
            if actions and all(isinstance(a, RemoveMember) for a in actions):
                raise OSError("connection reset")
            return await super().apply(actions)

    world.controller.haproxy_pool = RemovalsFail
    flip(world, 0, Phase.DOWN)
    assert world.reconcile() == Outcome(FOLLOW_UP_SECONDS), "not a failure: the next step is simply due"
    assert sorted(admins(lb, "b1").values()) == [Admin.DRAIN, Admin.READY]
    world.controller.haproxy_pool = FakePool
    world.reconcile()
    assert sorted(admins(lb, "b1").values()) == [Admin.READY]


def test_the_view_is_not_used_after_a_haproxy_restart_with_checks_or_after_a_resync_found_a_change(
        world: World) -> None:
    lb = settled_pool(world, 2)

    world.lbs.generations["edge"] = 1  # a new HAProxy process: its runtime servers are gone
    lb.servers.clear()
    reads = lb.reads
    world.settle()
    assert lb.reads > reads and len(admins(lb, "b1")) == 2, "read, and every server put back"

    (first, *_) = sorted(lb.in_backend("b1"))
    lb.servers[("b1", first)] = replace(lb.servers[("b1", first)], admin=Admin.MAINT)  # someone else's change
    assert resync_due(world) == [(NS, "web")]
    world.reconcile()
    assert set(admins(lb, "b1").values()) == {Admin.READY}, "the resync's reconcile read HAProxy and repaired it"

    world.put_pool(pool_body(haproxy("edge", "b1", check=True)), "2")
    world.settle()
    reads = lb.reads
    flip(world, 1, Phase.DOWN)
    world.reconcile()
    assert lb.reads == reads + 1, "checks change a server's health on their own: always read"


def checked_pool(world: World, pods: int) -> FakeHAProxy:
    """Like settled_pool, with health checks whose servers enter rotation unchecked (initialState Up)."""
    lb = world.lbs.add("edge", ["b1"])
    world.pods(pods)
    world.put_pool(pool_body(haproxy("edge", "b1", check=True, initial="Up"), delay=0), "1")
    world.settle()
    return lb


def health_of(world: World) -> dict[str, str]:
    return {m["instance"]: m["health"] for m in world.sinks.status["members"]}


def test_checks_with_initial_state_up_plan_an_event_from_the_view_and_report_the_health_read_with_it(
        world: World) -> None:
    lb = checked_pool(world, 3)
    web1 = next(k for k, m in lb.servers.items() if m.address == "10.0.0.2")
    lb.servers[web1] = replace(lb.servers[web1], health="DOWN")  # checks took web-1 out, behind the operator
    reads, with_apply = lb.reads, lb.reads_with_apply
    flip(world, 0, Phase.DOWN)
    world.reconcile()
    assert lb.reads == reads, "planned from the view: the actions do not depend on health"
    assert lb.reads_with_apply == with_apply + 1, "the read rode with the drain"
    assert health_of(world)["Pod/shop/web-1"] == "DOWN", "the report has the health read after the actions"
    lb.servers[web1] = replace(lb.servers[web1], health="UP")  # it passes again
    flip(world, 0, Phase.UP)
    world.reconcile()
    assert lb.reads == reads and lb.reads_with_apply == with_apply + 2, "back: one round trip again"
    assert set(admins(lb, "b1").values()) == {Admin.READY} and len(lb.servers) == 3
    assert set(health_of(world).values()) == {"UP"}


def test_the_health_resync_re_reads_checked_settled_pools_and_finds_a_health_change(world: World) -> None:
    from poolkeeper.controller.pools import FULL_RESYNC_EVERY

    lb = checked_pool(world, 2)
    world.lbs.add("other", ["b2"])
    world.put_pool(pool_body(haproxy("other", "b2"), name="plain", uid="plain-uid"), "1")  # no checks
    world.settle("plain")
    assert world.controller.checked_and_settled() == [(NS, "web")]

    def health_due() -> list[tuple[str, str]]:
        return asyncio.run(world.controller.resync_due(world.controller.checked_and_settled(), count=False))

    assert [health_due() for _ in range(2 * FULL_RESYNC_EVERY)] == [[]] * (2 * FULL_RESYNC_EVERY), \
        "reads that find every server as it was: no reconcile, and none counted towards the full one"
    web0 = next(k for k, m in lb.servers.items() if m.address == "10.0.0.1")
    lb.servers[web0] = replace(lb.servers[web0], health="DOWN")  # checks took it out: no event says so
    assert health_due() == [(NS, "web")]
    world.reconcile()
    assert health_of(world)["Pod/shop/web-0"] == "DOWN", "status shows it after one health resync"
    assert world.controller.checked_and_settled() == [], "a member out of rotation: watched, not settled"


def test_checks_with_initial_state_up_read_when_an_event_changes_nothing_in_haproxy(world: World) -> None:
    lb = checked_pool(world, 2)
    web0 = next(k for k, m in lb.servers.items() if m.address == "10.0.0.1")
    lb.servers[web0] = replace(lb.servers[web0], health="DOWN")
    reads = lb.reads
    pod = world.store.get_instance("Pod", NS, "web-0")
    assert pod is not None
    world.store.put_instance(replace(pod, labels={**pod.labels, "tier": "front"}))  # selected still, no action
    world.reconcile()
    assert lb.reads == reads + 1, "no action to read with: the health it reports is read on its own"
    assert health_of(world)["Pod/shop/web-0"] == "DOWN"


def test_a_plan_made_on_a_view_haproxy_no_longer_matches_fails_and_is_made_again_from_a_read(
        world: World) -> None:
    lb = settled_pool(world, 2)
    lb.servers.clear()  # a new HAProxy process, not noticed yet (same generation)
    flip(world, 0, Phase.DOWN)
    assert world.reconcile().failed, "HAProxy refused a command on a server it no longer has"
    flip(world, 0, Phase.UP)
    world.settle()
    assert len(admins(lb, "b1")) == 2 and set(admins(lb, "b1").values()) == {Admin.READY}


def test_a_drain_is_read_back_in_its_own_round_trip_and_the_removal_needs_no_read(world: World) -> None:
    lb = settled_pool(world, 2)
    reads = lb.reads
    flip(world, 0, Phase.DOWN)
    world.settle()
    assert len(admins(lb, "b1")) == 1 and lb.reads_with_apply == 1
    assert lb.reads == reads, "drained and removed, read only with the drain"


def test_a_drained_server_with_sessions_is_counted_again_not_removed_from_the_view(world: World) -> None:
    lb = settled_pool(world, 1)
    ((_, name),) = lb.servers
    lb.servers[("b1", name)] = replace(lb.servers[("b1", name)], sessions=3)
    flip(world, 0, Phase.DOWN)
    world.reconcile()
    assert admins(lb, "b1") == {name: Admin.DRAIN}
    reads = lb.reads
    world.reconcile()
    assert lb.reads == reads + 1 and admins(lb, "b1") == {name: Admin.DRAIN}, "its sessions read again"
    lb.servers[("b1", name)] = replace(lb.servers[("b1", name)], sessions=0)
    world.settle()
    assert admins(lb, "b1") == {}
