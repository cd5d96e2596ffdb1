"""Who may drive a backend: exclusive claims, keyed by what the backend really is.

An HAProxy backend is one section of one HAProxy process; two LoadBalancer objects may name
the same runtime API, so a claim is keyed by the normalized endpoint plus the backend name,
never by the LoadBalancer's name. A Service's EndpointSlices are claimed by namespace + Service.

Only eligible pools (allowed by their LoadBalancer and not being deleted) compete; the oldest
wins (creationTimestamp, then namespace/name). Pure functions: the controller feeds them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

ClaimKey = tuple[str, str, str]  # ("HAProxy", endpoint, backend) | ("EndpointSlice", namespace, service)
PoolKey = tuple[str, str]


def normalize_endpoint(endpoint: str) -> str:
    """One spelling per runtime API: unix paths normalized (//a/./b.sock == /a/b.sock), tcp hosts
    lower-cased, IP addresses in their compressed form, ports without leading zeros. Different
    names for one address (a DNS alias, a symlinked socket) are the admin's to avoid."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
        return "unix://" + posixpath.normpath("/" + path.lstrip("/"))
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        host = host.strip("[]").lower().rstrip(".")
        with contextlib.suppress(ValueError):
            host = ipaddress.ip_address(host).compressed
        with contextlib.suppress(ValueError):
            port = str(int(port))
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    return endpoint


def haproxy_claim(endpoint: str, backend: str) -> ClaimKey:
    return ("HAProxy", normalize_endpoint(endpoint), backend)


def endpointslice_claim(namespace: str, service: str) -> ClaimKey:
    return ("EndpointSlice", namespace, service)


@dataclass(frozen=True, slots=True)
class Claimant:
    key: PoolKey
    created: str  # creationTimestamp (RFC 3339 sorts as text)
    claim: ClaimKey
    eligible: bool  # allowed to drive the backend and not being deleted

    @property
    def order(self) -> tuple[str, str, str]:
        return (self.created, self.key[0], self.key[1])


@dataclass(frozen=True, slots=True)
class ClaimIndex:
    """Every claimant per claim (for requeues) and the winner per claim, built once per change."""

    claimants: dict[ClaimKey, tuple[Claimant, ...]]
    winners: dict[ClaimKey, Claimant]
    of: dict[PoolKey, Claimant]

    def winner(self, claim: ClaimKey) -> Claimant | None:
        return self.winners.get(claim)

    def others(self, claim: ClaimKey, key: PoolKey) -> list[PoolKey]:
        return [c.key for c in self.claimants.get(claim, ()) if c.key != key]


def build_index(claimants: Iterable[Claimant]) -> ClaimIndex:
    """The oldest eligible claimant wins each claim; ineligible ones never do, even if older."""
    grouped: dict[ClaimKey, list[Claimant]] = {}
    of: dict[PoolKey, Claimant] = {}
    for c in claimants:
        grouped.setdefault(c.claim, []).append(c)
        of[c.key] = c
    winners: dict[ClaimKey, Claimant] = {}
    for claim, group in grouped.items():
        group.sort(key=lambda c: c.order)
        best = next((c for c in group if c.eligible), None)
        if best is not None:
            winners[claim] = best
    return ClaimIndex({k: tuple(v) for k, v in grouped.items()}, winners, of)
