"""Tenants against the outbox: the test plays a namespace user (ConfigMaps, Secrets, LifecycleHandlers in
their own namespace) and someone with rights in the operator's namespace who corrupts an outbox."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from poolkeeper.core.cloudevents import build_event
from poolkeeper.core.model import InstanceState, Phase
from poolkeeper.core.naming import member_name
from poolkeeper.core.transitions import Transition
from poolkeeper.lifecycle.outbox_records import instance_record, pending_record
from poolkeeper_dev import Cluster
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.standin_kubelet import FakeKubelet
from support.kube import (
    condition,
    create,
    delete,
    events_for,
    get,
    pod_pool,
    selectorless_service,
    slice_backend,
    token_kubeconfig,
    wait_for,
)
from support.pools import members
from support.receiver import Receiver

SYSTEM = "poolkeeper-system"
DATA_KEY = "outbox.json"


@pytest.fixture()
def victim(core: client.CoreV1Api, namespace: str) -> Iterator[str]:
    """Another tenant's namespace."""
    name = f"{namespace[:55]}-victim"
    core.create_namespace(body={"metadata": {"name": name, "labels": {"poolkeeper.dev/test": "true"}}})
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name=name)


def http_handler(name: str, url: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "LifecycleHandler", "metadata": {"name": name},
            "spec": {"poolRef": {"name": "web"}, "events": ["up"], "function": {"type": "HTTP", "http": {"url": url}},
                     **spec}}


def slice_pool(core: client.CoreV1Api, custom: client.CustomObjectsApi, namespace: str) -> dict[str, Any]:
    selectorless_service(core, namespace, "web")
    return create(custom, namespace, "targetpools", pod_pool("web", app="web", backend=slice_backend("web")))


def pod_up(kubelet: FakeKubelet, namespace: str, name: str, address: str) -> None:
    kubelet.create_pod(namespace, name, {"app": "web"})
    kubelet.set_ready(namespace, name, address)


def uid_of(custom: client.CustomObjectsApi, namespace: str, name: str) -> str:
    return str(get(custom, namespace, "lifecyclehandlers", name)["metadata"]["uid"])


def outbox_of(core: client.CoreV1Api, handler_uid: str) -> Any:
    """The handler's outbox ConfigMap in the operator's namespace, or None."""
    try:
        return core.read_namespaced_config_map(name=f"poolkeeper-outbox-{handler_uid}", namespace=SYSTEM)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def write_outbox(core: client.CoreV1Api, handler_uid: str, text: str) -> None:
    """What someone with rights in the operator's namespace could do (never a tenant: see the 403 test)."""
    body = {"metadata": {"name": f"poolkeeper-outbox-{handler_uid}"}, "data": {DATA_KEY: text}}
    try:
        core.replace_namespaced_config_map(name=body["metadata"]["name"], namespace=SYSTEM, body=body)
    except ApiException as exc:
        if exc.status != 404:
            raise
        core.create_namespaced_config_map(namespace=SYSTEM, body=body)


def has_event(core: client.CoreV1Api, namespace: str, name: str, reason: str) -> list[str]:
    return [message for r, message in events_for(core, namespace, name) if r == reason]


def ready(custom: client.CustomObjectsApi, namespace: str, name: str) -> bool:
    return condition(get(custom, namespace, "lifecyclehandlers", name), "Ready").get("status") == "True"


def test_tenant_old_style_outbox_is_never_read(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, receiver: Receiver) -> None:
    planted = {"poolkeeper-outbox-h": '{"pending":[{}]}', "poolkeeper-outbox-h2": "[]"}
    for name, text in planted.items():  # what broke every operator start before
        core.create_namespaced_config_map(namespace=namespace, body={"metadata": {"name": name},
                                                                     "data": {DATA_KEY: text}})
    slice_pool(core, custom, namespace)
    paths = {name: f"/ok/{namespace}/{name}" for name in ("h", "h2")}
    for name, path in paths.items():
        create(custom, namespace, "lifecyclehandlers", http_handler(name, receiver.url(path)))
    pod_up(kubelet, namespace, "web-0", "192.0.2.101")
    for path in paths.values():
        wait_for(lambda p=path: receiver.on(p), 20, f"delivery to {path}")  # type: ignore[misc]

    running_operator.stop()  # a start (or a standby's takeover) loads every handler's outbox
    running_operator.start()
    pod_up(kubelet, namespace, "web-1", "192.0.2.102")
    for path in paths.values():
        wait_for(lambda p=path: [r for r in receiver.on(p)  # type: ignore[misc]
                                 if r.headers["ce-subject"].endswith("/web-1")], 20, f"delivery after restart {path}")
    wait_for(lambda: members(custom, namespace, "web").get(f"Pod/{namespace}/web-1", {}).get("state") == "Active",
             20, "pool still served")
    for name, text in planted.items():  # never read, never written
        assert core.read_namespaced_config_map(name=name, namespace=namespace).data == {DATA_KEY: text}
    outbox = wait_for(lambda: outbox_of(core, uid_of(custom, namespace, "h")), 10, "the new outbox")
    assert outbox.metadata.labels["poolkeeper.dev/handler-namespace"] == namespace
    assert outbox.metadata.labels["poolkeeper.dev/handler-name"] == "h"
    assert outbox.metadata.annotations["poolkeeper.dev/handler"] == f"{namespace}/h"
    assert not has_event(core, namespace, "h", "OutboxRecordsDropped") and ready(custom, namespace, "h")


