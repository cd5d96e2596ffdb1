"""Certificates for the local control plane, made with the `openssl` command.

Like envtest: one CA, a serving certificate for 127.0.0.1/localhost, an admin client
certificate in `system:masters`, and a service-account signing key pair.
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


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def _signed(folder: Path, name: str, subject: str, extensions: str) -> None:
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
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
        sa_key=folder / "sa.key", sa_pub=folder / "sa.pub",
    )
    if all(p.exists() for p in vars(pki).values()):
        return pki
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=poolkeeper-devcluster-ca", cwd=folder)
    _signed(folder, "apiserver", "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,IP:10.0.0.1\n")
    _signed(folder, "admin", "/O=system:masters/CN=admin",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=folder)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)
    return pki
