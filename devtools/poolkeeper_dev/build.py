"""Build the control-plane binaries from our Go module, cached by a hash of their inputs.

A warm start must not rebuild: binaries live in a cache folder named after the hash of the
Go module files and build flags, so a fresh clone on the same machine reuses them at no cost.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

KUBERNETES_VERSION = "v1.34.2"
BINARIES = (
    "etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "kube-scheduler", "kubelet", "kube-proxy",
)
_MAJOR, _MINOR = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
LDFLAGS = " ".join(
    ["-s", "-w"]
    + [
        f"-X {pkg}.{name}={value}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for name, value in (("gitVersion", KUBERNETES_VERSION), ("gitMajor", _MAJOR), ("gitMinor", _MINOR))
    ]
)


class BuildError(RuntimeError):
    """The Go build failed; the message carries the compiler's output tail."""


def go_module_dir() -> Path:
    """The `devcluster/` Go module at the repository root (or POOLKEEPER_GO_MODULE)."""
    override = os.environ.get("POOLKEEPER_GO_MODULE")
    if override:
        return Path(override)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "devcluster" / "go.mod"
        if candidate.exists():
            return candidate.parent
    raise BuildError("cannot find the devcluster/ Go module; set POOLKEEPER_GO_MODULE")


def _inputs_hash(module: Path) -> str:
    digest = hashlib.sha256(LDFLAGS.encode())
    files = [module / "go.mod", module / "go.sum", *sorted((module / "cmd").rglob("*.go"))]
    for path in files:
        digest.update(str(path.relative_to(module)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("POOLKEEPER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "poolkeeper"
    )
    return Path(base) / "devcluster-bin"


def ensure_binaries(log: bool = True) -> Path:
    """Return a folder holding every binary in BINARIES, building them only when missing."""
    module = go_module_dir()
    target = cache_dir() / f"{KUBERNETES_VERSION}-{_inputs_hash(module)}"
    if all((target / name).exists() for name in BINARIES):
        return target
    if shutil.which("go") is None:
        raise BuildError("the `go` command is not on PATH; install Go 1.24 or newer")
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if log:
        print(f"devcluster: building {', '.join(BINARIES)} (Kubernetes {KUBERNETES_VERSION}); "
              "a cold build takes several minutes", flush=True)
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "-buildvcs=false")
    proc = subprocess.run(
        ["go", "build", "-trimpath", "-ldflags", LDFLAGS, "-o", str(staging) + "/", "./cmd/..."],
        cwd=module, env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise BuildError(f"go build failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
