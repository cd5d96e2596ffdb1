"""Certificates for the local control plane, made with the `openssl` command.

Like envtest: one CA, a serving certificate for 127.0.0.1/localhost, an admin client
certificate in `system:masters`, and a service-account signing key pair. For a real node, as
`hack/local-up-cluster.sh` does: a client certificate per component in the identity its RBAC
and the Node authorizer expect, and a kubelet serving certificate.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path
    folder: Path

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of a component's client identity made by ensure_pki."""
        return self.folder / f"{name}.crt", self.folder / f"{name}.key"


# Node-side identities: file name -> subject. The kubelet's is what the Node authorizer requires.
NODE_NAME = "poolkeeper-node"
CLIENTS = {
    "kubelet": f"/O=system:nodes/CN=system:node:{NODE_NAME}",
    "kube-proxy": "/CN=system:kube-proxy",
    "kube-scheduler": "/CN=system:kube-scheduler",
    "apiserver-kubelet-client": "/O=system:masters/CN=kube-apiserver-kubelet-client",
}
# The node's address on its bridge and the first Service address (the `kubernetes` Service).
NODE_IP = "198.18.0.1"
KUBERNETES_SERVICE_IP = "198.19.0.1"
CLIENT_EXT = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def _signed(folder: Path, name: str, subject: str, extensions: str) -> None:
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "3650", "-out", f"{name}.crt", "-extfile", ext.name, cwd=folder)


def ensure_pki(folder: Path) -> Pki:
    """Create the certificates once; later calls reuse them (so `up` twice is safe)."""
    folder.mkdir(parents=True, exist_ok=True)
    pki = Pki(
        ca_cert=folder / "ca.crt", ca_key=folder / "ca.key",
        serving_cert=folder / "apiserver.crt", serving_key=folder / "apiserver.key",
        admin_cert=folder / "admin.crt", admin_key=folder / "admin.key",
        sa_key=folder / "sa.key", sa_pub=folder / "sa.pub", folder=folder,
    )
    made = [pki.ca_cert, pki.serving_cert, pki.admin_cert, pki.sa_pub, folder / "kubelet-serving.crt",
            *(pki.client(name)[0] for name in CLIENTS)]
    if all(p.exists() for p in made):
        return pki
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=poolkeeper-devcluster-ca", cwd=folder)
    _signed(folder, "apiserver", "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            f"DNS:kubernetes.default.svc,IP:{NODE_IP},IP:{KUBERNETES_SERVICE_IP}\n")
    _signed(folder, "admin", "/O=system:masters/CN=admin", CLIENT_EXT)
    for name, subject in CLIENTS.items():
        _signed(folder, name, subject, CLIENT_EXT)
    _signed(folder, "kubelet-serving", f"/CN={NODE_NAME}",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:{NODE_IP},DNS:{NODE_NAME}\n")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=folder)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)
    return pki
