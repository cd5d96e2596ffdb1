"""TargetPool and LoadBalancer specs as frozen records, plus the rules between them.

The API server's schema rejects most bad input; what it cannot see (a selector we can't
evaluate, a CIDR list that doesn't parse) raises InvalidSpec and becomes a condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from poolkeeper.core.addresses import Network, parse_cidrs
from poolkeeper.core.ec2 import Ec2Source, parse_source
from poolkeeper.core.model import Placement
from poolkeeper.core.naming import legacy_pool_prefix, pool_prefix
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
    ec2: Ec2Source | None = None  # kind EC2: where the instances and their state changes come from

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def prefix(self) -> str:
        return pool_prefix(self.namespace, self.name)

    @property
    def legacy_prefix(self) -> str:
        return legacy_pool_prefix(self.namespace, self.name)

    @property
    def variant(self) -> str:
        """Server settings fixed at `add server` time; a change replaces the servers."""
        check = self.health_check
        return f"check:{check.interval_seconds}:{check.rise}:{check.fall}" if check else ""

    @property
    def placement(self) -> Placement:
        """Where the spec wants the pool's servers now."""
        if self.backend_type == "HAProxy":
            return Placement("HAProxy", load_balancer=self.load_balancer, backend=self.backend)
        return Placement("EndpointSlice", service=self.service)

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
    if kind not in ("Pod", "Node", "Instance", "EC2"):
        raise InvalidSpec(f"spec.source.kind {kind!r} is not Pod, Node, Instance or EC2")
    ec2 = _ec2_source(source) if kind == "EC2" else None
    if ec2 is not None:
        selector = LabelSelector.parse({"matchLabels": ec2.tag_map})
    common: dict[str, Any] = {
        "namespace": meta.get("namespace") or "", "name": meta.get("name") or "",
        "uid": meta.get("uid") or "", "generation": int(meta.get("generation") or 0),
        "created": meta.get("creationTimestamp") or "", "kind": kind, "selector": selector,
        "port": int(spec.get("port") or 0), "backend_type": backend.get("type"),
        "deregistration_delay": int(spec.get("deregistrationDelaySeconds", 30)),
        "deleting": bool(meta.get("deletionTimestamp")), "ec2": ec2,
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


def _ec2_source(source: Mapping[str, Any]) -> Ec2Source:
    """`spec.source.ec2`; its tags become the pool's selector over the instances' tags."""
    try:
        return parse_source(source.get("ec2") or {})
    except (ValueError, SelectorError) as exc:
        raise InvalidSpec(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class NamespacePolicy:
    """Gateway API's allowedRoutes.namespaces for a cluster-scoped object: All or Selector."""

    from_: str  # All | Selector
    selector: LabelSelector

    def allows(self, namespace_labels: Mapping[str, str] | None) -> bool:
        if self.from_ == "All":
            return True
        return namespace_labels is not None and self.selector.matches(namespace_labels)


@dataclass(frozen=True, slots=True)
class BackendGrant:
    """One HAProxy backend the admin lets poolkeeper drive; allowed None: the LB-wide default."""

    name: str
    allowed: NamespacePolicy | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancerSpec:
    name: str
    type: str
    endpoint: str
    tls_secret: tuple[str, str] | None
    allowed_from: str  # All | Selector: the default for backends that do not set their own
    allowed_selector: LabelSelector
    allowed_cidrs: tuple[Network, ...] | None
    backends: tuple[BackendGrant, ...] = ()  # none listed: no backend may be driven

    @property
    def default_policy(self) -> NamespacePolicy:
        return NamespacePolicy(self.allowed_from, self.allowed_selector)

    def grant(self, backend: str) -> BackendGrant | None:
        return next((g for g in self.backends if g.name == backend), None)


def _namespace_policy(raw: Mapping[str, Any], where: str) -> NamespacePolicy:
    try:
        selector = LabelSelector.parse(raw.get("selector"))
    except SelectorError as exc:
        raise InvalidSpec(f"{where}.selector: {exc}") from exc
    return NamespacePolicy(raw.get("from") or "All", selector)


def parse_load_balancer(obj: Mapping[str, Any]) -> LoadBalancerSpec:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    ha = spec.get("haproxy") or {}
    secret = (ha.get("tls") or {}).get("secretRef")
    default = _namespace_policy(spec.get("allowedNamespaces") or {}, "spec.allowedNamespaces")
    try:
        cidrs = parse_cidrs(spec.get("allowedTargetCIDRs"))
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from exc
    grants = []
    for i, item in enumerate(ha.get("backends") or []):
        raw = item.get("allowedNamespaces")
        where = f"spec.haproxy.backends[{i}].allowedNamespaces"
        grants.append(BackendGrant(str(item.get("name") or ""), _namespace_policy(raw, where) if raw else None))
    names = [g.name for g in grants]
    if len(set(names)) != len(names) or not all(names):
        raise InvalidSpec("spec.haproxy.backends: each backend must have a name, listed once")
    return LoadBalancerSpec(
        name=meta.get("name") or "", type=spec.get("type") or "HAProxy", endpoint=ha.get("endpoint") or "",
        tls_secret=(secret.get("namespace", ""), secret.get("name", "")) if secret else None,
        allowed_from=default.from_, allowed_selector=default.selector, allowed_cidrs=cidrs,
        backends=tuple(grants),
    )


def namespace_allowed(lb: LoadBalancerSpec, namespace_labels: Mapping[str, str] | None) -> bool:
    """The LB-wide default (spec.allowedNamespaces) alone; backends may narrow or widen it."""
    return lb.default_policy.allows(namespace_labels)


def backend_refusal(lb: LoadBalancerSpec, backend: str, namespace: str,
                    namespace_labels: Mapping[str, str] | None) -> str | None:
    """Why a pool in `namespace` may not drive `backend` of `lb`, or None if it may."""
    grant = lb.grant(backend)
    if grant is None:
        if not lb.backends:
            return (f"LoadBalancer {lb.name} lists no backends in spec.haproxy.backends, so poolkeeper may drive "
                    f"none of them (backend {backend} is not listed)")
        return f"LoadBalancer {lb.name} does not list backend {backend} in spec.haproxy.backends"
    policy = grant.allowed or lb.default_policy
    if not policy.allows(namespace_labels):
        where = (f"spec.haproxy.backends[{backend}].allowedNamespaces" if grant.allowed
                 else "spec.allowedNamespaces")
        return (f"LoadBalancer {lb.name} does not allow pools from namespace {namespace} to drive backend "
                f"{backend} ({where})")
    return None
