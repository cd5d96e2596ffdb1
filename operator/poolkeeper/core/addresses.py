"""The one address policy: which addresses poolkeeper may hand out or connect to.

Tenants write the addresses (an Instance's `spec.address`, a Pod's IP, a handler's URL), so
every place an address leaves the operator asks this module first:

- load-balancer targets (HAProxy servers): allowances from the LoadBalancer's `allowedTargetCIDRs`;
- EndpointSlice endpoints: allowances from the operator's `--endpointslice-allowed-cidrs`;
- HTTP handler targets, judged on the address actually connected to: `--http-allowed-cidrs`;
- Python handlers only hear of members a pool accepted, so they get no refused address either;
- and which sources may feed EndpointSlices at all (`source_refusal`).

Special addresses (unspecified, loopback, link-local, multicast, broadcast, IPv4-mapped IPv6,
zoned IPv6 and known cloud metadata endpoints) are refused unless the allowance lists a CIDR
*inside* the special range that covers the address: `127.0.0.0/8` allows loopback targets and
`169.254.169.254/32` the metadata service, but `0.0.0.0/0` or `::/0` allow none of them. Any
other address is allowed when there is no list, and must be in a listed CIDR when there is one.

Pure: no I/O, no DNS.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LB_ALLOWANCE = "the LoadBalancer's allowedTargetCIDRs"
ENDPOINTSLICE_ALLOWANCE = "the operator's --endpointslice-allowed-cidrs"
HTTP_ALLOWANCE = "the operator's --http-allowed-cidrs"

_net = ipaddress.ip_network

# Cloud metadata and platform endpoints a workload must never be pointed at by a tenant.
METADATA_ADDRESSES: tuple[tuple[str, Network], ...] = (
    ("AWS, GCP (metadata.google.internal), Azure, OpenStack, Oracle, DigitalOcean metadata",
     _net("169.254.169.254/32")),
    ("AWS ECS task metadata", _net("169.254.170.2/32")),
    ("AWS time sync", _net("169.254.169.123/32")),
    ("AWS IMDS over IPv6", _net("fd00:ec2::254/128")),
    ("AWS time sync over IPv6", _net("fd00:ec2::123/128")),
    ("GCP metadata over IPv6", _net("fd20:ce::254/128")),
    ("Alibaba Cloud metadata", _net("100.100.100.200/32")),
    ("Azure WireServer", _net("168.63.129.16/32")),
    ("Oracle Cloud Classic metadata", _net("192.0.0.192/32")),
)

# (category, range). An address may be in several; each must be allowed.
SPECIAL_RANGES: tuple[tuple[str, Network], ...] = (
    *((f"a cloud metadata address ({what})", net) for what, net in METADATA_ADDRESSES),
    ("unspecified", _net("0.0.0.0/8")),
    ("unspecified", _net("::/128")),
    ("loopback", _net("127.0.0.0/8")),
    ("loopback", _net("::1/128")),
    ("link-local", _net("169.254.0.0/16")),
    ("link-local", _net("fe80::/10")),
    ("multicast", _net("224.0.0.0/4")),
    ("multicast", _net("ff00::/8")),
    ("broadcast", _net("255.255.255.255/32")),
    ("IPv4-mapped IPv6", _net("::ffff:0:0/96")),
)
_MAPPED_BASE = int(ipaddress.IPv6Address("::ffff:0:0"))


def _mapped(net: Network) -> Network:
    """The IPv4-mapped IPv6 form of an IPv4 range (127.0.0.0/8 -> ::ffff:127.0.0.0/104)."""
    if isinstance(net, ipaddress.IPv6Network):
        return net
    return ipaddress.IPv6Network((_MAPPED_BASE + int(net.network_address), 96 + net.prefixlen))


def special_ranges(ip: IPAddress) -> list[tuple[str, Network]]:
    """Every special category `ip` falls in, with its range (an IPv4-mapped address also in
    the mapped form of its IPv4 address's categories)."""
    found = [(name, net) for name, net in SPECIAL_RANGES if net.version == ip.version and ip in net]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        found += [(name, _mapped(net)) for name, net in special_ranges(ip.ipv4_mapped)]
    return found


def parse_cidrs(cidrs: Sequence[str] | None) -> tuple[Network, ...] | None:
    """None means 'no list'; a bad entry raises ValueError naming it (host bits are tolerated)."""
    if cidrs is None:
        return None
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise ValueError(f"invalid CIDR {cidr!r}: {exc}") from exc
    return tuple(networks)


def parse_cidr_flag(values: Sequence[str]) -> tuple[Network, ...]:
    """Networks from a flag's values (comma-separated lists allowed); ValueError on host bits or junk."""
    items = (item.strip() for value in values for item in value.split(","))
    return tuple(ipaddress.ip_network(item) for item in items if item)


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """An allowance (None: no list) and who grants it, for messages."""

    allowed: tuple[Network, ...] | None = None
    granted_by: str = "the allowed CIDRs"

    def refusal(self, address: str | IPAddress | None) -> str | None:
        """Why `address` may not be used, or None when it may (remembered: every reconcile asks
        again for each of the pool's instances, and parsing addresses is not free)."""
        return _remembered_refusal(address, self.allowed, self.granted_by)


DEFAULT_POLICY = AddressPolicy()


def refusal(address: str | IPAddress | None, allowed: Sequence[Network] | None,
            granted_by: str = "the allowed CIDRs") -> str | None:
    """Why `address` may not be used under the allowance `allowed` (None: no list), or None."""
    if address is None or address == "":
        return "instance has no address yet"
    text = str(address)
    bare, percent, zone = text.partition("%")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return f"address {text!r} is not an IP address"
    zoned = bool(percent)
    if zoned and (not zone or isinstance(ip, ipaddress.IPv4Address)):
        return f"address {text!r} is not an IP address"
    listed = [] if allowed is None else [net for net in allowed if net.version == ip.version and ip in net]
    for category, block in special_ranges(ip):
        if not any(net.subnet_of(block) for net in listed):  # type: ignore[arg-type]  # same version
            return f"address {text} is {category}: refused unless {granted_by} lists a CIDR inside {block}"
    if zoned and not listed:
        return f"address {text} has an IPv6 zone: refused unless {granted_by} lists a CIDR that covers it"
    if allowed is not None and not listed:
        return f"address {text} is outside {granted_by}"
    return None


_remembered_refusal = functools.lru_cache(maxsize=1 << 16)(refusal)


EXTERNAL_SOURCES = frozenset({"Instance", "Node", "EC2"})


def source_refusal(kind: str, backend_type: str, backend_text: str, *, allow_external: bool) -> str | None:
    """Why a pool's source may not feed its backend at all, or None.

    An EndpointSlice makes its addresses endpoints of a Service, which the cluster trusts
    (CVE-2021-25740): Instance objects (any address a tenant writes) and Nodes may feed one only
    when the operator runs with --endpointslice-allow-external-sources. A LoadBalancer's own
    allowedTargetCIDRs guard its targets, so HAProxy pools take every source.
    """
    if backend_type == "EndpointSlice" and kind in EXTERNAL_SOURCES and not allow_external:
        return (f"{kind} sources may not feed the EndpointSlices of {backend_text}: the operator allows only "
                "Pod sources there unless it runs with --endpointslice-allow-external-sources")
    return None
