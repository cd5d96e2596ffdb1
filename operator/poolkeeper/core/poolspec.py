"""TargetPool and LoadBalancer specs as frozen records, plus the rules between them.

The API server's schema rejects most bad input; what it cannot see (a selector we can't
evaluate, a CIDR list that doesn't parse) raises InvalidSpec and becomes a condition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from poolkeeper.core.addresses import Network, parse_cidrs
from poolkeeper.core.naming import pool_prefix
from poolkeeper.core.selectors import LabelSelector, SelectorError


class InvalidSpec(ValueError):
    """The object passed the schema but cannot be acted on; the text goes in a condition."""


@dataclass(frozen=True, slots=True)
class HealthCheck:
    interval_seconds: int
    rise: int
    fall: int


@dataclass(frozen=True, slots=True)
class PoolSpec:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    kind: str
    selector: LabelSelector
    port: int
    backend_type: str  # HAProxy | EndpointSlice
    load_balancer: str = ""
    backend: str = ""
    health_check: HealthCheck | None = None
    service: str = ""
    deregistration_delay: int = 30
    deleting: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def prefix(self) -> str:
        return pool_prefix(self.namespace, self.name)

    @property
    def variant(self) -> str:
        """Server settings fixed at `add server` time; a change replaces the servers."""
        check = self.health_check
        return f"check:{check.interval_seconds}:{check.rise}:{check.fall}" if check else ""

    @property
    def claim(self) -> tuple[str, str, str]:
        """What this pool owns exclusively: one backend of one LB, or one Service."""
        if self.backend_type == "HAProxy":
            return ("HAProxy", self.load_balancer, self.backend)
        return ("EndpointSlice", self.namespace, self.service)

    @property
    def backend_text(self) -> str:
        if self.backend_type == "HAProxy":
            return f"LoadBalancer {self.load_balancer}, backend {self.backend}"
        return f"Service {self.namespace}/{self.service}"


def parse_pool(obj: Mapping[str, Any]) -> PoolSpec:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    source, backend = spec.get("source") or {}, spec.get("backend") or {}
    try:
        selector = LabelSelector.parse(source.get("selector"))
    except SelectorError as exc:
        raise InvalidSpec(f"spec.source.selector: {exc}") from exc
    kind = source.get("kind")
    if kind not in ("Pod", "Node", "Instance"):
        raise InvalidSpec(f"spec.source.kind {kind!r} is not Pod, Node or Instance")
    common: dict[str, Any] = {
        "namespace": meta.get("namespace") or "", "name": meta.get("name") or "",
        "uid": meta.get("uid") or "", "generation": int(meta.get("generation") or 0),
        "created": meta.get("creationTimestamp") or "", "kind": kind, "selector": selector,
        "port": int(spec.get("port") or 0), "backend_type": backend.get("type"),
        "deregistration_delay": int(spec.get("deregistrationDelaySeconds", 30)),
        "deleting": bool(meta.get("deletionTimestamp")),
    }
    if backend.get("type") == "HAProxy":
        ha = backend.get("haproxy") or {}
        hc = ha.get("healthCheck")
        check = None
        if hc:
            check = HealthCheck(int(hc.get("intervalSeconds", 2)), int(hc.get("rise", 2)), int(hc.get("fall", 3)))
        return PoolSpec(**common, load_balancer=(ha.get("loadBalancerRef") or {}).get("name", ""),
                        backend=ha.get("backend", ""), health_check=check)
    if backend.get("type") == "EndpointSlice":
        return PoolSpec(**common, service=(backend.get("endpointSlice") or {}).get("serviceName", ""))
    raise InvalidSpec(f"spec.backend.type {backend.get('type')!r} is not HAProxy or EndpointSlice")


def claim_winner(claimants: Iterable[PoolSpec]) -> PoolSpec | None:
    """The oldest pool (creationTimestamp, then uid) keeps a contested backend."""
    return min(claimants, key=lambda p: (p.created, p.uid), default=None)


@dataclass(frozen=True, slots=True)
class LoadBalancerSpec:
    name: str
    type: str
    endpoint: str
    tls_secret: tuple[str, str] | None
    allowed_from: str  # All | Selector
    allowed_selector: LabelSelector
    allowed_cidrs: tuple[Network, ...] | None


def parse_load_balancer(obj: Mapping[str, Any]) -> LoadBalancerSpec:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    ha = spec.get("haproxy") or {}
    secret = (ha.get("tls") or {}).get("secretRef")
    allowed = spec.get("allowedNamespaces") or {}
    try:
        cidrs = parse_cidrs(spec.get("allowedTargetCIDRs"))
        selector = LabelSelector.parse(allowed.get("selector"))
    except (ValueError, SelectorError) as exc:
        raise InvalidSpec(str(exc)) from exc
    return LoadBalancerSpec(
        name=meta.get("name") or "", type=spec.get("type") or "HAProxy", endpoint=ha.get("endpoint") or "",
        tls_secret=(secret.get("namespace", ""), secret.get("name", "")) if secret else None,
        allowed_from=allowed.get("from") or "All", allowed_selector=selector, allowed_cidrs=cidrs,
    )


def namespace_allowed(lb: LoadBalancerSpec, namespace_labels: Mapping[str, str] | None) -> bool:
    if lb.allowed_from == "All":
        return True
    return namespace_labels is not None and lb.allowed_selector.matches(namespace_labels)
