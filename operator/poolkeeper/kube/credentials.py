"""Credentials for our client (every watch and request) and kopf's login: in-cluster first, then
kubeconfig. Loaded again when the API server answers 401: a projected ServiceAccount token rotates."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import kopf

log = logging.getLogger(__name__)

DEFAULT_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Where the Deployment mounts the operator's projected token (token, ca.crt, namespace) instead of
# the default path, which every process in the container (handler functions too) would look at.
SERVICE_ACCOUNT_DIR_ENV = "POOLKEEPER_SERVICEACCOUNT_DIR"
HANDLER_CREDENTIALS = ("none", "operator")
DNS_SERVER = "https://kubernetes.default.svc"  # only when the kubelet's KUBERNETES_SERVICE_* are absent


def service_account_dir(env: Mapping[str, str]) -> str:
    return env.get(SERVICE_ACCOUNT_DIR_ENV) or DEFAULT_SERVICE_ACCOUNT_DIR


def load_credentials(kubeconfig: str | None = None) -> kopf.ConnectionInfo:
    """The same ConnectionInfo kopf would pick, so both clients talk as one identity."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    info = None
    folder = service_account_dir(os.environ)
    if not os.environ.get("KUBECONFIG") and os.path.exists(os.path.join(folder, "token")):
        info = _service_account_login(folder, in_cluster_server(os.environ) or DNS_SERVER)
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


def _service_account_login(folder: str, server: str) -> kopf.ConnectionInfo:
    """kopf.login_with_service_account, but from `folder` (it reads only the default path)."""
    def read(name: str) -> str | None:
        path = os.path.join(folder, name)
        return Path(path).read_text(encoding="utf-8").strip() or None if os.path.exists(path) else None
    ca_path = os.path.join(folder, "ca.crt")
    return kopf.ConnectionInfo(server=server,
                               ca_path=ca_path if os.path.exists(ca_path) else None,
                               token=read("token"), default_namespace=read("namespace"))


def handler_kubeconfig(mode: str, kubeconfig: str | None, folder: Path,
                       env: Mapping[str, str] | None = None) -> str | None:
    """The KUBECONFIG Python handler functions get: None (the default, `--handler-credentials none`:
    they get no credentials at all), or with `operator` the operator's own identity: its kubeconfig,
    or in a cluster a kubeconfig written to `folder` that names the token file (so rotation works)."""
    if mode == "none":
        return None
    if mode != "operator":
        raise ValueError(f"--handler-credentials must be one of {', '.join(HANDLER_CREDENTIALS)}, not {mode!r}")
    env = os.environ if env is None else env
    if kubeconfig or env.get("KUBECONFIG"):
        return kubeconfig or env["KUBECONFIG"]
    sa_dir = service_account_dir(env)
    cluster: dict[str, object] = {"server": in_cluster_server(env) or DNS_SERVER}
    if os.path.exists(os.path.join(sa_dir, "ca.crt")):
        cluster["certificate-authority"] = os.path.join(sa_dir, "ca.crt")
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "operator",
              "clusters": [{"name": "in-cluster", "cluster": cluster}],
              "users": [{"name": "operator", "user": {"tokenFile": os.path.join(sa_dir, "token")}}],
              "contexts": [{"name": "operator", "context": {"cluster": "in-cluster", "user": "operator"}}]}
    path = folder / f"poolkeeper-handlers-{os.getpid()}.kubeconfig"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(config, out)
    return str(path)
