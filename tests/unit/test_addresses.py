"""The one address policy (core/addresses.py): every category, v4 and v6, and allowances."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolkeeper.core.addresses import (
    ENDPOINTSLICE_ALLOWANCE,
    HTTP_ALLOWANCE,
    LB_ALLOWANCE,
    METADATA_ADDRESSES,
    SPECIAL_RANGES,
    AddressPolicy,
    parse_cidr_flag,
    parse_cidrs,
    refusal,
    source_refusal,
    special_ranges,
)
from poolkeeper.functions.http import address_refusal

# (address, category word in the refusal, the narrowest allowance that admits it)
SPECIAL = [
    ("0.0.0.0", "unspecified", "0.0.0.0/8"),
    ("0.1.2.3", "unspecified", "0.0.0.0/8"),
    ("::", "unspecified", "::/128"),
    ("127.0.0.1", "loopback", "127.0.0.0/8"),
    ("127.255.0.9", "loopback", "127.0.0.0/8"),
    ("::1", "loopback", "::1/128"),
    ("169.254.0.1", "link-local", "169.254.0.0/16"),
    ("fe80::1", "link-local", "fe80::/10"),
    ("224.0.0.1", "multicast", "224.0.0.0/4"),
    ("239.1.2.3", "multicast", "224.0.0.0/4"),
    ("ff02::1", "multicast", "ff00::/8"),
    ("255.255.255.255", "broadcast", "255.255.255.255/32"),
    ("::ffff:10.1.2.3", "IPv4-mapped", "::ffff:0:0/96"),
    ("169.254.169.254", "cloud metadata", "169.254.169.254/32"),
    ("169.254.170.2", "cloud metadata", "169.254.170.2/32"),
    ("fd00:ec2::254", "cloud metadata", "fd00:ec2::254/128"),
    ("fd20:ce::254", "cloud metadata", "fd20:ce::254/128"),
    ("100.100.100.200", "cloud metadata", "100.100.100.200/32"),
    ("168.63.129.16", "cloud metadata", "168.63.129.16/32"),
    ("192.0.0.192", "cloud metadata", "192.0.0.192/32"),
]
ORDINARY = ["10.1.2.3", "192.0.2.7", "198.51.100.1", "100.100.100.201", "168.63.129.17", "2001:db8::1",
            "fd00:ec2::255", "fd12::1", "8.8.8.8", "172.16.0.1"]
POLICIES = [(LB_ALLOWANCE, "allowedTargetCIDRs"), (ENDPOINTSLICE_ALLOWANCE, "--endpointslice-allowed-cidrs"),
            (HTTP_ALLOWANCE, "--http-allowed-cidrs")]


@pytest.mark.parametrize(("address", "category", "narrowest"), SPECIAL)
@pytest.mark.parametrize(("granted_by", "flag"), POLICIES)
def test_special_addresses_are_refused_by_default_and_by_broad_lists(
        address: str, category: str, narrowest: str, granted_by: str, flag: str) -> None:
    for allowed in (None, [], ["0.0.0.0/0", "::/0"], ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]):
        why = AddressPolicy(parse_cidrs(allowed), granted_by).refusal(address)
        assert why is not None and category in why and flag in why and address in why, (allowed, why)


@pytest.mark.parametrize(("address", "category", "narrowest"), SPECIAL)
def test_special_addresses_are_allowed_by_a_cidr_inside_their_range(address: str, category: str,
                                                                     narrowest: str) -> None:
    ip = ipaddress.ip_address(address)
    exact = f"{address}/{ip.max_prefixlen}"
    assert refusal(address, parse_cidrs([exact])) is None
    assert refusal(address, parse_cidrs(["10.0.0.0/8", exact])) is None
    blocks = [net for _, net in special_ranges(ip)]
    if all(ipaddress.ip_network(narrowest).subnet_of(b) for b in blocks):  # type: ignore[arg-type]
        assert refusal(address, parse_cidrs([narrowest])) is None
    # a list that covers the address only from outside the range does not
    wider = ipaddress.ip_network(narrowest).supernet(prefixlen_diff=1)
    assert refusal(address, [wider]) is not None


def test_loopback_allowance_examples() -> None:
    loopback = parse_cidrs(["127.0.0.0/8"])
    assert refusal("127.0.0.1", loopback) is None
    assert refusal("127.0.0.2", parse_cidrs(["127.0.0.2/32"])) is None
    assert "loopback" in str(refusal("127.0.0.3", parse_cidrs(["127.0.0.2/32"])))
    assert "outside" in str(refusal("10.0.0.1", loopback))  # a list is a list: everything else is outside
    assert "loopback" in str(refusal("::1", loopback))  # v6 loopback needs its own entry
    assert refusal("::1", parse_cidrs(["::1/128"])) is None


def test_metadata_needs_its_own_entry_even_inside_an_allowed_special_range() -> None:
    link_local = parse_cidrs(["169.254.0.0/16"])
    assert refusal("169.254.1.1", link_local) is None
    assert "cloud metadata" in str(refusal("169.254.169.254", link_local))
    assert refusal("169.254.169.254", parse_cidrs(["169.254.169.254/32"])) is None
    assert "link-local" in str(refusal("169.254.169.253", parse_cidrs(["169.254.169.254/32"])))
    assert "cloud metadata" in str(refusal("fd00:ec2::254", parse_cidrs(["fd00::/8"])))
    assert refusal("fd00:ec2::253", parse_cidrs(["fd00::/8"])) is None  # ULA is ordinary
    assert "cloud metadata" in str(refusal("100.100.100.200", parse_cidrs(["100.64.0.0/10"])))
    assert refusal("100.100.100.199", parse_cidrs(["100.64.0.0/10"])) is None


@pytest.mark.parametrize("v4", ["127.0.0.1", "169.254.169.254", "0.0.0.0", "10.0.0.1", "224.0.0.1"])
def test_ipv4_mapped_is_judged_as_mapped_and_as_its_ipv4_address(v4: str) -> None:
    mapped = f"::ffff:{v4}"
    assert "IPv4-mapped" in str(refusal(mapped, None))
    assert refusal(mapped, parse_cidrs([f"{v4}/32"])) is not None  # the IPv4 entry does not cover the v6 form
    assert refusal(mapped, parse_cidrs([f"::ffff:{v4}/128"])) is None
    broad = refusal(mapped, parse_cidrs(["::ffff:0:0/96"]))
    assert (broad is None) == (v4 == "10.0.0.1")  # special IPv4 inside stays special


@pytest.mark.parametrize("address", ["fe80::1%eth0", "2001:db8::1%eth0", "fd00:ec2::254%1"])
def test_zoned_ipv6_needs_an_explicit_cidr(address: str) -> None:
    assert refusal(address, None) is not None  # no list: never
    assert refusal(address, parse_cidrs(["2001:db9::/32"])) is not None
    # a list that covers it allows the zone; the bare address's own categories still apply
    assert (refusal(address, parse_cidrs(["::/0"])) is None) == (address == "2001:db8::1%eth0")
    bare = address.split("%")[0]
    assert refusal(address, parse_cidrs([f"{bare}/128"])) is None
    assert "zone" in str(refusal("2001:db8::1%eth0", None))


@pytest.mark.parametrize("address", ORDINARY)
def test_ordinary_addresses_pass_without_a_list_and_need_one_entry_with_one(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert refusal(address, None) is None
    assert refusal(address, parse_cidrs(["0.0.0.0/0", "::/0"])) is None
    assert refusal(address, parse_cidrs([f"{address}/{ip.max_prefixlen}"])) is None
    other = "192.168.0.0/16" if ip.version == 4 else "2001:db9::/32"
    why = AddressPolicy(parse_cidrs([other]), LB_ALLOWANCE).refusal(address)
    assert why == f"address {address} is outside {LB_ALLOWANCE}"
    assert refusal(address, parse_cidrs([])) is not None


@pytest.mark.parametrize(("address", "message"), [
    (None, "instance has no address yet"), ("", "instance has no address yet"),
    ("example.com", "address 'example.com' is not an IP address"),
    ("10.0.0.1%eth0", "address '10.0.0.1%eth0' is not an IP address"),
    ("fe80::1%", "address 'fe80::1%' is not an IP address"),
    ("010.0.0.1", "address '010.0.0.1' is not an IP address"),
    ("10.0.0.1/8", "address '10.0.0.1/8' is not an IP address"),
])
def test_not_addresses(address: str | None, message: str) -> None:
    assert refusal(address, None) == message


def test_ip_address_objects_and_http_wrapper() -> None:
    assert refusal(ipaddress.ip_address("127.0.0.1"), None) is not None
    assert refusal(ipaddress.ip_address("10.0.0.1"), None) is None
    why = address_refusal("127.0.0.1", None)
    assert why is not None and "--http-allowed-cidrs" in why and "loopback" in why
    assert address_refusal("127.0.0.1", parse_cidr_flag(["127.0.0.0/8"])) is None


def test_every_metadata_address_is_special() -> None:
    for _, net in METADATA_ADDRESSES:
        assert net.num_addresses == 1
        assert refusal(str(net.network_address), None) is not None
    assert {name for name, _ in SPECIAL_RANGES} >= {"unspecified", "loopback", "link-local", "multicast",
                                                    "broadcast", "IPv4-mapped IPv6"}


def test_parsing() -> None:
    assert parse_cidrs(None) is None
    assert parse_cidrs(["10.0.0.1/8"]) == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ValueError, match="invalid CIDR 'x'"):
        parse_cidrs(["x"])
    assert parse_cidr_flag(["10.0.0.0/8, 127.0.0.0/8", "::1/128", ""]) == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    with pytest.raises(ValueError):
        parse_cidr_flag(["10.0.0.1/8"])


@given(st.ip_addresses())
def test_a_policy_never_allows_more_than_its_list(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Property: with a list, an allowed address is in it; special addresses are never allowed by /0."""
    allowed = parse_cidrs(["10.0.0.0/8", "127.0.0.0/8", "fd00::/8"])
    assert allowed is not None
    if refusal(ip, allowed) is None:
        assert any(net.version == ip.version and ip in net for net in allowed)
    if special_ranges(ip):
        assert refusal(ip, parse_cidrs(["0.0.0.0/0", "::/0"])) is not None
    else:
        assert refusal(ip, None) is None


