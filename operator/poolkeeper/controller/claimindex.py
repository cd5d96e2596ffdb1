"""The claim index kept current one pool at a time.

Rebuilding every claim after each pool's change costs O(pools) per change, O(pools^2) while
1,000 pools are created; a pool's change can only move the winner of the claims it left or
joined, so only those groups are decided again (by the same pure rule, core.claims.build_index).
"""

from __future__ import annotations

from collections.abc import Iterable

from poolkeeper.core.claims import Claimant, ClaimIndex, ClaimKey, PoolKey, build_index


class LiveClaims:
    def __init__(self) -> None:
        self.index = build_index(())

    def reset(self, claimants: Iterable[Claimant]) -> None:
        self.index = build_index(claimants)

    def put(self, key: PoolKey, claimant: Claimant | None) -> None:
        """The pool's claimant now (None: it claims nothing, or is gone)."""
        index = self.index
        old = index.of.get(key)
        if old == claimant:
            return
        touched: set[ClaimKey] = set()
        if old is not None:
            del index.of[key]
            touched.add(old.claim)
        if claimant is not None:
            index.of[key] = claimant
            touched.add(claimant.claim)
        for claim in touched:
            group = [c for c in index.claimants.get(claim, ()) if c.key != key]
            if claimant is not None and claimant.claim == claim:
                group.append(claimant)
            self._decide(index, claim, group)

    @staticmethod
    def _decide(index: ClaimIndex, claim: ClaimKey, group: list[Claimant]) -> None:
        index.claimants.pop(claim, None)
        index.winners.pop(claim, None)
        decided = build_index(group)
        index.claimants.update(decided.claimants)
        index.winners.update(decided.winners)
