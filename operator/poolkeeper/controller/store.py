"""What the watches have told us, kept compact: instances as InstanceState, specs as raw dicts.

Instances are indexed by kind and namespace, so a pool's reconcile looks only at its own
namespace, however many pods the cluster has, and within it by label (key, value), so a pool
whose selector requires a label looks only at the instances carrying it (`candidates`), however
many pods its namespace has; pools are indexed by their source's kind and their namespace, so
an instance's event looks only at the pools that could select it, however many pools the
cluster has.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from poolkeeper.core.model import InstanceState
from poolkeeper.core.selectors import LabelSelector

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
Postings = dict[tuple[str, str], set[str]]  # (label key, value) -> instance names


def _source_kinds(body: dict[str, Any]) -> set[Any]:
    """Every kind the pool selects: `spec.source`, or each of `spec.sources`."""
    spec = body.get("spec") or {}
    sources = [spec.get("source") or {}, *(s for s in spec.get("sources") or [] if isinstance(s, dict))]
    return {s.get("kind") for s in sources if isinstance(s, dict) and s.get("kind")}


class PoolBodies(dict[Key, dict[str, Any]]):
    """TargetPool bodies by key, with an index by (source kind, namespace) kept on every write."""

    def __init__(self) -> None:
        super().__init__()
        self.by_scope: dict[Any, dict[str, set[Key]]] = {}  # kind -> namespace -> keys
        self.spec_version = 0  # moves when a pool comes, goes or its spec changes (not on status writes)

    def _unindex(self, key: Key) -> None:
        body = super().get(key)
        if body is None:
            return
        for kind in _source_kinds(body):
            scopes = self.by_scope.get(kind, {})
            keys = scopes.get(key[0])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del scopes[key[0]]

    def __setitem__(self, key: Key, body: dict[str, Any]) -> None:
        old = super().get(key)
        if old is None or old.get("spec") != body.get("spec"):
            self.spec_version += 1
        self._unindex(key)
        super().__setitem__(key, body)
        for kind in _source_kinds(body):
            self.by_scope.setdefault(kind, {}).setdefault(key[0], set()).add(key)

    def __delitem__(self, key: Key) -> None:
        self.spec_version += 1
        self._unindex(key)
        super().__delitem__(key)

    def pop(self, key: Key, *default: Any) -> Any:  # type: ignore[override]
        self.spec_version += 1
        self._unindex(key)
        return super().pop(key, *default)

    def clear(self) -> None:
        self.spec_version += 1
        self.by_scope.clear()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, body in dict(*args, **kwargs).items():
            self[key] = body

    def setdefault(self, key: Key, default: dict[str, Any] | None = None) -> dict[str, Any]:  # type: ignore[override]
        if key not in self:
            self[key] = default if default is not None else {}
        return self[key]


@dataclass
class Store:
    instances: dict[str, dict[str, dict[str, InstanceState]]] = field(
        default_factory=lambda: {"Pod": {}, "Node": {}, "Instance": {}, "EC2": {}})
    pools: PoolBodies = field(default_factory=PoolBodies)
    load_balancers: dict[str, dict[str, Any]] = field(default_factory=dict)
    handlers: dict[Key, dict[str, Any]] = field(default_factory=dict)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    # kind -> namespace -> (label key, value) -> names: the instances a required label can select
    by_label: dict[str, dict[str, Postings]] = field(default_factory=dict)

    def put_instance(self, state: InstanceState) -> InstanceState | None:
        bucket = self.instances[state.kind].setdefault(state.namespace, {})
        previous = bucket.get(state.name)
        bucket[state.name] = state
        if previous is None or previous.labels != state.labels:
            postings = self.by_label.setdefault(state.kind, {}).setdefault(state.namespace, {})
            if previous is not None:
                _unpost(postings, previous)
            for pair in state.labels.items():
                postings.setdefault(pair, set()).add(state.name)
        return previous

    def drop_instance(self, kind: str, namespace: str, name: str) -> InstanceState | None:
        bucket = self.instances[kind].get(namespace)
        if bucket is None:
            return None
        previous = bucket.pop(name, None)
        postings = self.by_label.get(kind, {}).get(namespace)
        if previous is not None and postings is not None:
            _unpost(postings, previous)
        if not bucket:
            del self.instances[kind][namespace]
            self.by_label.get(kind, {}).pop(namespace, None)
        return previous

    def candidates(self, kind: str, namespace: str | None, selector: LabelSelector) -> Iterator[InstanceState]:
        """A superset of the instances `selector` matches (in `namespace`, or all): those carrying the
        label of its narrowest `In` requirement, or every instance when it requires none."""
        required = [req for req in selector.requirements if req.operator == "In"]
        if not required:
            yield from self.instances_of(kind, namespace)
            return
        scopes = self.by_label.get(kind, {})
        for scope in [namespace] if namespace is not None else list(scopes):
            postings = scopes.get(scope)
            if not postings:
                continue
            bucket = self.instances[kind].get(scope, {})
            names = min(([postings.get((req.key, value), set()) for value in req.values] for req in required),
                        key=lambda sets: sum(map(len, sets)))
            for found in names:
                for name in sorted(found):  # a stable order, whatever the sets' hashing
                    state = bucket.get(name)
                    if state is not None:
                        yield state

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

    def pools_for_kind(self, kind: str, namespace: str | None = None) -> Iterator[tuple[Key, dict[str, Any]]]:
        """Pools whose source is `kind`, in `namespace` only if given: an index lookup, not a scan."""
        scopes = self.pools.by_scope.get(kind, {})
        buckets = [scopes.get(namespace, set())] if namespace is not None else list(scopes.values())
        for bucket in buckets:
            for key in sorted(bucket):
                yield key, self.pools[key]


def _unpost(postings: Postings, state: InstanceState) -> None:
    for pair in state.labels.items():
        names = postings.get(pair)
        if names is not None:
            names.discard(state.name)
            if not names:
                del postings[pair]
