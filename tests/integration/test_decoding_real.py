"""Pods decoded with their schema (kube.decoding) come back from a real API server's list the same
as decoded whole."""

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
