"""The container images built here (no registry, no engine), checked as files and then run in a containerd.

The archives are built with the layer cache, so a warm run only rewrites them. A private containerd
(its own root, state and socket under tmp_path, CRI off) imports them with load_images, and
`ctr run` proves each image works: the operator as uid 65532 on a read-only root filesystem
without any development tool, pause as the sandbox process, testweb serving and draining HTTP.
Nothing is skipped: if the machine lacks a piece, the fixture fails and says which.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import re
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from poolkeeper_dev.containerd import Containerd, ContainerdError
from poolkeeper_dev.image import OPERATOR_IMAGE, PAUSE_IMAGE, TESTWEB_IMAGE, ImageError, build_images, load_images
from poolkeeper_dev.ports import free_port
from poolkeeper_dev.requirements import MissingRequirement, ensure

REPO = Path(__file__).resolve().parents[2]
IMAGES = (OPERATOR_IMAGE, PAUSE_IMAGE, TESTWEB_IMAGE)
DEV_MODULES = ("poolkeeper_dev", "pytest", "mypy", "ruff", "hypothesis")


class Layout:
    """An OCI archive read back: the index's one manifest, its config and its layer blobs."""

    def __init__(self, archive: Path) -> None:
        with tarfile.open(archive) as tar:
            self.files = {m.name: _read(tar, m) for m in tar.getmembers() if m.isfile()}
        self.layout = json.loads(self.files["oci-layout"])
        self.index = json.loads(self.files["index.json"])
        self.descriptor = self.index["manifests"][0]
        self.manifest = json.loads(self.blob(self.descriptor))
        self.config = json.loads(self.blob(self.manifest["config"]))

    def blob(self, descriptor: dict[str, Any]) -> bytes:
        data = self.files[f"blobs/sha256/{descriptor['digest'].removeprefix('sha256:')}"]
        assert len(data) == descriptor["size"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
        return data

    def layer_members(self, position: int) -> list[tarfile.TarInfo]:
        data = gzip.decompress(self.blob(self.manifest["layers"][position]))
        assert "sha256:" + hashlib.sha256(data).hexdigest() == self.config["rootfs"]["diff_ids"][position]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return tar.getmembers()


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    assert handle is not None
    return handle.read()


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    try:
        ensure(["image"])
        return build_images(tmp_path_factory.mktemp("images"), log=False)
    except (MissingRequirement, ImageError) as exc:
        pytest.fail(f"the images could not be built: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def layouts(archives: dict[str, Path]) -> dict[str, Layout]:
    return {name: Layout(path) for name, path in archives.items()}


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory, archives: dict[str, Path]) -> Iterator[Containerd]:
    instance = Containerd.private(tmp_path_factory.mktemp("ctrd"))
    try:
        instance.start()
        load_images(archives, instance.address)
    except (ContainerdError, ImageError) as exc:
        instance.stop()
        pytest.fail(f"the private containerd could not start or import the images: {exc}", pytrace=False)
    yield instance
    instance.stop()
    instance.remove()


def ctr_run(containerd: Containerd, image: str, *command: str, options: tuple[str, ...] = (),
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return containerd.ctr("run", "--rm", *options, image, f"t-{uuid.uuid4().hex[:10]}", *command, check=False,
                          timeout=timeout)


def test_each_archive_is_an_oci_layout_naming_its_image(layouts: dict[str, Layout]) -> None:
    assert set(layouts) == set(IMAGES)
    for name, layout in layouts.items():
        assert layout.layout == {"imageLayoutVersion": "1.0.0"}
        assert len(layout.index["manifests"]) == 1
        assert layout.descriptor["annotations"]["io.containerd.image.name"] == name
        assert layout.descriptor["platform"] == {"architecture": "amd64", "os": "linux"}
        assert layout.config["os"] == "linux" and layout.config["architecture"] == "amd64"
        assert len(layout.config["rootfs"]["diff_ids"]) == len(layout.manifest["layers"])


def test_layers_are_deterministic_tars(layouts: dict[str, Layout]) -> None:
    """Sorted, relative names, no owner names, mtimes no later than the image's creation, no device nodes."""
    layout = layouts[OPERATOR_IMAGE]
    epoch = datetime.strptime(layout.config["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    for position in range(len(layout.manifest["layers"])):
        members = layout.layer_members(position)
        names = [m.name.rstrip("/") for m in members]
        assert names == sorted(names, key=lambda n: n.split("/"))
        assert not [n for n in names if n.startswith(("/", "./"))]
        assert {(m.uname, m.gname) for m in members} == {("", "")}
        assert max(m.mtime for m in members) <= epoch
        assert not [m.name for m in members if m.ischr() or m.isblk()]


def test_operator_and_testweb_share_the_debian_layer(layouts: dict[str, Layout]) -> None:
    assert layouts[OPERATOR_IMAGE].manifest["layers"][0] == layouts[TESTWEB_IMAGE].manifest["layers"][0]


def test_operator_layer_is_a_venv_without_build_machine_traces(layouts: dict[str, Layout]) -> None:
    members = {m.name.rstrip("/"): m for m in layouts[OPERATOR_IMAGE].layer_members(1)}
    assert members["opt/poolkeeper/bin/python3"].linkname == "/usr/bin/python3"
    assert (members["opt/poolkeeper/bin/poolkeeper"].mode & 0o111) == 0o111
    assert "opt/poolkeeper/handlers/__pycache__/audit.cpython-311.pyc" in members
    assert not [n for n in members if re.search(r"/(poolkeeper_dev|pytest|_pytest|mypy|ruff|hypothesis)\b", n)]


def test_operator_config(layouts: dict[str, Layout]) -> None:
    config = layouts[OPERATOR_IMAGE].config["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["poolkeeper"] and config["Cmd"] == ["run"]
    assert config["WorkingDir"] == "/opt/poolkeeper"
    assert "PATH=/opt/poolkeeper/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in config["Env"]
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    assert config["Labels"]["org.opencontainers.image.version"] == OPERATOR_IMAGE.rsplit(":", 1)[1]
    size = sum(d["size"] for d in layouts[OPERATOR_IMAGE].manifest["layers"])
    assert size < 120_000_000, f"the operator image is {size / 1e6:.1f} MB compressed"


def test_the_deployment_runs_the_image_built_here() -> None:
    assert f"image: {OPERATOR_IMAGE}" in (REPO / "manifests" / "deployment.yaml").read_text()


def _final_stage(containerfile: str) -> dict[str, str]:
    """The final stage's instructions (continuation lines joined); the last of each kind wins."""
    text = re.sub(r"\\\n\s*", " ", containerfile)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return {line.split(None, 1)[0]: line.split(None, 1)[1] for line in lines[last_from:]}


def test_containerfile_matches_the_built_image(layouts: dict[str, Layout]) -> None:
    config = layouts[OPERATOR_IMAGE].config["config"]
    stage = _final_stage((REPO / "Containerfile").read_text())
    assert json.loads(stage["ENTRYPOINT"]) == config["Entrypoint"]
    assert json.loads(stage["CMD"]) == config["Cmd"]
    assert stage["USER"] == config["User"]
    assert stage["WORKDIR"] == config["WorkingDir"]
    assert sorted(stage["ENV"].split()) == sorted(config["Env"])


def test_operator_runs_help_as_nonroot_on_a_read_only_root(containerd: Containerd) -> None:
    ran = ctr_run(containerd, OPERATOR_IMAGE, "poolkeeper", "--help", options=("--read-only",))
    assert ran.returncode == 0, ran.stderr
    assert "usage: poolkeeper" in ran.stdout
    ids = ctr_run(containerd, OPERATOR_IMAGE, "sh", "-c", "id -u; id -g; pwd", options=("--read-only",))
    assert ids.stdout.split() == ["65532", "65532", "/opt/poolkeeper"], ids.stderr


PYC_PROBE = """
import importlib.util, os, sys
import poolkeeper.app, poolkeeper.cli

def pyc_state(source):
    try:
        with open(importlib.util.cache_from_source(source), "rb") as pyc:
            header = pyc.read(16)
    except OSError:
        return "missing"
    flags = int.from_bytes(header[4:8], "little")
    if flags:
        return "checked-hash" if flags == 3 else "unchecked-hash"
    st = os.stat(source)
    stamp = (int.from_bytes(header[8:12], "little"), int.from_bytes(header[12:16], "little"))
    return "timestamp" if stamp == (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF) else "stale"

states = {}
for module in list(sys.modules.values()):
    source = getattr(module, "__file__", None) or ""
    if source.endswith(".py"):
        states[source] = pyc_state(source)
print(sys.executable, sys.prefix, poolkeeper.cli.__file__, states[poolkeeper.cli.__file__])
print(sorted(source for source, state in states.items() if state in ("missing", "stale")))
"""


def test_operator_modules_load_from_valid_pycs(containerd: Containerd) -> None:
    """Start-up on a read-only root compiles nothing: every module the operator imports has a valid .pyc.

    Ours are hash-checked (the layer's mtimes are clamped); Debian's stdlib ones are timestamped,
    which holds because the base layer's clamp is the time its root filesystem was made.
    """
    ran = ctr_run(containerd, OPERATOR_IMAGE, "python", "-c", PYC_PROBE, options=("--read-only",))
    assert ran.returncode == 0, ran.stderr
    first, second = ran.stdout.splitlines()
    assert first.split() == ["/opt/poolkeeper/bin/python", "/opt/poolkeeper",
                             "/opt/poolkeeper/lib/python3.11/site-packages/poolkeeper/cli.py", "checked-hash"]
    assert second == "[]", f"modules without a valid .pyc: {second}"


def test_operator_image_holds_no_development_tools(containerd: Containerd) -> None:
    ran = ctr_run(containerd, OPERATOR_IMAGE, "python", "-c", "import poolkeeper_dev")
    assert ran.returncode != 0 and "ModuleNotFoundError" in ran.stderr, ran.stderr
    probe = f"import importlib.util as u; print([m for m in {DEV_MODULES!r} if u.find_spec(m)])"
    found = ctr_run(containerd, OPERATOR_IMAGE, "python", "-c", probe)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


def test_pause_reports_its_version_and_stops_on_sigterm(containerd: Containerd) -> None:
    version = ctr_run(containerd, PAUSE_IMAGE, "/pause", "-v")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "pause.c v3.10"
    cid = f"pause-{uuid.uuid4().hex[:8]}"
    with subprocess.Popen([*containerd.ctr_command(), "run", "--rm", PAUSE_IMAGE, cid], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as running:
        _wait_until(lambda: f"{cid} " in containerd.ctr("tasks", "ls", check=False).stdout, "pause to run", running)
        containerd.ctr("tasks", "kill", cid)
        out, err = running.communicate(timeout=20)
    assert running.returncode == 0, err
    assert "Shutting down, got signal" in out + err


def test_testweb_serves_http_and_drains_on_sigterm(containerd: Containerd) -> None:
    port = free_port()
    cid = f"testweb-{uuid.uuid4().hex[:8]}"
    command = [*containerd.ctr_command(), "run", "--rm", "--net-host", "--read-only", "--env", f"PORT={port}",
               "--env", "POD_NAME=web-0", TESTWEB_IMAGE, cid]
    with subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as running:
        try:
            _wait_until(lambda: _get(port, "/healthz")[0] == 200, "testweb to answer", running)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(2):  # keep-alive: both on one connection
                conn.request("GET", "/")
                response = conn.getresponse()
                assert (response.status, response.read()) == (200, f"testweb pod=web-0 port={port}\n".encode())
            in_flight: dict[str, Any] = {}
            slow = threading.Thread(target=lambda: in_flight.update(answer=_get(port, "/?delay=1.5")))
            slow.start()
            time.sleep(0.5)
            containerd.ctr("tasks", "kill", cid)  # SIGTERM
            slow.join(10)
            status, headers, body = in_flight["answer"]
            assert (status, headers.get("Connection")) == (200, "close")
            assert b"web-0" in body
            with pytest.raises(OSError):
                _get(port, "/healthz")
            running.communicate(timeout=10)
            assert running.returncode == 0
        finally:
            if running.poll() is None:
                containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)


def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _wait_until(condition: Callable[[], bool], what: str, process: subprocess.Popen[str] | None = None,
                timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the container exited ({process.returncode}) while waiting for {what}: "
                        f"{process.stderr.read() if process.stderr else ''}")
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")
