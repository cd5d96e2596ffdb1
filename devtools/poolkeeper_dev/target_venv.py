"""A virtual environment for another root filesystem, assembled on this host without running the target.

The image's interpreter is Debian's /usr/bin/python3; the host's pip installs into a staging folder
with --root/--prefix, then the pieces pip takes from the host are put right: script shebangs (and
their RECORD hashes) name the in-image interpreter, and every module is byte-compiled with
hash-checked .pyc files whose paths are the in-image ones, so a read-only container starts
without compiling and without a trace of the build machine.
"""

from __future__ import annotations

import base64
import compileall
import csv
import hashlib
import io
import os
import py_compile
import sys
from pathlib import Path

PYTHON = "/usr/bin/python3"


class TargetVenvError(RuntimeError):
    """The staged environment is not usable in the image (wrong Python, failed compile, host paths)."""


def python_dir(python_version: str) -> str:
    major, minor = python_version.split(".")[:2]
    return f"python{major}.{minor}"


def check_host_matches(python_version: str) -> None:
    """pip installs with the host's tags and scheme, so the host's X.Y must be the image's."""
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python_dir(python_version) != f"python{host}":
        raise TargetVenvError(f"the image has Python {python_version} but this host runs {host}; "
                              f"build with a Python {'.'.join(python_version.split('.')[:2])} virtual environment")


def create(staging: Path, prefix: str, python_version: str) -> Path:
    """What `python3 -m venv --without-pip <prefix>` makes, under staging/<prefix>; returns that folder."""
    venv = staging / prefix.lstrip("/")
    (venv / "bin").mkdir(parents=True)
    (venv / "include").mkdir()
    (venv / "lib" / python_dir(python_version) / "site-packages").mkdir(parents=True)
    (venv / "lib64").symlink_to("lib")
    (venv / "bin" / "python3").symlink_to(PYTHON)
    (venv / "bin" / "python").symlink_to("python3")
    (venv / "bin" / python_dir(python_version)).symlink_to("python3")
    (venv / "pyvenv.cfg").write_text(
        f"home = {os.path.dirname(PYTHON)}\n"
        "include-system-site-packages = false\n"
        f"version = {python_version}\n"
        f"executable = /usr/bin/{python_dir(python_version)}\n"
        f"command = {PYTHON} -m venv --without-pip {prefix}\n"
    )
    return venv


def fix_scripts(venv: Path, prefix: str) -> list[Path]:
    """Point pip's console scripts at the venv's interpreter and refresh their RECORD rows."""
    shebang = f"#!{prefix}/bin/python\n".encode()
    changed: list[Path] = []
    for script in sorted((venv / "bin").iterdir()):
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        first, newline, rest = data.partition(b"\n")
        if first.startswith(b"#!") and b"python" in first and first + newline != shebang:
            script.write_bytes(shebang + rest)
            changed.append(script)
    _refresh_records(venv, changed)
    return changed


def _refresh_records(venv: Path, changed: list[Path]) -> None:
    targets = {path.resolve() for path in changed}
    for record in venv.glob("lib/python*/site-packages/*.dist-info/RECORD"):
        site = record.parent.parent
        rows = list(csv.reader(io.StringIO(record.read_text())))
        dirty = False
        for row in rows:
            path = (site / row[0]).resolve() if row else None
            if path in targets:
                data = path.read_bytes()
                row[1] = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                row[2] = str(len(data))
                dirty = True
        if dirty:
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows(rows)
            record.write_text(out.getvalue())


def byte_compile(folder: Path, in_image: str) -> None:
    """Hash-checked .pyc files: valid whatever the layer's clamped mtimes, and naming in-image paths."""
    ok = compileall.compile_dir(str(folder), ddir=in_image, quiet=1, workers=os.cpu_count() or 1,
                                invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    if not ok:
        raise TargetVenvError(f"byte-compiling {folder} failed (see the errors above)")


def check_no_host_paths(folder: Path, forbidden: list[str]) -> None:
    """Fail if any file mentions a build-machine path (the staging folder, the checkout, the host venv)."""
    needles = [needle.encode() for needle in forbidden if needle and needle != "/"]
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for needle in needles:
                if needle in data:
                    raise TargetVenvError(f"{path.relative_to(folder)} contains the host path {needle.decode()}")
