"""Pure tenancy decisions: who may select Nodes, each namespace's share, what handler workers inherit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from poolkeeper.core.tenancy import (
    function_slots_per_namespace,
    http_slots_per_namespace,
    node_source_refusal,
    parse_node_source_namespaces,
)
from poolkeeper.functions.worker import handler_environment
from poolkeeper.kube.credentials import handler_kubeconfig


@pytest.mark.parametrize("text", [None, "", " ", "*"])
def test_default_allows_every_namespace(text: str | None) -> None:
    policy = parse_node_source_namespaces(text)
    assert policy is None
    assert node_source_refusal("Node", "anyone", {}, policy) is None


def test_name_list() -> None:
    policy = parse_node_source_namespaces("infra, ops")
    assert node_source_refusal("Node", "infra", None, policy) is None
    assert node_source_refusal("Node", "ops", {}, policy) is None
    why = node_source_refusal("Node", "tenant-a", {"team": "infra"}, policy)
    assert why is not None and "tenant-a" in why and "--node-source-namespaces=infra, ops" in why
    assert node_source_refusal("Pod", "tenant-a", {}, policy) is None  # only Node sources are restricted
    assert node_source_refusal("Instance", "tenant-a", {}, policy) is None


@pytest.mark.parametrize(("text", "labels", "allowed"), [
    ("poolkeeper.dev/node-sources=allowed", {"poolkeeper.dev/node-sources": "allowed"}, True),
    ("poolkeeper.dev/node-sources=allowed", {"poolkeeper.dev/node-sources": "no"}, False),
    ("poolkeeper.dev/node-sources==allowed", {}, False),
    ("tier in (infra, platform),!tenant", {"tier": "platform"}, True),
    ("tier in (infra, platform),!tenant", {"tier": "platform", "tenant": "x"}, False),
    ("tier notin (tenants)", {"tier": "infra"}, True),
    ("env!=prod", {"env": "prod"}, False),
])
def test_label_selector(text: str, labels: dict[str, str], allowed: bool) -> None:
    policy = parse_node_source_namespaces(text)
    assert (node_source_refusal("Node", "ns", labels, policy) is None) is allowed


def test_unknown_namespace_labels_refuse_under_a_selector() -> None:
    policy = parse_node_source_namespaces("a=b")
    assert node_source_refusal("Node", "ns", None, policy) is not None


@pytest.mark.parametrize("text", ["Not_A_Namespace", "a=b,(", "tier in (", "a=b,=c"])
def test_bad_values_raise(text: str) -> None:
    with pytest.raises(ValueError):
        parse_node_source_namespaces(text)


def test_shares() -> None:
    assert [function_slots_per_namespace(n) for n in (1, 2, 3, 8)] == [1, 1, 2, 7]
    assert http_slots_per_namespace(100) == 25
    assert http_slots_per_namespace(4, 2) == 2
    assert http_slots_per_namespace(4, 10) == 3  # always fewer than the total
    assert http_slots_per_namespace(1) == 1


def test_worker_environment_has_no_credentials() -> None:
    env = {"PATH": "/usr/bin", "HOME": "/home/op", "KUBECONFIG": "/etc/op.kubeconfig",
           "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443", "KUBERNETES_PORT": "tcp://x",
           "POOLKEEPER_SERVICEACCOUNT_DIR": "/var/run/secrets/poolkeeper/operator", "GITHUB_TOKEN": "t",
           "DB_PASSWORD": "p", "POD_NAMESPACE": "poolkeeper-system", "POOLKEEPER_AUDIT_LOG": "/tmp/a"}
    assert handler_environment(env, None) == {"PATH": "/usr/bin", "HOME": "/home/op", "KUBECONFIG": os.devnull,
                                              "POD_NAMESPACE": "poolkeeper-system", "POOLKEEPER_AUDIT_LOG": "/tmp/a"}
    assert handler_environment(env, "/tmp/granted")["KUBECONFIG"] == "/tmp/granted"


def test_handler_kubeconfig(tmp_path: Path) -> None:
    assert handler_kubeconfig("none", "/op.kubeconfig", tmp_path, {}) is None
    assert handler_kubeconfig("operator", "/op.kubeconfig", tmp_path, {}) == "/op.kubeconfig"
    assert handler_kubeconfig("operator", None, tmp_path, {"KUBECONFIG": "/a:/b"}) == "/a:/b"
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "ca.crt").write_text("ca")
    path = handler_kubeconfig("operator", None, tmp_path, {"POOLKEEPER_SERVICEACCOUNT_DIR": str(sa),
                                                          "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                                          "KUBERNETES_SERVICE_PORT": "443"})
    assert path is not None and oct(os.stat(path).st_mode & 0o777) == "0o600"
    config = json.loads(Path(path).read_text())
    assert config["clusters"][0]["cluster"] == {"server": "https://10.96.0.1:443",
                                                "certificate-authority": str(sa / "ca.crt")}
    assert config["users"][0]["user"] == {"tokenFile": str(sa / "token")}  # re-read: projected tokens rotate
    with pytest.raises(ValueError, match="handler-credentials"):
        handler_kubeconfig("everything", None, tmp_path, {})


def test_operator_reads_its_token_from_the_projected_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from poolkeeper.kube.credentials import load_credentials

    sa = tmp_path / "operator"
    sa.mkdir()
    (sa / "token").write_text("projected-token\n")
    (sa / "ca.crt").write_text("ca")
    (sa / "namespace").write_text("poolkeeper-system")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("POOLKEEPER_SERVICEACCOUNT_DIR", str(sa))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    info = load_credentials()
    assert (info.server, info.token, info.ca_path, info.default_namespace) == (
        "https://10.96.0.1:443", "projected-token", str(sa / "ca.crt"), "poolkeeper-system")
