"""TargetPool and LoadBalancer specs as frozen records, plus the rules between them.

The API server's schema rejects most bad input; what it cannot see (a selector we can't
evaluate, a CIDR list that doesn't parse) raises InvalidSpec and becomes a condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from poolkeeper.core.addresses import Network, parse_cidrs
from poolkeeper.core.ec2 import Ec2Source, parse_source
from poolkeeper.core.model import Placement
from poolkeeper.core.naming import legacy_pool_prefix, pool_prefix
from poolkeeper.core.selectors import LabelSelector, SelectorError


class InvalidSpec(ValueError):
    """The object passed the schema but cannot be acted on; the text goes in a condition."""


class InitialState(StrEnum):
    """How a server whose instance is ready enters rotation (`healthCheck.initialState`)."""

    UP = "Up"  # at once, as marked healthy: the instance's readiness is trusted, checks take it out after `fall`
    CHECKING = "Checking"  # only once its checks have passed (`rise` in a row), like an AWS target group


@dataclass(frozen=True, slots=True)
class HealthCheck:
    interval_seconds: int
    rise: int
    fall: int
    # not part of PoolSpec.variant: HAProxy does not fix it when adding, so a change replaces no server
    initial_state: InitialState = InitialState.UP


# one SQS consumer per pool: two EC2 sources would need two queues and say nothing more
EC2_ONCE = ("a pool takes at most one EC2 source (it consumes and deletes its queue's messages): select "
            "more instances with its tags, or use another pool")
MAX_WEIGHT = 256  # HAProxy's `set server <b>/<s> weight` range is 0-256
DEFAULT_WEIGHT = 1  # a dynamic server's weight in HAProxy: a source without one goes (back) to it


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One source of a pool's members: `spec.source`, or one entry of `spec.sources`."""

    kind: str  # Pod | Node | Instance | EC2
    selector: LabelSelector  # EC2: its tags, over the instances' tags
    weight: int | None = None  # HAProxy weight of each of its members; None: the backend has no weights
    ec2: Ec2Source | None = None  # kind EC2: where the instances and their state changes come from
    where: str = field(default="spec.source", compare=False)  # its place in the spec, for messages


@dataclass(frozen=True, slots=True)
class PoolSpec:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    sources: tuple[SourceSpec, ...]
    port: int
    backend_type: str  # HAProxy | EndpointSlice | ELBv2
    load_balancer: str = ""
    backend: str = ""  # HAProxy backend section, or ELBv2 target group ARN
    health_check: HealthCheck | None = None
    service: str = ""
    deregistration_delay: int = 30
    deleting: bool = False
    cluster_id: str = ""  # the operator's --cluster-id: which servers of a shared backend are its own
    target_type: str = ""  # ELBv2: ip

    @property
    def ec2_source(self) -> SourceSpec | None:
        """The pool's EC2 source (at most one: it consumes its own queue), alone or among others."""
        return next((s for s in self.sources if s.ec2 is not None), None)

    @property
    def ec2(self) -> Ec2Source | None:
        found = self.ec2_source
        return found.ec2 if found is not None else None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of its sources, each once, in spec order."""
        return tuple(dict.fromkeys(s.kind for s in self.sources))

    def selects(self, kind: str, labels: Mapping[str, str]) -> bool:
        """Whether some source of the pool takes an instance of `kind` with these labels."""
        return any(s.kind == kind and s.selector.matches(labels) for s in self.sources)

    @property
    def prefix(self) -> str:
        return pool_prefix(self.namespace, self.name, self.cluster_id)

    @property
    def legacy_prefix(self) -> str:
        """Only the default cluster id had servers before 80-bit prefixes."""
        return "" if self.cluster_id else legacy_pool_prefix(self.namespace, self.name)

    @property
    def variant(self) -> str:
        """Server settings fixed at `add server` time; a change replaces the servers."""
        check = self.health_check
        return f"check:{check.interval_seconds}:{check.rise}:{check.fall}" if check else ""

    @property
    def placement(self) -> Placement:
        """Where the spec wants the pool's servers now."""
        if self.backend_type in ("HAProxy", "ELBv2"):
            return Placement(self.backend_type, load_balancer=self.load_balancer, backend=self.backend)
        return Placement("EndpointSlice", service=self.service)

    @property
    def backend_text(self) -> str:
        if self.backend_type in ("HAProxy", "ELBv2"):
            return str(self.placement)
        return f"Service {self.namespace}/{self.service}"

    @property
    def checks_health(self) -> bool:
        """Whether the backend health-checks the members (an ELBv2 target group always does)."""
        return self.health_check is not None or self.backend_type == "ELBv2"

    @property
    def enters_unchecked(self) -> bool:
        """Whether a ready member enters rotation before its first check (HAProxy, initialState Up)."""
        return self.health_check is not None and self.health_check.initial_state is InitialState.UP


