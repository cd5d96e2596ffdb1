"""Credentials shared by kopf's watches and our own client: in-cluster first, then kubeconfig."""

from __future__ import annotations

import logging
import os

import kopf

log = logging.getLogger(__name__)


def load_credentials(kubeconfig: str | None = None) -> kopf.ConnectionInfo:
    """The same ConnectionInfo kopf would pick, so both clients talk as one identity."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    info = None
    if not os.environ.get("KUBECONFIG") and os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"):
        info = kopf.login_with_service_account(logger=log, settings=kopf.OperatorSettings())
    if info is None:
        info = kopf.login_with_kubeconfig(logger=log, settings=kopf.OperatorSettings())
    if info is None:
        raise kopf.LoginError("no credentials: neither in-cluster nor a kubeconfig (set --kubeconfig)")
    return info
