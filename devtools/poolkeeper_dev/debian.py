"""A minimal Debian root filesystem from mmdebstrap, fetched from the mirror this host already uses.

Nothing is pulled from a container registry: the base layer is made from Debian packages, and
the tarball is cached under a key of suite, packages, mirror and options, so only the first build
pays for mmdebstrap (about half a minute).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
# What debian:*-slim leaves out, as dpkg path filters: documentation (but copyrights), manuals, locales.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
# mmdebstrap copies the host's resolv.conf and hostname in; the runtime mounts its own over them, so
# the image keeps them empty (as mount points) and carries nothing of the build machine.
CUSTOMIZE_HOOKS = ('for f in resolv.conf hostname; do rm -f "$1/etc/$f"; install -m 0644 /dev/null "$1/etc/$f"; done',)
# A merged /usr without the usrmerge package, which would pull in perl (60 MB).
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")


class RootfsError(RuntimeError):
    """The host's apt sources name no Debian mirror, or mmdebstrap failed."""


@dataclass(frozen=True)
class AptSource:
    types: tuple[str, ...]
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


@dataclass(frozen=True)
class Mirror:
    """The Debian archive and security URIs the host's apt uses."""

    archive: str
    security: str | None

    def source_lines(self, suite: str) -> list[str]:
        lines = [f"deb {self.archive} {suite} main", f"deb {self.archive} {suite}-updates main"]
        if self.security:
            lines.append(f"deb {self.security} {suite}-security main")
        return lines


@dataclass(frozen=True)
class Rootfs:
    """A cached mmdebstrap tarball; `epoch` is when it was made, the clamp for its mtimes."""

    tarball: Path
    epoch: int
    packages: dict[str, str]

    def version(self, package: str) -> str:
        try:
            return self.packages[package]
        except KeyError:
            raise RootfsError(f"{package} is not installed in {self.tarball}") from None


def read_apt_sources(apt_dir: Path = Path("/etc/apt")) -> list[AptSource]:
    """Entries of sources.list and sources.list.d/*.list / *.sources (deb822); other files are not apt's."""
    sources: list[AptSource] = []
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if path.is_file():
            sources.extend(_one_line_sources(path.read_text()))
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        sources.extend(_deb822_sources(path.read_text()))
    return sources


def _one_line_sources(text: str) -> Iterable[AptSource]:
    for raw in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] in ("deb", "deb-src"):
            yield AptSource((line[0],), line[1], (line[2],), tuple(line[3:]))


def _deb822_sources(text: str) -> Iterable[AptSource]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "uris" not in fields:
            continue
        for uri in fields["uris"].split():
            yield AptSource(tuple(fields.get("types", "").split()), uri, tuple(fields.get("suites", "").split()),
                            tuple(fields.get("components", "").split()))


def host_codename(os_release: Path = Path("/etc/os-release")) -> str | None:
    try:
        for line in os_release.read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"') or None
    except OSError:
        pass
    return None


def host_mirror(suite: str = SUITE, sources: Sequence[AptSource] | None = None) -> Mirror:
    """The URIs the host uses for `suite` (or, on another release, for its own codename).

    Matching on the suite name leaves third-party repositories out: they serve other suite names.
    """
    sources = read_apt_sources() if sources is None else sources
    binary = [s for s in sources if "deb" in s.types and "main" in s.components]
    for codename in dict.fromkeys(c for c in (suite, host_codename()) if c):
        archive = next((s.uri for s in binary if codename in s.suites), None)
        if archive:
            security = next((s.uri for s in binary
                             if f"{codename}-security" in s.suites or f"{codename}/updates" in s.suites), None)
            return Mirror(archive.rstrip("/"), security.rstrip("/") if security else None)
    raise RootfsError(f"no Debian mirror for {suite} in /etc/apt/sources.list or /etc/apt/sources.list.d/")


def mmdebstrap_command(suite: str, packages: Sequence[str], mirror: Mirror, output: Path) -> list[str]:
    cmd = ["mmdebstrap", f"--variant={VARIANT}", "--include=" + ",".join(packages), "--quiet"]
    if MERGED_USR_HOOKS.is_dir():
        cmd.append(f"--hook-dir={MERGED_USR_HOOKS}")
    cmd += [f"--dpkgopt={option}" for option in DPKG_OPTIONS]
    cmd += [f"--customize-hook={hook}" for hook in CUSTOMIZE_HOOKS]
    return [*cmd, suite, str(output), *mirror.source_lines(suite)]


def ensure_rootfs(cache: Path, packages: Sequence[str], suite: str = SUITE, mirror: Mirror | None = None,
                  log: bool = True) -> Rootfs:
    """The cached tarball for these inputs, running mmdebstrap only when it is absent."""
    mirror = mirror or host_mirror(suite)
    packages = sorted(set(packages))
    probe = mmdebstrap_command(suite, packages, mirror, Path("OUT"))
    key = hashlib.sha256(json.dumps(probe).encode()).hexdigest()[:16]
    tarball = cache / f"rootfs-{suite}-{key}.tar"
    meta = tarball.with_suffix(".json")
    if tarball.exists() and meta.exists():
        recorded = json.loads(meta.read_text())
        return Rootfs(tarball, int(recorded["epoch"]), dict(recorded["packages"]))
    if shutil.which("mmdebstrap") is None:
        raise RootfsError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    staging = tarball.with_name(f".{tarball.stem}.{os.getpid()}.tar")
    if log:
        print(f"image: mmdebstrap {suite} with {', '.join(packages)} from {mirror.archive}", file=sys.stderr,
              flush=True)
    proc = subprocess.run(mmdebstrap_command(suite, packages, mirror, staging),
                          env=dict(os.environ, SOURCE_DATE_EPOCH=str(epoch)),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        staging.unlink(missing_ok=True)
        raise RootfsError(f"mmdebstrap failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    installed = installed_packages(staging)
    os.replace(staging, tarball)
    meta.write_text(json.dumps({"epoch": epoch, "mirror": mirror.source_lines(suite), "packages": installed},
                               indent=1, sort_keys=True))
    return Rootfs(tarball, epoch, installed)


def installed_packages(tarball: Path) -> dict[str, str]:
    """Package → version from the tarball's dpkg status."""
    with tarfile.open(tarball) as tar:
        handle = tar.extractfile("./var/lib/dpkg/status")
        assert handle is not None
        status = handle.read().decode()
    versions: dict[str, str] = {}
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version): (.+)$", stanza, re.MULTILINE))
        if "Package" in fields:
            versions[fields["Package"]] = fields["Version"]
    return versions