def _parse_source(raw: Any, where: str) -> SourceSpec:
    if not isinstance(raw, Mapping):
        raise InvalidSpec(f"{where} is not an object")
    try:
        selector = LabelSelector.parse(raw.get("selector"))
    except SelectorError as exc:
        raise InvalidSpec(f"{where}.selector: {exc}") from exc
    kind = raw.get("kind")
    if kind not in ("Pod", "Node", "Instance", "EC2"):
        raise InvalidSpec(f"{where}.kind {kind!r} is not Pod, Node, Instance or EC2")
    ec2 = _ec2_source(raw, where) if kind == "EC2" else None
    if ec2 is not None:  # its tags are the selector over the instances' tags
        selector = LabelSelector.parse({"matchLabels": ec2.tag_map})
    weight = raw.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)
                               or not 0 <= weight <= MAX_WEIGHT):
        raise InvalidSpec(f"{where}.weight {weight!r} is not an integer from 0 to {MAX_WEIGHT}")
    return SourceSpec(kind, selector, weight, ec2, where)


def parse_sources(spec: Mapping[str, Any]) -> tuple[SourceSpec, ...]:
    """`spec.source` (one) or `spec.sources` (several, e.g. Pods and Instances in one backend).

    The schema enforces exactly one of the two; this repeats it for objects stored before.
    An instance that two sources select takes the first one's weight.
    """
    single, several = spec.get("source"), spec.get("sources")
    if (single is None) == (several is None):
        raise InvalidSpec("set exactly one of spec.source and spec.sources")
    if single is not None:
        return (_parse_source(single, "spec.source"),)
    if not isinstance(several, list) or not several:
        raise InvalidSpec("spec.sources must list at least one source")
    return tuple(_parse_source(item, f"spec.sources[{i}]") for i, item in enumerate(several))


def parse_pool(obj: Mapping[str, Any], cluster_id: str = "") -> PoolSpec:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    backend = spec.get("backend") or {}
    sources = parse_sources(spec)
    if sum(1 for s in sources if s.kind == "EC2") > 1:
        raise InvalidSpec(EC2_ONCE)
    if backend.get("type") != "HAProxy" and any(s.weight is not None for s in sources):
        raise InvalidSpec("spec.sources[].weight needs an HAProxy backend: "
                          "EndpointSlice and ELBv2 targets have no weights")
    if backend.get("type") == "HAProxy":  # every member has a weight there: unset is HAProxy's default
        sources = tuple(s if s.weight is not None else replace(s, weight=DEFAULT_WEIGHT) for s in sources)
    common: dict[str, Any] = {
        "namespace": meta.get("namespace") or "", "name": meta.get("name") or "",
        "uid": meta.get("uid") or "", "generation": int(meta.get("generation") or 0),
        "created": meta.get("creationTimestamp") or "", "sources": sources,
        "port": int(spec.get("port") or 0), "backend_type": backend.get("type"),
        "deregistration_delay": int(spec.get("deregistrationDelaySeconds", 30)),
        "deleting": bool(meta.get("deletionTimestamp")), "cluster_id": cluster_id,
    }
    if backend.get("type") == "HAProxy":
        ha = backend.get("haproxy") or {}
        hc = ha.get("healthCheck")
        check = None
        if hc:
            check = HealthCheck(int(hc.get("intervalSeconds", 2)), int(hc.get("rise", 2)), int(hc.get("fall", 3)),
                                _initial_state(hc.get("initialState", InitialState.UP.value)))
        return PoolSpec(**common, load_balancer=(ha.get("loadBalancerRef") or {}).get("name", ""),
                        backend=ha.get("backend", ""), health_check=check)
    if backend.get("type") == "EndpointSlice":
        return PoolSpec(**common, service=(backend.get("endpointSlice") or {}).get("serviceName", ""))
    if backend.get("type") == "ELBv2":
        return _parse_elbv2_pool(common, backend.get("elbv2") or {})
    raise InvalidSpec(f"spec.backend.type {backend.get('type')!r} is not HAProxy, EndpointSlice or ELBv2")


def _initial_state(raw: Any) -> InitialState:
    """The schema allows only the enum's values; objects stored before it may hold anything."""
    try:
        return InitialState(raw)
    except ValueError:
        names = " or ".join(s.value for s in InitialState)
        raise InvalidSpec(f"spec.backend.haproxy.healthCheck.initialState {raw!r} is not {names}") from None


def _parse_elbv2_pool(common: dict[str, Any], elb: Mapping[str, Any]) -> PoolSpec:
    arn = str(elb.get("targetGroupARN") or "")
    if not arn:
        raise InvalidSpec("spec.backend.elbv2.targetGroupARN is required")
    return PoolSpec(**common, load_balancer=(elb.get("loadBalancerRef") or {}).get("name", ""), backend=arn,
                    target_type=str(elb.get("targetType") or "ip"))


