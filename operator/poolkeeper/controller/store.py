"""What the watches have told us, kept compact: instances as InstanceState, specs as raw dicts.

Instances are indexed by kind and namespace, so a pool's reconcile looks only at its own
namespace, however many pods the cluster has, and within it by label (key, value), so a pool whose
selector names a value (`matchLabels`, `In`) looks only at the instances carrying it, however many
pods share its namespace; pods are also indexed by the readiness gates they carry. Pools are
indexed by their source's kind and their namespace, so an instance's event looks only at the
pools that could select it, however many pools the cluster has.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from poolkeeper.core.model import InstanceState
from poolkeeper.core.selectors import LabelSelector

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
Names = dict[str, None]  # instance names in the order they came (an ordered set)


def _source_kinds(body: dict[str, Any]) -> set[Any]:
    """Every kind the pool selects: `spec.source`, or each of `spec.sources`."""
    spec = body.get("spec") or {}
    sources = [spec.get("source") or {}, *(s for s in spec.get("sources") or [] if isinstance(s, dict))]
    return {s.get("kind") for s in sources if isinstance(s, dict) and s.get("kind")}


def _index(index: dict[Any, dict[Any, Names]], scope: Any, entries: Iterable[Any], name: str, remove: bool) -> None:
    """Add `name` under every entry of `scope` in `index`, or take it out (empty sets go)."""
    entries_of = index.setdefault(scope, {})
    for entry in entries:
        if remove:
            names = entries_of.get(entry)
            if names is not None:
                names.pop(name, None)
                if not names:
                    del entries_of[entry]
        else:
            entries_of.setdefault(entry, {})[name] = None
    if not entries_of:
        del index[scope]


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

    # (kind, namespace) -> label (key, value) -> names; and pods' namespace -> readiness gate -> names
    by_label: dict[tuple[str, str], dict[tuple[str, str], Names]] = field(default_factory=dict)
    by_gate: dict[str, dict[str, Names]] = field(default_factory=dict)

    def put_instance(self, state: InstanceState) -> InstanceState | None:
        bucket = self.instances[state.kind].setdefault(state.namespace, {})
        previous = bucket.get(state.name)
        bucket[state.name] = state
        if previous is None or previous.labels != state.labels:
            self._index_labels(state, previous.labels.items() if previous else (), remove=True)
            self._index_labels(state, state.labels.items())
        if state.kind == "Pod" and (previous is None or previous.gates.keys() != state.gates.keys()):
            self._index_gates(state, previous.gates if previous else (), remove=True)
            self._index_gates(state, state.gates)
        return previous

    def drop_instance(self, kind: str, namespace: str, name: str) -> InstanceState | None:
        bucket = self.instances[kind].get(namespace)
        if bucket is None:
            return None
        previous = bucket.pop(name, None)
        if not bucket:
            del self.instances[kind][namespace]
        if previous is not None:
            self._index_labels(previous, previous.labels.items(), remove=True)
            if kind == "Pod":
                self._index_gates(previous, previous.gates, remove=True)
        return previous

    def _index_labels(self, state: InstanceState, labels: Iterable[tuple[str, str]], remove: bool = False) -> None:
        _index(self.by_label, (state.kind, state.namespace), labels, state.name, remove)

    def _index_gates(self, state: InstanceState, gates: Iterable[str], remove: bool = False) -> None:
        _index(self.by_gate, state.namespace, gates, state.name, remove)

    def selected(self, kind: str, namespace: str | None, selectors: Iterable[LabelSelector]) -> list[InstanceState]:
        """Instances of `kind` (in `namespace` if given) that may match any of `selectors`: those
        carrying a label value each selector requires (its rarest), or every one when a selector
        requires none. A superset: the caller still matches each (cheap on a handful)."""
        scope = "" if namespace is None else namespace
        if namespace is None and kind != "Node":  # cluster-wide over namespaced kinds: no single index
            return list(self.instances_of(kind, namespace))
        index = self.by_label.get((kind, scope), {})
        names: Names = {}
        for selector in selectors:
            narrowest: Names | None = None
            for req in selector.requirements:
                if req.operator != "In":
                    continue
                found: Names = {}
                for value in sorted(req.values):
                    found.update(index.get((req.key, value), {}))
                if narrowest is None or len(found) < len(narrowest):
                    narrowest = found
            if narrowest is None:
                return list(self.instances_of(kind, namespace))
            names.update(narrowest)
        bucket = self.instances[kind].get(scope, {})
        return [bucket[name] for name in names if name in bucket]

    def gated(self, namespace: str, gate: str) -> list[InstanceState]:
        """The pods of `namespace` that carry readiness gate `gate`."""
        bucket = self.instances["Pod"].get(namespace, {})
        return [bucket[name] for name in self.by_gate.get(namespace, {}).get(gate, {}) if name in bucket]

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
