"""Which member addresses a load balancer may be given."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


def parse_cidrs(cidrs: Sequence[str] | None) -> tuple[Network, ...] | None:
    """None means 'no restriction'; a bad entry raises ValueError naming it."""
    if cidrs is None:
        return None
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise ValueError(f"invalid CIDR {cidr!r}: {exc}") from exc
    return tuple(networks)


def refusal(address: str | None, allowed: Sequence[Network] | None) -> str | None:
    """Why `address` may not be registered, or None when it may."""
    if not address:
        return "instance has no address yet"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"address {address!r} is not an IP address"
    if any(ip in net for net in LINK_LOCAL):
        return f"address {address} is link-local and is never registered"
    if allowed is not None and not any(ip.version == net.version and ip in net for net in allowed):
        return f"address {address} is outside the LoadBalancer's allowedTargetCIDRs"
    return None