def _ec2_source(source: Mapping[str, Any], where: str) -> Ec2Source:
    """`<where>.ec2` of an EC2 source; its tags become the source's selector over the instances' tags."""
    try:
        return parse_source(source.get("ec2") or {}, f"{where}.ec2")
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
    backends: tuple[BackendGrant, ...] = ()  # none listed: no backend may be driven (ELBv2: target group ARNs)
    region: str = ""  # ELBv2
    endpoint_url: str = ""  # ELBv2: "" for the region's own endpoint
    credentials_secret: tuple[str, str] | None = None  # ELBv2: None for the pod's own identity

    @property
    def backends_field(self) -> str:
        """Where the admin lists what pools may drive, for messages."""
        return "spec.elbv2.targetGroups" if self.type == "ELBv2" else "spec.haproxy.backends"

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


def _grants(items: Any, key: str, where: str) -> tuple[BackendGrant, ...]:
    """The admin's list of backends (or target groups) and, per item, which namespaces may use it."""
    grants = []
    for i, item in enumerate(items or []):
        raw = item.get("allowedNamespaces")
        grants.append(BackendGrant(str(item.get(key) or ""),
                                   _namespace_policy(raw, f"{where}[{i}].allowedNamespaces") if raw else None))
    names = [g.name for g in grants]
    if len(set(names)) != len(names) or not all(names):
        raise InvalidSpec(f"{where}: each item must have a {key}, listed once")
    return tuple(grants)


def _parse_elbv2_lb(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> LoadBalancerSpec:
    elb = spec.get("elbv2") or {}
    default = _namespace_policy(spec.get("allowedNamespaces") or {}, "spec.allowedNamespaces")
    try:
        cidrs = parse_cidrs(spec.get("allowedTargetCIDRs"))
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from exc
    secret = elb.get("credentialsSecretRef")
    if not elb.get("region"):
        raise InvalidSpec("spec.elbv2.region is required")
    return LoadBalancerSpec(
        name=meta.get("name") or "", type="ELBv2", endpoint="", tls_secret=None,
        allowed_from=default.from_, allowed_selector=default.selector, allowed_cidrs=cidrs,
        backends=_grants(elb.get("targetGroups"), "arn", "spec.elbv2.targetGroups"),
        region=str(elb["region"]), endpoint_url=str(elb.get("endpointURL") or ""),
        credentials_secret=(secret.get("namespace", ""), secret.get("name", "")) if secret else None,
    )


def parse_load_balancer(obj: Mapping[str, Any]) -> LoadBalancerSpec:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if spec.get("type") == "ELBv2":
        return _parse_elbv2_lb(meta, spec)
    ha = spec.get("haproxy") or {}
    secret = (ha.get("tls") or {}).get("secretRef")
    default = _namespace_policy(spec.get("allowedNamespaces") or {}, "spec.allowedNamespaces")
    try:
        cidrs = parse_cidrs(spec.get("allowedTargetCIDRs"))
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from exc
    grants = _grants(ha.get("backends"), "name", "spec.haproxy.backends")
    return LoadBalancerSpec(
        name=meta.get("name") or "", type=spec.get("type") or "HAProxy", endpoint=ha.get("endpoint") or "",
        tls_secret=(secret.get("namespace", ""), secret.get("name", "")) if secret else None,
        allowed_from=default.from_, allowed_selector=default.selector, allowed_cidrs=cidrs,
        backends=grants,
    )


def namespace_allowed(lb: LoadBalancerSpec, namespace_labels: Mapping[str, str] | None) -> bool:
    """The LB-wide default (spec.allowedNamespaces) alone; backends may narrow or widen it."""
    return lb.default_policy.allows(namespace_labels)


def backend_refusal(lb: LoadBalancerSpec, backend: str, namespace: str,
                    namespace_labels: Mapping[str, str] | None) -> str | None:
    """Why a pool in `namespace` may not drive `backend` of `lb`, or None if it may."""
    grant = lb.grant(backend)
    field, what = lb.backends_field, ("target group" if lb.type == "ELBv2" else "backend")
    if grant is None:
        if not lb.backends:
            return (f"LoadBalancer {lb.name} lists no {what}s in {field}, so poolkeeper may drive "
                    f"none of them ({what} {backend} is not listed)")
        return f"LoadBalancer {lb.name} does not list {what} {backend} in {field}"
    policy = grant.allowed or lb.default_policy
    if not policy.allows(namespace_labels):
        where = f"{field}[{backend}].allowedNamespaces" if grant.allowed else "spec.allowedNamespaces"
        return (f"LoadBalancer {lb.name} does not allow pools from namespace {namespace} to drive {what} "
                f"{backend} ({where})")
    return None
