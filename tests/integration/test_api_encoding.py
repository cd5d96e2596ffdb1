"""Answers of the real API server come uncompressed unless --api-compression asks for gzip, and
Pods decoded with their schema (kube.decoding) come back from a real list the same as whole."""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes import client

from poolkeeper.kube.api import KubeApi, resource_path
from poolkeeper.kube.credentials import load_credentials
from poolkeeper.kube.decoding import POD
from poolkeeper.sources.convert import pod_state
from poolkeeper_dev import Cluster
from poolkeeper_dev.standin_kubelet import FakeKubelet

BIG = 128 * 1024  # the API server compresses answers from this size on


def test_answers_are_uncompressed_unless_asked_for(cluster: Cluster) -> None:
    info = load_credentials(str(cluster.kubeconfig))

    async def fetch(compression: bool) -> tuple[str | None, int]:
        api = KubeApi(info, compression=compression)
        try:
            async with api.session.get(api.server + "/openapi/v2", headers=api.headers) as resp:
                assert resp.status == 200
                return resp.headers.get("Content-Encoding"), len(await resp.read())
        finally:
            await api.close()

    plain, gzipped = asyncio.run(fetch(False)), asyncio.run(fetch(True))
    assert plain[1] > BIG, "a large answer, which the API server would compress if asked"
    assert plain[0] is None, f"uncompressed by default, got Content-Encoding {plain[0]}"
    assert gzipped[0] == "gzip" and gzipped[1] == plain[1], "--api-compression: gzip, decoded the same"


def test_a_real_pod_list_reads_the_same_through_the_schema(cluster: Cluster, kubelet: FakeKubelet,
                                                           core: client.CoreV1Api, namespace: str) -> None:
    for index in range(3):
        kubelet.create_pod(namespace, f"web-{index}", {"app": "web", "pod-template-hash": "abc"})
    info = load_credentials(str(cluster.kubeconfig))

    async def both() -> tuple[Any, Any]:
        api = KubeApi(info)
        try:
            path = resource_path("v1", "pods", namespace)
            return await api.get(path, decode=POD.page), await api.get(path)
        finally:
            await api.close()

    lean, whole = asyncio.run(both())
    assert len(lean["items"]) == len(whole["items"]) == 3 and lean["metadata"]["resourceVersion"]
    assert [pod_state(p) for p in lean["items"]] == [pod_state(p) for p in whole["items"]]
    assert "managedFields" in whole["items"][0]["metadata"] and "managedFields" not in lean["items"][0]["metadata"]
