"""Pods and Nodes are decoded with a schema of the fields the operator reads: what the sources
make of them is the same as from the whole object, and a payload that does not fit is decoded
whole, never dropped."""

from __future__ import annotations

import json
from typing import Any

import pytest

from poolkeeper.kube.decoding import NODE, POD, Schema, decode, encode
from poolkeeper.sources.convert import left_filter, node_state, parse_label_query, pod_state

MANAGED = [{"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {"f:podIP": {}}}}]


def pod(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "resourceVersion": "7",
                     "labels": {"app": "web"}, "managedFields": MANAGED, "annotations": {"a": "b"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 80}]}],
                 "readinessGates": [{"conditionType": "poolkeeper.dev/shop.web"}, {"conditionType": "other/x"}]},
        "status": {"phase": "Running", "podIP": "198.18.0.9", "hostIP": "198.18.0.1",
                   "conditions": [{"type": "ContainersReady", "status": "True", "lastTransitionTime": "t"},
                                  {"type": "Ready", "status": "False"},
                                  {"type": "poolkeeper.dev/shop.web", "status": "True"}],
                   "containerStatuses": [{"name": "c", "ready": True, "restartCount": 0}]}}
    for path, value in over.items():
        *parents, leaf = path.split("__")
        node = body
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return body


def node(**status: Any) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": "n1", "uid": "u-n", "labels": {"zone": "a"}, "managedFields": MANAGED},
            "spec": {"unschedulable": True, "providerID": "aws:///eu-west-1a/i-0123456789abcdef0",
                     "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                     {"type": "InternalIP", "address": "198.18.1.1"}],
                       "conditions": [{"type": "Ready", "status": "True"}], "images": [{"names": ["x"]}], **status}}


PODS = [pod(), pod(metadata__deletionTimestamp="2026-12-03T00:00:00Z"), pod(status__phase="Failed"),
        pod(spec__readinessGates=None), pod(status__podIP=None), pod(metadata__labels=None),
        pod(status__conditions=[{"type": "Ready", "status": "True"}], spec__readinessGates=[])]


@pytest.mark.parametrize("body", PODS)
def test_a_pod_reads_the_same_from_its_schema(body: dict[str, Any]) -> None:
    data = json.dumps({"type": "MODIFIED", "object": body}).encode()
    lean, whole = POD.event(data)["object"], json.loads(data)["object"]
    assert "managedFields" not in lean["metadata"] and "containers" not in lean["spec"]
    assert pod_state(lean) == pod_state(whole)
    assert pod_state(lean, deleted=True) == pod_state(whole, deleted=True)
    selector = parse_label_query("app=other")
    assert left_filter(lean, lean, selector) == left_filter(whole, whole, selector)


@pytest.mark.parametrize("extra", [{}, {"conditions": [{"type": "Ready", "status": "False"}]}, {"addresses": None}])
def test_a_node_reads_the_same_from_its_schema(extra: dict[str, Any]) -> None:
    data = json.dumps({"kind": "NodeList", "metadata": {"resourceVersion": "9", "continue": "tok"},
                       "items": [node(**extra)]}).encode()
    lean, whole = NODE.page(data), json.loads(data)
    assert lean["metadata"] == {"resourceVersion": "9", "continue": "tok"} and lean["kind"] == "NodeList"
    assert "images" not in lean["items"][0]["status"]
    assert node_state(lean["items"][0]) == node_state(whole["items"][0])


def test_error_and_bookmark_events_keep_what_the_informer_reads() -> None:
    error = POD.event(b'{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"old"}}')
    assert error["object"] == {"kind": "Status", "code": 410, "reason": "Expired", "message": "old"}
    bookmark = POD.event(b'{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"12"}}}')
    assert bookmark["object"]["metadata"]["resourceVersion"] == "12"


def test_a_payload_that_does_not_fit_is_decoded_whole() -> None:
    schema = Schema(dict)
    odd = pod(spec__readinessGates="not a list")
    before = POD.fallbacks
    assert POD.event(json.dumps({"type": "ADDED", "object": odd}).encode())["object"] == odd
    assert POD.page(json.dumps({"items": "nope"}).encode()) == {"items": "nope"}
    assert POD.fallbacks == before + 2 and schema.fallbacks == 0
    with pytest.raises(ValueError):  # not JSON at all: the informer's error path, as with json.loads
        POD.event(b"{not json")


def test_whole_decoding_and_encoding_round_trip() -> None:
    body = {"status": {"members": [{"name": "a", "weight": 1.5, "ok": True, "none": None}], "ünï": "ç"}}
    assert decode(encode(body)) == body and decode(b"") is None
