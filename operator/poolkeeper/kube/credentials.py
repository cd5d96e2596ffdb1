"""Credentials shared by kopf's watches and our own client: in-cluster first, then kubeconfig."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import kopf

log = logging.getLogger(__name__)


def load_credentials(kubeconfig: str | None = None) -> kopf.ConnectionInfo:
    """The same ConnectionInfo kopf would pick, so both clients talk as one identity."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    info = None
    if not os.environ.get("KUBECONFIG") and os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"):
        info = kopf.login_with_service_account(logger=log, settings=kopf.OperatorSettings())
        server = in_cluster_server(os.environ)
        if info is not None and server:
            info = dataclasses.replace(info, server=server)
    if info is None:
        info = kopf.login_with_kubeconfig(logger=log, settings=kopf.OperatorSettings())
    if info is None:
        raise kopf.LoginError("no credentials: neither in-cluster nor a kubeconfig (set --kubeconfig)")
    return info


def in_cluster_server(env: Mapping[str, str]) -> str | None:
    """The API server as client-go's InClusterConfig finds it: the `kubernetes` Service's address
    from the environment the kubelet sets. kopf names https://kubernetes.default.svc instead, which
    needs cluster DNS (not every cluster has it, and it adds a lookup to every connection)."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
