"""core/shards.py: pools to shards by rendezvous hashing, and how many shards a replica holds."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

from poolkeeper.core.claims import endpointslice_claim, haproxy_claim
from poolkeeper.core.shards import (
    LeaseView,
    lease_name,
    load_balancer_shard_key,
    plan_round,
    pool_shard_key,
    preference,
    shard_of,
    share,
)

KEYS = [pool_shard_key(None, f"ns-{i % 100}", f"pool-{i}") for i in range(10_000)]


def test_a_key_always_lands_on_the_same_shard_in_range() -> None:
    for shards in (1, 2, 3, 4, 7, 16, 64):
        first = [shard_of(k, shards) for k in KEYS[:2000]]
        shard_of.cache_clear()  # computed again, not remembered
        assert [shard_of(k, shards) for k in KEYS[:2000]] == first
        assert all(0 <= s < shards for s in first)
    assert {shard_of(k, 1) for k in KEYS} == {0}


@pytest.mark.parametrize("shards", [2, 3, 4, 5, 8, 16, 32])
def test_keys_spread_evenly_over_the_shards(shards: int) -> None:
    counts = Counter(shard_of(k, shards) for k in KEYS)
    mean = len(KEYS) / shards
    assert set(counts) == set(range(shards))
    assert max(abs(c - mean) for c in counts.values()) < 0.15 * mean, counts


@pytest.mark.parametrize("shards", range(1, 33))
def test_one_more_shard_moves_only_keys_onto_it_and_about_their_share(shards: int) -> None:
    before = {k: shard_of(k, shards) for k in KEYS}
    after = {k: shard_of(k, shards + 1) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == shards for k in moved)  # nothing moves between the old shards
    expected = len(KEYS) / (shards + 1)
    assert abs(len(moved) - expected) < 0.15 * expected + 30


def test_one_shard_less_moves_only_the_keys_of_the_shard_that_went() -> None:
    for shards in range(2, 17):
        before = {k: shard_of(k, shards) for k in KEYS}
        for k in KEYS:
            if before[k] != shards - 1:
                assert shard_of(k, shards - 1) == before[k]


def test_pools_wanting_one_backend_share_a_shard_whatever_their_names() -> None:
    claim = haproxy_claim("unix:///run/haproxy//admin.sock", "web")
    same = haproxy_claim("unix:///run/haproxy/admin.sock", "web")
    for shards in (2, 4, 16):
        shard = shard_of(pool_shard_key(claim, "a", "first"), shards)
        assert shard_of(pool_shard_key(same, "b", "second"), shards) == shard
    assert pool_shard_key(claim, "a", "x") != pool_shard_key(haproxy_claim("unix:///run/haproxy/admin.sock", "api"),
                                                             "a", "x")
    # no claim key: by namespace/name, which never collides with a claim's key
    assert pool_shard_key(None, "a", "x") != pool_shard_key(None, "a", "y")
    assert pool_shard_key(None, "EndpointSlice", "a") != pool_shard_key(endpointslice_claim("a", ""), "x", "y")
    assert load_balancer_shard_key("x") not in {pool_shard_key(None, "", "x"), pool_shard_key(None, "x", "")}


def test_the_shard_count_must_be_positive() -> None:
    with pytest.raises(ValueError):
        shard_of("k", 0)
    with pytest.raises(ValueError):
        share(0, 1)


def test_share_is_the_ceiling_so_live_replicas_cover_every_shard() -> None:
    for shards in range(1, 65):
        for replicas in range(1, 65):
            n = share(shards, replicas)
            assert n * replicas >= shards  # together they can hold all of them
            assert (n - 1) * replicas < shards  # and none aims at more than it must
        assert share(shards, 0) == shards  # nobody counted (not even itself): hold everything


def test_one_shard_keeps_the_single_lease_name() -> None:
    assert lease_name("poolkeeper", 0, 1) == "poolkeeper"
    assert [lease_name("poolkeeper", i, 3) for i in range(3)] == [
        "poolkeeper-shard-0", "poolkeeper-shard-1", "poolkeeper-shard-2"]


def test_preference_is_a_permutation_that_differs_between_replicas() -> None:
    orders = {tuple(preference(f"replica-{i}", 8)) for i in range(20)}
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len(orders) > 10
    assert preference("a", 8) == preference("a", 8)


def view(shard: int, *, mine: bool = False, free: bool = False, expired: bool = False,
         held_for: float = 100.0) -> LeaseView:
    return LeaseView(shard, mine=mine, free=free, expired=expired, held_for=held_for)


def test_a_lone_replica_takes_every_free_shard() -> None:
    plan = plan_round([view(i, free=True) for i in range(4)], target=4, grace=15, order=[2, 0, 3, 1])
    assert plan.acquire == (2, 0, 3, 1) and plan.renew == () and plan.release == ()


def test_free_shards_are_taken_only_up_to_the_share() -> None:
    views = [view(0, mine=True), view(1, free=True), view(2, free=True), view(3)]
    plan = plan_round(views, target=2, grace=15, order=[3, 2, 1, 0])
    assert plan.renew == (0,) and plan.acquire == (2,) and plan.release == ()


def test_surplus_goes_least_preferred_first_and_only_after_the_grace() -> None:
    views = [view(i, mine=True) for i in range(4)]
    plan = plan_round(views, target=2, grace=15, order=[1, 3, 0, 2])
    assert plan.release == (0, 2) and set(plan.renew) == {1, 3} and plan.acquire == ()
    young = [view(i, mine=True, held_for=3.0 if i in (0, 2) else 100.0) for i in range(4)]
    plan = plan_round(young, target=2, grace=15, order=[1, 3, 0, 2])
    assert plan.release == () and set(plan.renew) == {0, 1, 2, 3}  # just taken over: kept a while


def test_expired_shards_are_taken_whatever_the_share() -> None:
    views = [view(0, mine=True), view(1, mine=True), view(2, expired=True), view(3, expired=True, free=True)]
    plan = plan_round(views, target=2, grace=15, order=[0, 1, 2, 3])
    assert plan.acquire == (2, 3) and set(plan.renew) == {0, 1}
    held = [view(0, mine=True), view(1), view(2), view(3)]  # others hold 1-3, alive
    assert plan_round(held, target=4, grace=15, order=[0, 1, 2, 3]).acquire == ()


# ----- the arithmetic over many rounds: a model of the Leases (not of the API server)
@dataclass
class Model:
    """Shard Leases with a holder each and the round they last changed; replicas with an order."""

    shards: int
    duration: int = 8  # rounds a Lease must stay unchanged before it counts as expired
    holder: dict[int, str | None] = field(default_factory=dict)
    changed: dict[int, int] = field(default_factory=dict)
    since: dict[tuple[str, int], int] = field(default_factory=dict)
    now: int = 0

    def step(self, live: list[str]) -> None:
        """One round: each live replica renews, releases and acquires in turn (a race, in order)."""
        self.now += 1
        for name in live:
            target = share(self.shards, len(live))
            views = [LeaseView(s, mine=self.holder.get(s) == name, free=self.holder.get(s) is None,
                               expired=self.now - self.changed.get(s, 0) >= self.duration,
                               held_for=self.now - self.since.get((name, s), self.now))
                     for s in range(self.shards)]
            plan = plan_round(views, target=target, grace=self.duration, order=preference(name, self.shards))
            for s in plan.release:
                self.holder[s], self.changed[s] = None, self.now
            for s in (*plan.renew, *plan.acquire):
                if self.holder.get(s) != name:
                    self.since[(name, s)] = self.now
                self.holder[s], self.changed[s] = name, self.now

    def held(self, name: str) -> int:
        return sum(1 for h in self.holder.values() if h == name)


@pytest.mark.parametrize("shards", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("replicas", [1, 2, 3, 5])
def test_replicas_settle_on_their_share_and_take_over_from_a_dead_one(shards: int, replicas: int) -> None:
    model = Model(shards)
    live = [f"r{i}" for i in range(replicas)]
    model.step(live[:1])  # the first starts alone and takes everything
    assert model.held("r0") == shards
    for _ in range(4 * model.duration):
        model.step(live)
    assert all(model.holder.get(s) in live for s in range(shards))
    assert all(model.held(r) <= share(shards, replicas) for r in live)
    if replicas == 1:
        return
    dead, live = live[0], live[1:]
    rounds = 0
    while not all(model.holder.get(s) in live for s in range(shards)):
        model.step(live)
        rounds += 1
        assert rounds <= model.duration + 1  # the dead one's shards: taken once its Leases expired
    for _ in range(4 * model.duration):
        model.step(live)
    assert all(model.holder.get(s) in live for s in range(shards))
    assert all(model.held(r) <= share(shards, len(live)) for r in live), dead
