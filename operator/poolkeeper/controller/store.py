"""What the watches have told us, kept compact: instances as InstanceState, specs as raw dicts.

Instances are indexed by kind and namespace, so a pool's reconcile looks only at its own
namespace, however many pods the cluster has.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from poolkeeper.core.model import InstanceState

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


@dataclass
class Store:
    instances: dict[str, dict[str, dict[str, InstanceState]]] = field(
        default_factory=lambda: {"Pod": {}, "Node": {}, "Instance": {}, "EC2": {}})
    pools: dict[Key, dict[str, Any]] = field(default_factory=dict)
    load_balancers: dict[str, dict[str, Any]] = field(default_factory=dict)
    handlers: dict[Key, dict[str, Any]] = field(default_factory=dict)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def put_instance(self, state: InstanceState) -> InstanceState | None:
        bucket = self.instances[state.kind].setdefault(state.namespace, {})
        previous = bucket.get(state.name)
        bucket[state.name] = state
        return previous

    def drop_instance(self, kind: str, namespace: str, name: str) -> InstanceState | None:
        bucket = self.instances[kind].get(namespace)
        if bucket is None:
            return None
        previous = bucket.pop(name, None)
        if not bucket:
            del self.instances[kind][namespace]
        return previous

    def get_instance(self, kind: str, namespace: str, name: str) -> InstanceState | None:
        return self.instances[kind].get(namespace, {}).get(name)

    def instances_of(self, kind: str, namespace: str | None = None) -> Iterator[InstanceState]:
        buckets = self.instances[kind]
        if namespace is not None:
            yield from buckets.get(namespace, {}).values()
            return
        for bucket in buckets.values():
            yield from bucket.values()

    def instance_count(self) -> int:
        return sum(len(b) for kind in self.instances.values() for b in kind.values())

    def pools_for_kind(self, kind: str) -> Iterator[tuple[Key, dict[str, Any]]]:
        for key, body in self.pools.items():
            spec = body.get("spec") or {}
            sources = [spec.get("source") or {}, *(s for s in spec.get("sources") or [] if isinstance(s, dict))]
            if any(s.get("kind") == kind for s in sources):
                yield key, body