def test_a_tenant_can_not_write_the_outbox_namespace(
        cluster: Cluster, namespace: str, core: client.CoreV1Api, api_client: client.ApiClient,
        running_operator: OperatorProcess, tmp_path: Path) -> None:
    core.create_namespaced_service_account(namespace=namespace, body={"metadata": {"name": "tenant"}})
    client.RbacAuthorizationV1Api(api_client).create_namespaced_role_binding(namespace=namespace, body={
        "metadata": {"name": "tenant-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}]})
    existing = f"poolkeeper-outbox-{uuid.uuid4()}"
    core.create_namespaced_config_map(namespace=SYSTEM, body={"metadata": {"name": existing}, "data": {DATA_KEY: "{}"}})
    tenant_api = config.new_client_from_config(config_file=str(token_kubeconfig(cluster, tmp_path, "tenant",
                                                                                 namespace)))
    tenant = client.CoreV1Api(tenant_api)
    forged = {"metadata": {"name": f"poolkeeper-outbox-{uuid.uuid4()}"}, "data": {DATA_KEY: '{"pending":[{}]}'}}
    try:
        # the identity works: a tenant may write ConfigMaps in its own namespace ...
        wait_for(lambda: tenant.create_namespaced_config_map(namespace=namespace, body=forged), 10, "tenant's own")
        attempts = [  # ... and nothing in the operator's
            lambda: tenant.create_namespaced_config_map(namespace=SYSTEM, body=forged),
            lambda: tenant.replace_namespaced_config_map(name=existing, namespace=SYSTEM, body=forged),
            lambda: tenant.patch_namespaced_config_map(name=existing, namespace=SYSTEM, body=forged),
            lambda: tenant.delete_namespaced_config_map(name=existing, namespace=SYSTEM),
            lambda: tenant.list_namespaced_config_map(namespace=SYSTEM),
        ]
        for attempt in attempts:
            with pytest.raises(ApiException) as refused:
                attempt()
            assert refused.value.status == 403, refused.value
        assert core.read_namespaced_config_map(name=existing, namespace=SYSTEM).data == {DATA_KEY: "{}"}
    finally:
        tenant_api.close()
        core.delete_namespaced_config_map(name=existing, namespace=SYSTEM)


def forged_record(handler_uid: str, victim: str, pool_uid: str, pod: Any) -> dict[str, Any]:
    """A well-formed, blocking `up` record for another namespace's member: what the review's attack wrote."""
    inst = InstanceState("Pod", victim, pod.metadata.name, pod.metadata.uid, "192.0.2.120", {"app": "web"},
                         Phase.UP, "ready")
    t = Transition(inst, member_name(victim, "web", inst.uid), "up", "none", "up", 1, "ready")
    event = build_event(handler_uid=handler_uid, pool_uid=pool_uid, pool_namespace=victim, pool_name="web",
                        instance={**instance_record(inst), "port": 8080}, event_type="up", sequence=1,
                        from_state="none", to_state="up", reason="ready", time=datetime.now(UTC))
    return pending_record(event, t, (victim, "web"), blocking=True, order=1)


def test_corrupted_outboxes_are_dropped_at_startup_with_events(
        running_operator: OperatorProcess, namespace: str, victim: str, core: client.CoreV1Api,
        custom: client.CustomObjectsApi, kubelet: FakeKubelet, receiver: Receiver) -> None:
    victim_pool = slice_pool(core, custom, victim)
    pod_up(kubelet, victim, "v-0", "192.0.2.120")
    victim_ref = f"Pod/{victim}/v-0"
    wait_for(lambda: members(custom, victim, "web").get(victim_ref, {}).get("state") == "Active", 20, "victim Active")
    slice_pool(core, custom, namespace)
    path = f"/ok/{namespace}/forged"
    create(custom, namespace, "lifecyclehandlers", http_handler("forged", receiver.url(path), blocking=True,
                                                                onFailure="Abandon"))
    for name in ("badjson", "bloated"):
        create(custom, namespace, "lifecyclehandlers", http_handler(name, receiver.url(f"/ok/{namespace}/{name}")))
    uids = {name: uid_of(custom, namespace, name) for name in ("forged", "badjson", "bloated")}
    wait_for(lambda: all(ready(custom, namespace, n) for n in uids), 20, "handlers Ready")

    running_operator.stop()
    victim_pod = core.read_namespaced_pod(name="v-0", namespace=victim)
    write_outbox(core, uids["forged"], json.dumps({
        "announced": {victim_pool["metadata"]["uid"]: {victim_pod.metadata.uid: {"state": "up", "seq": 1}}},
        "pending": [forged_record(uids["forged"], victim, victim_pool["metadata"]["uid"], victim_pod),
                    {"event": "x", "pool": 7}, [], None]}))
    write_outbox(core, uids["badjson"], '{"pending": [')
    write_outbox(core, uids["bloated"], '{"pending":[' + ",".join(["{}"] * 100_000) + "]}")
    running_operator.start()  # load at startup: drops, never raises

    for name, expect in (("forged", "is not the handler's pool"), ("badjson", "not valid JSON"),
                         ("bloated", "over the cap")):
        messages = wait_for(lambda n=name: has_event(core, namespace, n,  # type: ignore[misc]
                                                     "OutboxRecordsDropped"), 20, f"Event on {name}")
        assert expect in messages[0], messages
    assert "dropped 5 outbox record(s)" in has_event(core, namespace, "forged", "OutboxRecordsDropped")[0]
    # the forged blocking hook never ran, so it never held the victim's member nor spoke on its pool
    time.sleep(1.5)
    assert members(custom, victim, "web")[victim_ref]["state"] == "Active"
    assert not has_event(core, victim, "web", "LifecycleHook")
    assert not [r for r in receiver.on(path) if victim in r.headers["ce-subject"]]
    # written back without what was dropped, and the handlers work as before
    wait_for(lambda: victim not in (outbox_of(core, uids["forged"]).data or {}).get(DATA_KEY, ""), 20, "rewritten")
    pod_up(kubelet, namespace, "web-0", "192.0.2.121")
    wait_for(lambda: receiver.on(path), 20, "forged's handler still delivers")
    wait_for(lambda: receiver.on(f"/ok/{namespace}/bloated"), 20, "bloated's handler still delivers")
    ref = f"Pod/{namespace}/web-0"
    wait_for(lambda: members(custom, namespace, "web").get(ref, {}).get("state") == "Active", 20, "own member Active")


def test_outbox_is_deleted_with_its_handler(
        running_operator: OperatorProcess, namespace: str, core: client.CoreV1Api, custom: client.CustomObjectsApi,
        kubelet: FakeKubelet, receiver: Receiver) -> None:
    slice_pool(core, custom, namespace)
    names = ("online", "offline")
    for name in names:
        create(custom, namespace, "lifecyclehandlers", http_handler(name, receiver.url(f"/ok/{namespace}/{name}")))
    uids = {name: uid_of(custom, namespace, name) for name in names}
    pod_up(kubelet, namespace, "web-0", "192.0.2.130")
    for uid in uids.values():
        wait_for(lambda u=uid: outbox_of(core, u), 20, "outbox written")  # type: ignore[misc]

    delete(custom, namespace, "lifecyclehandlers", "online")
    wait_for(lambda: outbox_of(core, uids["online"]) is None, 20, "deleted with its handler")

    running_operator.stop()  # deleted while no operator watches: collected at the next start
    delete(custom, namespace, "lifecyclehandlers", "offline")
    running_operator.start()
    wait_for(lambda: outbox_of(core, uids["offline"]) is None, 20, "collected at startup")


@pytest.mark.parametrize(("handler", "expect"), [
    ("audit.__class__", "'__class__' is private"),
    ("annotate._client", "'_client' is private"),
])
def test_resolver_refuses_what_is_not_a_public_function(
        running_operator: OperatorProcess, namespace: str, custom: client.CustomObjectsApi, handler: str,
        expect: str) -> None:
    create(custom, namespace, "lifecyclehandlers", {
        "kind": "LifecycleHandler", "metadata": {"name": "sneaky"},
        "spec": {"poolRef": {"name": "web"}, "events": ["up"],
                 "function": {"type": "Python", "python": {"handler": handler}}}})
    cond = wait_for(lambda: (c := condition(get(custom, namespace, "lifecyclehandlers", "sneaky"), "Ready")) and
                    c.get("status") == "False" and c, 20, "Ready False")
    assert cond["reason"] == "HandlerLoadFailed" and expect in cond["message"], cond
