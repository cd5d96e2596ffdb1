"""Records share the label maps and names many instances repeat, and the informer keeps its
identities per namespace: memory at 100,000 pods (issue 10) without changing what anyone reads."""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest

from poolkeeper.core.compact import NO_ENTRIES, shared_labels, shared_name
from poolkeeper.kube.informer import Identities
from poolkeeper.sources.convert import node_state, pod_state


def pod(name: str, labels: dict[str, str] | None, gates: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns-" + "a" * 3, "name": name, "uid": f"u-{name}", "labels": labels},
            "spec": {"readinessGates": [{"conditionType": g} for g in gates]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "podIP": "198.18.0.1"}}


def test_equal_label_maps_are_one_object_and_their_strings_are_interned() -> None:
    a = pod_state(pod("a", {"app": "web", "pod-template-hash": "7d9f"}))
    b = pod_state(pod("b", {"app": "web", "pod-template-hash": "7d9f"}))
    c = pod_state(pod("c", {"app": "web", "pod-template-hash": "0000"}))
    assert a.labels is b.labels and a.labels == {"app": "web", "pod-template-hash": "7d9f"}
    assert c.labels is not a.labels and c.labels["pod-template-hash"] == "0000"
    for key, value in a.labels.items():
        assert key is sys.intern(key) and value is sys.intern(value)
    assert a.namespace is b.namespace is sys.intern("ns-aaa")


def test_a_shared_map_goes_with_its_last_record() -> None:
    state = pod_state(pod("a", {"unique-label": "only-once-7f3a"}))
    assert shared_labels({"unique-label": "only-once-7f3a"}) is state.labels
    del state
    gc.collect()
    fresh = shared_labels({"unique-label": "only-once-7f3a"})
    assert fresh == {"unique-label": "only-once-7f3a"}


def test_records_without_labels_or_gates_share_one_read_only_empty_map() -> None:
    state = pod_state(pod("a", None))
    assert state.labels is NO_ENTRIES and state.gates is NO_ENTRIES
    assert node_state({"metadata": {"name": "n"}}).gates is NO_ENTRIES
    with pytest.raises(TypeError):
        NO_ENTRIES["x"] = "y"  # type: ignore[index]


def test_gates_are_still_read_per_pod() -> None:
    state = pod_state(pod("a", {"app": "web"}, gates=("poolkeeper.dev/ready", "other/gate")))
    assert dict(state.gates) == {"poolkeeper.dev/ready": ""}


def test_shared_name_interns_strings_only() -> None:
    assert shared_name("".join(["ns-", "b"])) is sys.intern("ns-b")


def test_identities_diff_put_drop_and_compare() -> None:
    old, new = Identities(), Identities()
    old.put("ns", "a", "1")
    old.put("ns", "b", "2")
    old.put("", "node-1", "3")
    new.put("ns", "a", "1")
    assert sorted(old.missing_from(new)) == [("", "node-1", "3"), ("ns", "b", "2")]
    assert old.uid("ns", "b") == "2" and old.uid("ns", "zz") is None and old.uid("other", "a") is None
    old.drop("ns", "b")
    old.drop("", "node-1")
    old.drop("missing", "x")
    assert old == new and old == {"ns/a": "1"} and len(old) == 1 and old.keys() == {"ns/a"}
    assert old != Identities()
