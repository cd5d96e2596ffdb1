"""Claims: who drives a backend. Pure logic, no API server."""

from __future__ import annotations

from poolkeeper.core.claims import Claimant, build_index, endpointslice_claim, haproxy_claim, normalize_endpoint
from poolkeeper.core.naming import INSTANCE_PART, instance_part, member_name, pool_prefix

BE = haproxy_claim("unix:///run/haproxy/admin.sock", "be_web")


def claimant(ns: str, name: str, created: str, claim: tuple[str, str, str] = BE, eligible: bool = True) -> Claimant:
    return Claimant((ns, name), created, claim, eligible)


def test_oldest_eligible_pool_wins_tie_by_namespace_then_name() -> None:
    old = claimant("b", "web", "2026-01-01T00:00:00Z")
    new = claimant("a", "web", "2026-02-01T00:00:00Z")
    assert build_index([new, old]).winner(BE) == old
    same_a = claimant("a", "z", "2026-01-01T00:00:00Z")
    same_b = claimant("b", "a", "2026-01-01T00:00:00Z")
    assert build_index([same_b, same_a]).winner(BE) == same_a


def test_a_refused_or_deleting_pool_never_wins_even_when_older() -> None:
    squatter = claimant("tenant", "grab", "2020-01-01T00:00:00Z", eligible=False)
    rightful = claimant("web", "web", "2026-01-01T00:00:00Z")
    index = build_index([squatter, rightful])
    assert index.winner(BE) == rightful
    assert index.others(BE, rightful.key) == [squatter.key]
    assert build_index([squatter]).winner(BE) is None


def test_claims_are_keyed_by_endpoint_and_backend_not_by_load_balancer_name() -> None:
    """Two LoadBalancer objects naming one runtime API give the same claim, however spelled."""
    assert haproxy_claim("unix:///run/haproxy//./admin.sock", "be_web") == BE
    assert haproxy_claim("tcp://HAProxy.Example:09999", "be") == haproxy_claim("tcp://haproxy.example:9999", "be")
    assert haproxy_claim("tcp://[0:0::1]:9999", "be") == haproxy_claim("tcp://[::1]:9999", "be")
    assert normalize_endpoint("tcp://10.0.0.5:9999") == "tcp://10.0.0.5:9999"
    assert haproxy_claim("tcp://10.0.0.5:9999", "be") != haproxy_claim("tcp://10.0.0.5:9998", "be")
    assert haproxy_claim("unix:///a.sock", "be") != haproxy_claim("unix:///a.sock", "be2")
    a = claimant("a", "web", "2026-01-01T00:00:00Z", haproxy_claim("unix:///run/haproxy/./admin.sock", "be_web"))
    b = claimant("b", "web", "2026-02-01T00:00:00Z", BE)
    index = build_index([b, a])
    assert index.winner(BE) == a and index.others(BE, a.key) == [b.key]


def test_endpointslice_claims_are_per_service() -> None:
    one = claimant("ns", "a", "2026-01-01T00:00:00Z", endpointslice_claim("ns", "svc"))
    other = claimant("ns", "b", "2026-01-01T00:00:00Z", endpointslice_claim("ns", "svc2"))
    index = build_index([one, other])
    assert index.winner(endpointslice_claim("ns", "svc")) == one
    assert index.winner(endpointslice_claim("ns", "svc2")) == other


def test_server_name_prefixes_are_80_bits_and_fit_haproxy() -> None:
    prefix = pool_prefix("ns", "web")
    assert prefix.startswith("pk-") and len(prefix) == len("pk-") + 20 + 1
    assert prefix != pool_prefix("ns", "web2") and prefix != pool_prefix("ns2", "web")
    name = member_name("ns", "web", "uid-1", "check:2:2:3")
    assert name.startswith(prefix) and len(name) <= 64
    assert instance_part(name) == member_name("ns", "web", "uid-1") and len(instance_part(name)) == INSTANCE_PART


def test_legacy_names_never_look_like_new_ones() -> None:
    """A pool removes servers of its old 32-bit prefix only in exactly the old format; names of the
    80-bit scheme (any pool's) never match it."""
    import re

    from poolkeeper.core.naming import LEGACY_INSTANCE, legacy_pool_prefix

    legacy = re.compile(re.escape(legacy_pool_prefix("ns", "web")) + LEGACY_INSTANCE)
    assert legacy.fullmatch(legacy_pool_prefix("ns", "web") + "0123456789ab-abcd")
    assert not legacy.fullmatch(legacy_pool_prefix("ns", "web") + "evil")
    for pool in ("web", "api", "x"):
        assert not legacy.fullmatch(member_name("ns", pool, "uid", "check:1:1:1"))
        assert not legacy.fullmatch(member_name("ns", pool, "uid"))
