"""The indexes that keep per-event work independent of the number of pools (issue 10 section 3)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from poolkeeper.controller.claimindex import LiveClaims
from poolkeeper.controller.store import Store
from poolkeeper.core.claims import Claimant, build_index, haproxy_claim
from poolkeeper.core.model import InstanceState, Phase
from poolkeeper.core.selectors import LabelSelector

CLAIMS = [haproxy_claim("unix:///run/haproxy.sock", f"be_{i}") for i in range(3)]
KEYS = [(ns, name) for ns in ("a", "b") for name in ("x", "y", "z")]
claimants = st.builds(lambda claim, created, eligible: (claim, created, eligible),
                      st.sampled_from(CLAIMS), st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]),
                      st.booleans())
changes = st.lists(st.tuples(st.sampled_from(KEYS), st.none() | claimants), max_size=40)


@settings(max_examples=300, deadline=None)
@given(changes)
def test_claims_updated_per_pool_equal_a_rebuild(steps: list[tuple[tuple[str, str], Any]]) -> None:
    live, current = LiveClaims(), {}
    for key, change in steps:
        claimant = None if change is None else Claimant(key, change[1], change[0], change[2])
        if claimant is None:
            current.pop(key, None)
        else:
            current[key] = claimant
        live.put(key, claimant)
        rebuilt = build_index(current.values())
        assert live.index.of == rebuilt.of
        assert live.index.winners == rebuilt.winners
        assert {k: sorted(v, key=lambda c: c.order) for k, v in live.index.claimants.items()} == \
            {k: sorted(v, key=lambda c: c.order) for k, v in rebuilt.claimants.items()}


def pool(kind: str) -> dict[str, Any]:
    return {"spec": {"source": {"kind": kind}}}


def test_pools_are_found_by_source_kind_and_namespace_without_a_scan() -> None:
    store = Store()
    store.pools[("a", "web")] = pool("Pod")
    store.pools[("b", "web")] = pool("Pod")
    store.pools[("a", "nodes")] = pool("Node")
    assert [k for k, _ in store.pools_for_kind("Pod", "a")] == [("a", "web")]
    assert sorted(k for k, _ in store.pools_for_kind("Pod")) == [("a", "web"), ("b", "web")]
    assert [k for k, _ in store.pools_for_kind("Node")] == [("a", "nodes")]
    store.pools[("a", "web")] = pool("Instance")  # the source kind edited: the pool moves in the index
    assert list(store.pools_for_kind("Pod", "a")) == []
    assert [k for k, _ in store.pools_for_kind("Instance", "a")] == [("a", "web")]
    store.pools.pop(("b", "web"))
    del store.pools[("a", "nodes")]
    assert list(store.pools_for_kind("Pod")) == [] and list(store.pools_for_kind("Node")) == []
    assert store.pools.by_scope == {"Instance": {"a": {("a", "web")}}, "Pod": {}, "Node": {}}


def test_the_pool_spec_version_moves_on_spec_changes_only() -> None:
    store = Store()
    store.pools[("a", "web")] = {"spec": {"port": 1}}
    version = store.pools.spec_version
    store.pools[("a", "web")] = {"spec": {"port": 1}, "status": {"active": 3}}  # our own status write
    assert store.pools.spec_version == version
    store.pools[("a", "web")] = {"spec": {"port": 2}}
    assert store.pools.spec_version > version
    version = store.pools.spec_version
    store.pools.pop(("a", "web"))
    assert store.pools.spec_version > version


LABELS = st.dictionaries(st.sampled_from(["app", "tier", "zone"]), st.sampled_from(["a", "b"]), max_size=3)
SELECTORS = st.builds(lambda labels, exprs: LabelSelector.parse({"matchLabels": labels, "matchExpressions": exprs}),
                      st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["a", "b"]), max_size=2),
                      st.lists(st.builds(lambda key, op, values: {"key": key, "operator": op, "values": values},
                                         st.sampled_from(["app", "zone"]), st.sampled_from(["In", "NotIn"]),
                                         st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=2)),
                               max_size=2))
instance_steps = st.lists(st.tuples(st.sampled_from(["ns1", "ns2"]), st.sampled_from(["p1", "p2", "p3", "p4"]),
                                    st.none() | LABELS), max_size=40)


@settings(max_examples=300, deadline=None)
@given(instance_steps, SELECTORS, st.sampled_from(["ns1", "ns2", None]))
def test_label_index_candidates_hold_every_match(steps: list[tuple[str, str, dict[str, str] | None]],
                                                selector: LabelSelector, namespace: str | None) -> None:
    """Whatever came and went and relabelled, `candidates` yields each matching instance once, and
    only instances of the scope asked for: the reconcile may look at them instead of every one."""
    store = Store()
    for ns, name, labels in steps:
        if labels is None:
            store.drop_instance("Pod", ns, name)
        else:
            store.put_instance(InstanceState("Pod", ns, name, f"uid-{name}", "10.0.0.1", labels, Phase.UP, "r"))
    every = list(store.instances_of("Pod", namespace))
    found = list(store.candidates("Pod", namespace, selector))
    assert len(found) == len({(s.namespace, s.name) for s in found})
    assert all(s in every for s in found)
    assert {(s.namespace, s.name) for s in every if selector.matches(s.labels)} <= \
        {(s.namespace, s.name) for s in found}
    # the index holds nothing stale: each posting names a live instance carrying that label
    for ns, postings in store.by_label.get("Pod", {}).items():
        for (key, value), names in postings.items():
            assert names and all(store.get_instance("Pod", ns, n).labels.get(key) == value  # type: ignore[union-attr]
                                 for n in names)


def test_label_index_narrows_to_the_required_label() -> None:
    store = Store()
    for i in range(200):
        store.put_instance(InstanceState("Pod", "ns", f"p{i}", f"u{i}", "10.0.0.1", {"app": f"a{i % 20}"},
                                         Phase.UP, "r"))
    found = list(store.candidates("Pod", "ns", LabelSelector.parse({"matchLabels": {"app": "a3"}})))
    assert sorted(s.name for s in found) == sorted(f"p{i}" for i in range(3, 200, 20))
    assert len(list(store.candidates("Pod", "ns", LabelSelector.parse({})))) == 200
