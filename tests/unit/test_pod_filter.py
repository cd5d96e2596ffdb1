"""--pod-label-selector: a pod relabelled out of the filter arrives as DELETED but still runs."""

from __future__ import annotations

import pytest

from poolkeeper.core.selectors import SelectorError
from poolkeeper.sources.convert import left_filter, parse_label_query


@pytest.mark.parametrize(("text", "labels", "matches"), [
    ("poolkeeper.dev/member", {"poolkeeper.dev/member": ""}, True),
    ("poolkeeper.dev/member", {}, False),
    ("!canary", {"canary": "1"}, False),
    ("tier=web,env!=dev", {"tier": "web", "env": "prod"}, True),
    ("tier==web", {"tier": "api"}, False),
    ("env in (prod, staging)", {"env": "staging"}, True),
    ("env notin (prod)", {"env": "prod"}, False),
])
def test_label_queries_match_as_the_api_server_filters(text: str, labels: dict[str, str], matches: bool) -> None:
    selector = parse_label_query(text)
    assert selector.matches(labels) is matches
    assert parse_label_query(selector.to_query()) == selector


@pytest.mark.parametrize("text", ["a=b c", "!a=b", "=b", "a in (x"])
def test_bad_queries_are_refused(text: str) -> None:
    with pytest.raises(SelectorError):
        parse_label_query(text)


def pod(labels: dict[str, str], deleting: bool = False, uid: str = "u1") -> dict[str, object]:
    meta: dict[str, object] = {"name": "p", "namespace": "ns", "uid": uid, "labels": labels}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta}


def test_only_a_pod_that_still_runs_outside_the_filter_left_it() -> None:
    member = parse_label_query("member=yes")
    gone = pod({"member": "yes"})  # a filtered watch's DELETED carries the object as it last matched
    assert left_filter(gone, pod({"member": "no"}), member)
    assert not left_filter(gone, None, member), "not there any more: deleted"
    assert not left_filter(gone, pod({"member": "no"}, deleting=True), member), "being deleted: a deletion"
    assert not left_filter(gone, pod({"member": "no"}, uid="u2"), member), "a new pod of the same name"
    assert not left_filter(gone, pod({"member": "yes"}), member), "inside the filter again"
