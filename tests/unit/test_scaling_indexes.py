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


LABELS = st.dictionaries(st.sampled_from(["app", "tier", "zone"]), st.sampled_from(["a", "b", "c"]), max_size=3)
GATES = st.dictionaries(st.sampled_from(["poolkeeper.dev/web", "poolkeeper.dev/api"]),
                        st.sampled_from(["True", "False"]), max_size=2)
instance_steps = st.lists(st.tuples(st.sampled_from(["Pod", "Node"]), st.sampled_from(["n1", "n2"]),
                                    st.sampled_from([f"i{i}" for i in range(6)]), st.none() | st.tuples(LABELS, GATES)),
                          max_size=40)
requirements = st.lists(st.tuples(st.sampled_from(["app", "tier"]),
                                  st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
                                  st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2)), max_size=2)


def selector(reqs: list[tuple[str, str, list[str]]]) -> LabelSelector:
    return LabelSelector.parse({"matchExpressions": [
        {"key": k, "operator": op, **({"values": v} if op in ("In", "NotIn") else {})} for k, op, v in reqs]})


@settings(max_examples=300, deadline=None)
@given(instance_steps, st.lists(requirements, min_size=1, max_size=2))
def test_the_label_and_gate_indexes_find_what_a_scan_finds(
        steps: list[tuple[str, str, str, Any]], selectors: list[list[tuple[str, str, list[str]]]]) -> None:
    """After any puts and drops (labels and gates changing on the way), the instances the indexes
    hand a pool match its selectors exactly as a scan of the namespace would find them."""
    store, parsed = Store(), [selector(s) for s in selectors]
    for kind, namespace, name, change in steps:
        scope = "" if kind == "Node" else namespace
        if change is None:
            store.drop_instance(kind, scope, name)
        else:
            labels, gates = change
            store.put_instance(InstanceState(kind, scope, name, f"uid-{name}", "10.0.0.1", labels, Phase.UP, "",
                                             gates if kind == "Pod" else {}))
        for kind_, scope_ in (("Pod", "n1"), ("Pod", "n2"), ("Node", None)):
            found = store.selected(kind_, scope_, parsed)
            assert len({i.name for i in found}) == len(found)  # each once
            assert {i.name for i in found if any(s.matches(i.labels) for s in parsed)} == \
                {i.name for i in store.instances_of(kind_, scope_) if any(s.matches(i.labels) for s in parsed)}
        for namespace_ in ("n1", "n2"):
            for gate in ("poolkeeper.dev/web", "poolkeeper.dev/api"):
                gated = [p.name for p in store.gated(namespace_, gate)]
                assert len(set(gated)) == len(gated)
                assert set(gated) == {p.name for p in store.instances_of("Pod", namespace_) if gate in p.gates}
    for kind, namespace, name, _ in steps:
        store.drop_instance(kind, "" if kind == "Node" else namespace, name)
    assert store.by_label == {} and store.by_gate == {}  # nothing left behind


def test_a_selector_naming_a_value_looks_only_at_the_instances_carrying_it() -> None:
    store = Store()
    for i in range(100):
        store.put_instance(InstanceState("Pod", "ns", f"p{i}", f"u{i}", "10.0.0.1", {"app": f"a{i % 10}"},
                                         Phase.UP, ""))

    def app(value: str) -> list[str]:
        return [p.name for p in store.selected("Pod", "ns", [LabelSelector.parse({"matchLabels": {"app": value}})])]
    found = store.selected("Pod", "ns", [LabelSelector.parse({"matchLabels": {"app": "a3"}})])
    assert [p.name for p in found] == [f"p{i}" for i in range(3, 100, 10)]
    # a selector with no value to look up (only NotIn / Exists): every pod of the namespace
    assert len(store.selected("Pod", "ns", [selector([("app", "Exists", ["a"])])])) == 100
    # relabelled: found under its new value only
    store.put_instance(InstanceState("Pod", "ns", "p3", "u3", "10.0.0.1", {"app": "a4"}, Phase.UP, ""))
    assert "p3" not in app("a3") and "p3" in app("a4")
