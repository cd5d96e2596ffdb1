"""The interpreter the operator image ships, for benchmarks: Debian's python3 with the runtime lock.

The image runs the operator on Debian's python3 (Containerfile, image.py) with exactly the
packages of requirements/runtime.lock. The development venv may use another build of Python
(pyenv's, without profile-guided optimisation): measured side by side, the operator spent 1.1 to
1.25x the CPU under it (docs/scaling.md). So the benchmarks run the operator the way users run it:
this venv's python, with the operator's source on PYTHONPATH (always the code being measured).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from poolkeeper_dev.requirements import MissingRequirement

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")
LOCK = REPO / "requirements" / "runtime.lock"
VENV = REPO / ".venv-runtime"
STAMP = "poolkeeper-runtime-lock.sha256"  # the lock a venv was made from: a changed lock makes it again


def shipped_python(venv: Path = VENV, python: Path = DEBIAN_PYTHON, lock: Path = LOCK) -> str:
    """The path of the venv's python, made (or made again, when the lock changed) first."""
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    stamp = venv / STAMP
    exe = venv / "bin" / "python"
    if exe.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return str(exe)
    if not python.exists():
        raise MissingRequirement(f"{python} (Debian's python3, what the image runs) is missing: "
                                 "apt-get install python3 python3-venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's own packages, nothing else
    made = subprocess.run([str(python), "-m", "venv", "--clear", str(venv)], capture_output=True, text=True, env=env)
    if made.returncode != 0:
        raise MissingRequirement(f"{python} -m venv failed (apt-get install python3-venv): {made.stderr.strip()}")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "-r", str(lock)],
                   check=True, env=env)
    stamp.write_text(digest + "\n")
    return str(exe)


def described() -> str:
    """How the benchmarks' reports name the interpreter that ran the operator."""
    out = subprocess.run([shipped_python(), "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True, check=True)
    return f"Python {out.stdout.strip()} (Debian's python3, as in the image)"
