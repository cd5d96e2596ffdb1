"""Kubernetes label selectors: parse once, match many times, and render for server-side watches."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class SelectorError(ValueError):
    """A selector the API server schema let through but that cannot be evaluated."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """An AND of requirements; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | None) -> LabelSelector:
        if not spec:
            return cls()
        reqs: list[Requirement] = []
        for key, value in sorted((spec.get("matchLabels") or {}).items()):
            reqs.append(Requirement(str(key), "In", frozenset([str(value)])))
        for expr in spec.get("matchExpressions") or []:
            op = expr.get("operator")
            values = frozenset(str(v) for v in expr.get("values") or [])
            if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise SelectorError(f"unknown selector operator {op!r}")
            if op in ("In", "NotIn") and not values:
                raise SelectorError(f"operator {op} on key {expr.get('key')!r} needs values")
            reqs.append(Requirement(str(expr.get("key")), op, values))
        return cls(tuple(reqs))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(req.matches(labels) for req in self.requirements)

    def to_query(self) -> str:
        """The `labelSelector=` query string form, for server-side filtered watches."""
        parts = []
        for req in self.requirements:
            values = ",".join(sorted(req.values))
            if req.operator == "In" and len(req.values) == 1:
                parts.append(f"{req.key}={values}")
            elif req.operator == "In":
                parts.append(f"{req.key} in ({values})")
            elif req.operator == "NotIn":
                parts.append(f"{req.key} notin ({values})")
            elif req.operator == "Exists":
                parts.append(req.key)
            else:
                parts.append(f"!{req.key}")
        return ",".join(parts)
