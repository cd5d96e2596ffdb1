"""The operator's wheel and its pinned runtime dependencies, as wheels for an offline install.

The image must hold exactly what `pip install .` brings and nothing of the development tools, so
the project wheel is built from a clean copy of the checkout and checked, and the dependencies
come from requirements/runtime.lock, which `python -m poolkeeper_dev.image lock` regenerates in a
throw-away virtual environment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import zipfile
from pathlib import Path
from venv import EnvBuilder

LOCK_PATH = Path("requirements") / "runtime.lock"
# Top-level names a runtime wheel may hold; anything else (poolkeeper_dev, tests...) is a packaging bug.
PACKAGE = "poolkeeper"


class WheelError(RuntimeError):
    """pip failed, or the project wheel holds more than the runtime package."""


def repo_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "operator" / PACKAGE).is_dir():
            return parent
    raise WheelError("cannot find the poolkeeper checkout (pyproject.toml next to operator/poolkeeper)")


def project_metadata(repo: Path) -> dict[str, str]:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    return {key: str(project.get(key, "")) for key in ("name", "version", "description", "license")}


def _pip(*args: str, isolated: bool = False) -> None:
    """Run the host pip; `isolated` ignores pip's environment and config (no extra find-links)."""
    cmd = [sys.executable, "-m", "pip", *(["--isolated"] if isolated else []), "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise WheelError(f"{' '.join(cmd[2:])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _checkout_files(repo: Path) -> list[Path]:
    """Files git would see (tracked or not ignored), so build/, *.egg-info and caches stay out."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=repo, capture_output=True, check=False)
    if proc.returncode != 0:
        raise WheelError(f"git ls-files failed in {repo}: {proc.stderr.decode()[-500:]}")
    names = sorted({name for name in proc.stdout.decode().split("\0") if name})
    return [Path(name) for name in names if (repo / name).is_file()]


def build_project_wheel(repo: Path, out: Path) -> Path:
    """`pip wheel --no-deps .` on a clean copy of the checkout; fails if the wheel is not runtime-only."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="poolkeeper-src-") as tmp:
        for name in _checkout_files(repo):
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, target)
        _pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), tmp)
    wheels = sorted(out.glob(f"{PACKAGE}-*.whl"))
    if len(wheels) != 1:
        raise WheelError(f"expected one {PACKAGE} wheel in {out}, found {[w.name for w in wheels]}")
    check_runtime_only(wheels[0])
    return wheels[0]


def check_runtime_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    allowed = {PACKAGE, *(t for t in tops if t.startswith(f"{PACKAGE}-") and t.endswith(".dist-info"))}
    if tops - allowed:
        raise WheelError(f"{wheel.name} holds more than the runtime package: {sorted(tops - allowed)}")


def wheel_content_digest(wheel: Path) -> str:
    """A digest of the wheel's members and bytes, blind to zip timestamps (a rebuild changes those)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + archive.read(name) + b"\0")
    return digest.hexdigest()


def write_lock(repo: Path) -> Path:
    """Install the project into a fresh venv and record every distribution it pulled, pinned."""
    with tempfile.TemporaryDirectory(prefix="poolkeeper-lock-") as tmp:
        wheel = build_project_wheel(repo, Path(tmp) / "wheel")
        venv = Path(tmp) / "venv"
        EnvBuilder(with_pip=False).create(venv)  # on the base interpreter even when run from a venv
        python = str(venv / "bin" / "python")
        _pip("--python", python, "install", "--quiet", str(wheel))
        frozen = subprocess.run([sys.executable, "-m", "pip", "--python", python, "list", "--format=freeze",
                                 "--exclude", PACKAGE, "--disable-pip-version-check"],
                                capture_output=True, text=True, check=True).stdout
    pins = sorted((line.strip() for line in frozen.splitlines() if "==" in line), key=str.lower)
    lock = repo / LOCK_PATH
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(
        "# Runtime dependencies of poolkeeper, exactly as `pip install .` resolved them in a clean venv.\n"
        "# Regenerate with: python -m poolkeeper_dev.image lock  (the image and the Containerfile install these)\n"
        + "".join(f"{pin}\n" for pin in pins)
    )
    return lock


def lock_pins(lock: Path) -> list[str]:
    if not lock.exists():
        raise WheelError(f"{lock} is missing; create it with: python -m poolkeeper_dev.image lock")
    return [line.strip() for line in lock.read_text().splitlines() if line.strip() and not line.startswith("#")]


def wheelhouse(lock: Path, cache: Path) -> Path:
    """Wheels for every pin (downloaded, or built from an sdist by the host pip), cached per lock content.

    The host interpreter is CPython 3.11 on glibc like the image's, so its wheels fit the image.
    """
    tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
    key = hashlib.sha256(lock.read_bytes() + tag.encode()).hexdigest()[:16]
    target = cache / f"wheels-{key}"
    if (target / ".complete").exists():
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(staging), "-r", str(lock))
    (staging / ".complete").write_text("\n".join(lock_pins(lock)) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def install_offline(root: Path, prefix: str, requirements: list[str], find_links: list[Path]) -> None:
    """pip install into `root`+`prefix` from local wheels only, ignoring whatever the host has installed."""
    _pip("install", "--quiet", "--no-index", "--ignore-installed", "--no-compile", "--no-warn-script-location",
         "--root", str(root), "--prefix", prefix,
         *(arg for folder in find_links for arg in ("--find-links", str(folder))), *requirements, isolated=True)
