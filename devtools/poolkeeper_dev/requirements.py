"""What each development task needs from the machine, checked before any slow step starts.

`make`, `.ci/run`, the test fixtures and `devcluster up` share this one table, so a fresh machine
either gets what it lacks from Debian's packages (when we are root and apt-get exists) or stops at
once with one line naming what to install, instead of failing ten minutes into a build.
Standard library only: `.ci/run` runs it before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class MissingRequirement(RuntimeError):
    """A program the task needs is absent and could not be installed; the message says what to install."""


@dataclass(frozen=True)
class Need:
    """One program: where it may be found and which Debian package brings it (None: not from apt)."""

    name: str
    paths: tuple[str, ...]
    package: str | None
    hint: str = ""

    def present(self) -> bool:
        for path in self.paths:
            if "/" in path:
                if os.path.exists(path):
                    return True
            elif shutil.which(path):
                return True
        return False


GO = Need("go", ("go", "/usr/local/go/bin/go"), None, "install Go 1.24 or newer (https://go.dev/dl) and put it on PATH")
NEEDS: dict[str, tuple[Need, ...]] = {
    "control-plane": (GO, Need("openssl", ("openssl",), "openssl")),
    "haproxy": (Need("haproxy", ("haproxy", "/usr/sbin/haproxy"), "haproxy"),),
    "node": (
        Need("containerd", ("containerd", "/usr/bin/containerd"), "containerd"),
        Need("ctr", ("ctr", "/usr/bin/ctr"), "containerd"),
        Need("runc", ("runc", "/usr/sbin/runc", "/usr/bin/runc"), "runc"),
        Need("CNI bridge plugin", ("/usr/lib/cni/bridge",), "containernetworking-plugins"),
        Need("iptables", ("iptables", "/usr/sbin/iptables"), "iptables"),
        Need("conntrack", ("conntrack", "/usr/sbin/conntrack"), "conntrack"),
        Need("ip", ("ip", "/usr/sbin/ip", "/usr/bin/ip"), "iproute2"),
        Need("mount", ("mount",), "mount"),
    ),
    "image": (
        Need("mmdebstrap", ("mmdebstrap",), "mmdebstrap"),
        Need("cc", ("cc", "gcc"), "gcc"),
        Need("static libc", ("/usr/lib/x86_64-linux-gnu/libc.a", "/usr/lib/aarch64-linux-gnu/libc.a"), "libc6-dev"),
    ),
}
NEEDS["demo"] = NEEDS["control-plane"] + NEEDS["haproxy"]
NEEDS["test"] = NEEDS["demo"] + NEEDS["node"] + NEEDS["image"]


def missing(features: Iterable[str]) -> list[Need]:
    seen: dict[str, Need] = {}
    for feature in features:
        for need in NEEDS[feature]:
            if not need.present():
                seen.setdefault(need.name, need)
    return list(seen.values())


def _can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def ensure(features: Iterable[str], install: bool = True) -> None:
    """Install what apt can bring (as root); raise MissingRequirement naming whatever is still absent."""
    features = list(features)
    absent = missing(features)
    packages = sorted({n.package for n in absent if n.package})
    if packages and install and _can_install():
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print(f"installing from Debian's packages: {' '.join(packages)}", flush=True)
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise MissingRequirement(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-400:]}")
        absent = missing(features)
    if absent:
        parts = [n.hint or f"{n.name} (apt-get install {n.package})" for n in absent]
        raise MissingRequirement("missing: " + "; ".join(parts))


def go_on_path() -> None:
    """The Go install is often outside PATH (/usr/local/go/bin); make child builds find it."""
    if shutil.which("go") is None and Path("/usr/local/go/bin/go").exists():
        os.environ["PATH"] = "/usr/local/go/bin" + os.pathsep + os.environ.get("PATH", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poolkeeper_dev.requirements", description=__doc__)
    parser.add_argument("features", nargs="+", choices=sorted(NEEDS))
    parser.add_argument("--check-only", action="store_true", help="report, do not install")
    args = parser.parse_args(argv)
    try:
        ensure(args.features, install=not args.check_only)
    except MissingRequirement as exc:
        print(f"poolkeeper: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
