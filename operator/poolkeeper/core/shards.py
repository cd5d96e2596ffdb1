"""Sharding pools across replicas: which shard owns what, and how many shards a replica holds.

Pure functions (no I/O); controller/shards.py runs the Leases and asks these.

- A pool belongs to the shard its *claim key* hashes to (core/claims.py), so every pool that
  competes for one backend is in the same shard and the claim is decided in one process by the
  same rule as with one replica. A pool without a claim key (its LoadBalancer does not exist
  yet) hashes by namespace/name. A LoadBalancer's status is written by the shard its name
  hashes to.
- Rendezvous (highest-random-weight) hashing: a key goes to the shard with the highest
  weight(key, shard). Changing the shard count from S to S+1 moves only the keys whose new
  shard wins, about 1/(S+1) of them; replicas coming and going move whole shards, never keys.
- Each replica aims at ceil(S / live replicas) shards. Surplus is released at renewal (not
  within a lease duration of taking a shard, so a takeover never ping-pongs); shards below target
  are taken when free; a shard whose Lease went unchanged for a lease duration (its holder is
  dead, or nobody wanted it) is taken by anyone, whatever its share.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from poolkeeper.core.claims import ClaimKey


def pool_shard_key(claim: ClaimKey | None, namespace: str, name: str) -> str:
    """What a pool hashes by: its claim key, else its namespace/name."""
    if claim is not None:
        return "claim\x00" + "\x00".join(claim)
    return f"pool\x00{namespace}\x00{name}"


def load_balancer_shard_key(name: str) -> str:
    return f"loadbalancer\x00{name}"


def weight(key: str, shard: int) -> int:
    """The rendezvous weight of `key` on `shard`: 64 bits of BLAKE2b, the same in every process."""
    return int.from_bytes(hashlib.blake2b(f"{shard}\x00{key}".encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=65536)
def shard_of(key: str, shards: int) -> int:
    """The shard (0..shards-1) that owns `key`: the one with the highest weight."""
    if shards < 1:
        raise ValueError(f"the shard count must be at least 1, got {shards}")
    if shards == 1:
        return 0
    return max(range(shards), key=lambda shard: (weight(key, shard), -shard))


def share(shards: int, replicas: int) -> int:
    """How many shards one of `replicas` live replicas aims to hold: ceil(S / replicas)."""
    if shards < 1:
        raise ValueError(f"the shard count must be at least 1, got {shards}")
    return math.ceil(shards / max(1, replicas))


def preference(identity: str, shards: int) -> list[int]:
    """The order in which a replica takes free shards (and, reversed, releases them): a
    rendezvous order per replica, so two replicas starting together try different shards first."""
    return sorted(range(shards), key=lambda shard: (-weight(identity, shard), shard))


@dataclass(frozen=True, slots=True)
class LeaseView:
    """One shard's Lease as this replica sees it in one round."""

    shard: int
    mine: bool  # the Lease names this replica as holder
    free: bool  # no Lease yet, or released (no holder)
    expired: bool  # unchanged for a lease duration as this replica observed it (monotonic)
    held_for: float = 0.0  # seconds since this replica acquired it (when mine)


@dataclass(frozen=True, slots=True)
class Round:
    """What one round of the shard loop does: renew, release, try to acquire."""

    renew: tuple[int, ...]
    release: tuple[int, ...]
    acquire: tuple[int, ...]


def plan_round(views: Iterable[LeaseView], *, target: int, grace: float, order: Sequence[int]) -> Round:
    """Renew what is ours, release the surplus above `target` (least preferred first, and only
    once every shard held was held at least `grace` seconds), take expired shards always and free ones up to `target`
    (most preferred first). `order` is `preference(identity, shards)`."""
    rank = {shard: index for index, shard in enumerate(order)}
    by_rank = sorted(views, key=lambda v: rank.get(v.shard, len(rank)))
    mine = [v for v in by_rank if v.mine]
    # Nothing is released within `grace` of taking a shard: after a takeover the live count may
    # still include the dead replica, and what it releases would only come back a duration later.
    settled = all(v.held_for >= grace for v in mine)
    surplus = max(0, len(mine) - target) if settled else 0
    release = {v.shard for v in list(reversed(mine))[:surplus]}
    renew = tuple(v.shard for v in mine if v.shard not in release)
    room = target - len(renew)
    acquire: list[int] = []
    for view in by_rank:
        if not view.mine and (view.expired or (view.free and room > len(acquire))):
            acquire.append(view.shard)
    return Round(renew, tuple(sorted(release, key=lambda s: rank.get(s, 0))), tuple(acquire))


def lease_name(base: str, shard: int, shards: int) -> str:
    """One shard keeps today's Lease name (`base`), so S=1 is exactly the single-leader setup;
    with S > 1 shard i has `<base>-shard-<i>`."""
    return base if shards == 1 else f"{base}-shard-{shard}"
