"""Deterministic backend server names: the only mark of ownership a load balancer keeps."""

from __future__ import annotations

import functools
import hashlib
import re

PREFIX = "pk-"
# 80 bits: finding another namespace/name whose prefix equals a victim pool's is a second
# preimage of truncated SHA-256 (~2^80 hashes), out of reach; 32 bits took ~2 core-hours.
# HAProxy has no limit on server names short of its line length; members stay at 41 characters.
PREFIX_HEX = 20


def _digest(text: str, size: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


CLUSTER_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?")  # what --cluster-id accepts (1-16 characters)


def cluster_prefix(cluster_id: str = "") -> str:
    """What every server of one operator (one --cluster-id) starts with.

    The default cluster id "" keeps today's `pk-`, so existing servers stay valid after an upgrade.
    Another id gives `pk.<id>.`: no such name starts with `pk-`, and as an id has no dot, one
    id's names never start with another's prefix. Operators sharing a backend thus never read
    or touch each other's servers.
    """
    if not cluster_id:
        return PREFIX
    if not CLUSTER_ID.fullmatch(cluster_id):
        raise ValueError(f"cluster id {cluster_id!r} is not 1-16 lowercase letters, digits or '-' "
                         "(starting and ending with a letter or digit)")
    return f"pk.{cluster_id}."


@functools.lru_cache(maxsize=4096)  # asked for every member of every reconcile
def pool_prefix(namespace: str, name: str, cluster_id: str = "") -> str:
    """Every server of one pool starts with this; servers without it are never touched."""
    return f"{cluster_prefix(cluster_id)}{_digest(f'{namespace}/{name}', PREFIX_HEX)}-"


@functools.lru_cache(maxsize=4096)
def legacy_pool_prefix(namespace: str, name: str) -> str:
    """The 32-bit prefix of releases before 80-bit ones. Collidable offline, so a pool only ever
    drains and removes servers named `legacy_pool_prefix + LEGACY_INSTANCE`, and only in a backend
    it has won the claim to (no other pool can have servers there): upgrades leave nothing behind."""
    return f"{PREFIX}{_digest(f'{namespace}/{name}', 8)}-"


LEGACY_INSTANCE = r"[0-9a-f]{12}(-[0-9a-f]{4})?"  # what followed the legacy prefix (regex)


def member_name(namespace: str, pool: str, instance_uid: str, variant: str = "", cluster_id: str = "") -> str:
    """Derived from the pool and the instance uid, so a new pod reusing an old IP gets a new name.

    `variant` names settings HAProxy fixes when a server is added (its health check): when they
    change, the new server gets a new name and replaces the old one like a rolling update.
    """
    name = pool_prefix(namespace, pool, cluster_id) + _digest(instance_uid, 12)
    return f"{name}-{_digest(variant, 4)}" if variant else name


ALTERNATE = "-b"  # the second name of one instance's server, used while its address or port changes


def alternate_name(name: str) -> str:
    """The other of the two names a member may have: a server's address and port are fixed when
    it is added, so a new address gets the other name and both serve side by side until the new
    one is in rotation (as with a `variant` change). Applying it twice gives the name back."""
    return name.removesuffix(ALTERNATE) if name.endswith(ALTERNATE) else name + ALTERNATE


@functools.lru_cache(maxsize=16384)  # asked for every member of every plan
def instance_part(name: str) -> str:
    """The part of a member name that identifies the instance (without the settings variant)."""
    found = _INSTANCE.match(name)
    return found.group(0) if found else name


_INSTANCE = re.compile(rf"pk(-|\.[a-z0-9-]+\.)[0-9a-f]{{{PREFIX_HEX}}}-[0-9a-f]{{12}}")
INSTANCE_PART = len(PREFIX) + PREFIX_HEX + 1 + 12  # its length for the default cluster id