@pytest.mark.parametrize(("kind", "backend", "allow", "refused"), [
    ("Pod", "EndpointSlice", False, False),
    ("Instance", "EndpointSlice", False, True),
    ("Node", "EndpointSlice", False, True),
    ("Instance", "EndpointSlice", True, False),
    ("Node", "EndpointSlice", True, False),
    ("Instance", "HAProxy", False, False),
    ("Node", "HAProxy", False, False),
    ("Pod", "HAProxy", False, False),
])
def test_external_sources_need_the_operator_allowance_for_endpointslices(kind: str, backend: str, allow: bool,
                                                                         refused: bool) -> None:
    why = source_refusal(kind, backend, "Service ns/web", allow_external=allow)
    assert (why is not None) == refused
    if why:
        assert why.startswith(f"{kind} sources may not feed the EndpointSlices of Service ns/web")
        assert "--endpointslice-allow-external-sources" in why


def test_operator_flags() -> None:
    from poolkeeper.cli import build_parser

    args = build_parser().parse_args(["run"])
    assert (args.endpointslice_allowed_cidrs, args.endpointslice_allow_external_sources) == (None, False)
    assert args.http_allowed_cidrs is None
    args = build_parser().parse_args(["run", "--endpointslice-allowed-cidrs", "10.0.0.0/8,fd00::/8",
                                      "--endpointslice-allow-external-sources"])
    assert args.endpointslice_allowed_cidrs == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert args.endpointslice_allow_external_sources is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--endpointslice-allowed-cidrs", "10.0.0.1/8"])
