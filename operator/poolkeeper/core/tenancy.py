"""Pure decisions about what one tenant (a namespace) may use: Node sources, and its share of the
operator's shared delivery capacity. No I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from poolkeeper.core.selectors import LabelSelector, SelectorError


@dataclass(frozen=True, slots=True)
class NodeSourcePolicy:
    """Which namespaces may have TargetPools with `source.kind: Node` (`--node-source-namespaces`).

    Either a set of names or a namespace label selector; None as a policy means every namespace.
    """

    names: frozenset[str] | None = None
    selector: LabelSelector | None = None
    text: str = ""

    def allows(self, namespace: str, labels: Mapping[str, str] | None) -> bool:
        if self.names is not None:
            return namespace in self.names
        if self.selector is not None:
            return labels is not None and self.selector.matches(labels)
        return True


_SET = re.compile(r"^\s*([A-Za-z0-9._/-]+)\s+(in|notin)\s*\(([^)]*)\)\s*$")
_CMP = re.compile(r"^\s*([A-Za-z0-9._/-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)\s*$")
_KEY = re.compile(r"^\s*(!?)\s*([A-Za-z0-9._/-]+)\s*$")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in (part.strip() for part in parts) if p]


def parse_label_selector(text: str) -> LabelSelector:
    """A selector in kubectl's string form: `k=v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a)`."""
    expressions: list[dict[str, object]] = []
    for part in _split_top_level(text):
        if m := _SET.match(part):
            values = [v.strip() for v in m.group(3).split(",") if v.strip()]
            expressions.append({"key": m.group(1), "operator": "In" if m.group(2) == "in" else "NotIn",
                                "values": values})
        elif m := _CMP.match(part):
            operator = "NotIn" if m.group(2) == "!=" else "In"
            expressions.append({"key": m.group(1), "operator": operator, "values": [m.group(3)]})
        elif m := _KEY.match(part):
            expressions.append({"key": m.group(2), "operator": "DoesNotExist" if m.group(1) else "Exists"})
        else:
            raise SelectorError(f"can't parse {part!r} of label selector {text!r}")
    if not expressions:
        raise SelectorError("empty label selector")
    return LabelSelector.parse({"matchExpressions": expressions})


def parse_node_source_namespaces(text: str | None) -> NodeSourcePolicy | None:
    """`--node-source-namespaces`: None/empty/`*` for every namespace, a comma list of namespace
    names (`infra,ops`), or a namespace label selector (`poolkeeper.dev/node-sources=allowed`;
    anything with `=`, `!`, ` in ` or ` notin `). ValueError when it doesn't parse."""
    if text is None or text.strip() in ("", "*"):
        return None
    if re.search(r"[=!]|\s(not)?in\s*\(", text):
        try:
            return NodeSourcePolicy(selector=parse_label_selector(text), text=text)
        except SelectorError as exc:
            raise ValueError(str(exc)) from exc
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
            raise ValueError(f"{name!r} is not a namespace name (a label selector needs =, !=, in or notin)")
    return NodeSourcePolicy(names=names, text=text)


def node_source_refusal(kind: str, namespace: str, namespace_labels: Mapping[str, str] | None,
                        policy: NodeSourcePolicy | None) -> str | None:
    """Why a pool in `namespace` may not select Nodes, or None (other kinds are always fine here).

    Nodes are cluster-wide: a pool selecting them puts every matching Node of the cluster into a
    tenant's load balancer and tells the tenant's handlers about them.
    """
    if kind != "Node" or policy is None or policy.allows(namespace, namespace_labels):
        return None
    return (f"namespace {namespace} may not have TargetPools with Node sources: the operator allows them "
            f"only in namespaces matching --node-source-namespaces={policy.text}")


def function_slots_per_namespace(workers: int) -> int:
    """How many of the `workers` function processes one namespace may hold at once: all but one
    (at least one), so another namespace always finds a worker free of this one's hooks."""
    return max(1, workers - 1)


def http_slots_per_namespace(connections: int, requested: int | None = None) -> int:
    """How many of the `connections` HTTP connections one namespace may use at once: `requested`
    (`--http-namespace-concurrency`) capped below the total, by default a quarter of it."""
    wanted = requested if requested is not None else connections // 4
    return max(1, min(wanted, connections - 1)) if connections > 1 else 1


def parse_ec2_source_namespaces(text: str | None) -> NodeSourcePolicy:
    """`--ec2-source-namespaces`: as --node-source-namespaces, but unset means no namespace (the
    operator's AWS identity is lent to nobody until an admin says so); `*` means every namespace."""
    if text is None or not text.strip():
        return NodeSourcePolicy(names=frozenset(), text="")
    return parse_node_source_namespaces(text) or NodeSourcePolicy(text="*")


def ec2_source_refusal(namespace: str, namespace_labels: Mapping[str, str] | None, *, own_credentials: bool,
                       endpoint_url: str, policy: NodeSourcePolicy, where: str = "spec.source") -> str | None:
    """Why a pool in `namespace` may not have this EC2 source (at `where`: spec.source or
    spec.sources[i]), or None.

    A Secret of the pool's own namespace carries the tenant's own AWS identity: it can only read
    what that identity may. Without one the operator would read queues and instances with its own
    identity, and an `endpointURL` makes the operator connect wherever the tenant says (and send its
    signed requests there): both only for namespaces the admin lists in --ec2-source-namespaces.
    """
    if policy.allows(namespace, namespace_labels):
        return None
    listed = f"--ec2-source-namespaces={policy.text}" if policy.text else "--ec2-source-namespaces (unset)"
    if not own_credentials:
        return (f"namespace {namespace} may not use the operator's own AWS identity: set "
                f"{where}.ec2.credentialsSecretRef to a Secret of this namespace, or ask an admin to "
                f"add the namespace to {listed}")
    if endpoint_url:
        return (f"namespace {namespace} may not set {where}.ec2.endpointURL: only namespaces matching "
                f"{listed} may point the operator at another AWS endpoint")
    return None
