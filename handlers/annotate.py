"""Record the last transition on the instance itself, as annotation poolkeeper.dev/last-transition.

The value is JSON: {"type": ..., "id": ..., "time": ..., "pool": "namespace/name"}, so
`kubectl get pod web-1 -o jsonpath='{.metadata.annotations.poolkeeper\\.dev/last-transition}'`
shows what poolkeeper last did with it. Works for Pods, Nodes and poolkeeper.dev Instances.
Uses the in-cluster service account, else the kubeconfig from $KUBECONFIG (or ~/.kube/config);
that identity needs `patch` on pods, nodes or instances.poolkeeper.dev.
Returns {"annotated": "Kind/namespace/name"}.

    apiVersion: poolkeeper.dev/v1alpha1
    kind: LifecycleHandler
    metadata:
      name: web-annotate
      namespace: default
    spec:
      poolRef:
        name: web
      events: [up, draining, down]
      function:
        type: Python
        python:
          handler: annotate.handle
      timeoutSeconds: 10
      retry:
        maxAttempts: 5
"""

from __future__ import annotations

import json
from typing import Any

ANNOTATION = "poolkeeper.dev/last-transition"
MERGE_PATCH = "application/merge-patch+json"

_api_client: Any = None  # kubernetes.client.ApiClient, made on first use and kept while the file is unchanged


def patch_body(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch that sets the annotation for `event`."""
    pool = (event.get("data") or {}).get("pool") or {}
    value = {
        "type": event["type"],
        "id": event["id"],
        "time": event["time"],
        "pool": f"{pool.get('namespace')}/{pool.get('name')}",
    }
    text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return {"metadata": {"annotations": {ANNOTATION: text}}}


def patch_target(event: dict[str, Any]) -> tuple[str, str, str]:
    """(kind, namespace, name) of the object to patch; ValueError for kinds it can't patch."""
    instance = (event.get("data") or {}).get("instance") or {}
    kind, namespace, name = instance.get("kind"), instance.get("namespace") or "", instance.get("name")
    if kind not in ("Pod", "Node", "Instance") or not name or (kind != "Node" and not namespace):
        raise ValueError(f"can't annotate {event.get('subject')!r}: only Pods, Nodes and Instances")
    return kind, namespace, name


def _client() -> Any:
    """A kubernetes ApiClient: in-cluster config, else the kubeconfig."""
    global _api_client
    if _api_client is None:
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            # Honours $KUBECONFIG, including several files joined by ":".
            config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        _api_client = client.ApiClient(configuration)
    return _api_client


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Patch the annotation onto the instance; see the module docstring."""
    from kubernetes import client

    kind, namespace, name = patch_target(event)
    body = patch_body(event)
    api = _client()
    if kind == "Pod":
        client.CoreV1Api(api).patch_namespaced_pod(name, namespace, body, _content_type=MERGE_PATCH)
    elif kind == "Node":
        client.CoreV1Api(api).patch_node(name, body, _content_type=MERGE_PATCH)
    else:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            "poolkeeper.dev", "v1alpha1", namespace, "instances", name, body, _content_type=MERGE_PATCH
        )
    subject = f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"
    context.log.info("annotated %s with %s", subject, ANNOTATION)
    return {"annotated": subject}
