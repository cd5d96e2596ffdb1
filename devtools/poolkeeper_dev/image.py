"""Build poolkeeper's container images here, without a registry or a container engine, and load them.

Three images, each written as an OCI archive (default: .images/ at the repository root):

- ghcr.io/poolkeeper/poolkeeper:<version>: a Debian base (mmdebstrap: python3, ca-certificates)
  and a virtual environment at /opt/poolkeeper with the operator wheel, its locked dependencies
  and the shipped handlers; runs as 65532 on a read-only root filesystem.
- registry.k8s.io/pause:3.10: Kubernetes' pause.c, compiled static, for the node's sandboxes.
- poolkeeper.dev/testweb:dev: the same Debian base plus testweb_server.py, a test workload.

Layers are cached by their inputs (and this package's build code), so a warm build only re-checks
and rewrites archives. `--load ADDRESS` imports the archives with `ctr` into namespace k8s.io,
where the CRI plugin (and so the kubelet) finds them under exactly these names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from poolkeeper_dev import debian, oci, target_venv, wheels
from poolkeeper_dev.build import KUBERNETES_VERSION
from poolkeeper_dev.build import cache_dir as devcluster_cache_dir
from poolkeeper_dev.requirements import MissingRequirement, ensure, go_on_path

PREFIX = "/opt/poolkeeper"
NONROOT = 65532
PAUSE_USER = 65535
DEBIAN_PACKAGES = ("python3", "ca-certificates")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
TESTWEB_IMAGE = "poolkeeper.dev/testweb:dev"
PAUSE_CFLAGS = ("-Os", "-Wall", "-Werror", "-static", "-s", "-DVERSION=v3.10")
LICENSE = "org.opencontainers.image.licenses"


class ImageError(RuntimeError):
    """A build step or an import failed; the message says which and why."""


def operator_name(repo: Path | None = None) -> str:
    """The name manifests/deployment.yaml uses: the version comes from pyproject.toml."""
    return f"ghcr.io/poolkeeper/poolkeeper:{wheels.project_metadata(repo or wheels.repo_root())['version']}"


OPERATOR_IMAGE = operator_name()


def cache_root() -> Path:
    """~/.cache/poolkeeper/images (beside the control-plane binaries; POOLKEEPER_CACHE moves both)."""
    return devcluster_cache_dir().parent / "images"


def archive_name(image_name: str) -> str:
    """ghcr.io/poolkeeper/poolkeeper:0.1.0 → poolkeeper.oci.tar"""
    return image_name.rsplit("/", 1)[-1].split(":", 1)[0] + ".oci.tar"


def _recipe() -> str:
    """The build code itself is an input of every cached layer: change it and layers are rebuilt."""
    digest = hashlib.sha256()
    for module in (oci, debian, target_venv, wheels, sys.modules[__name__]):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()


def _digest_tree(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _append_line(line: str) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        text = data.decode()
        return (text if text.endswith("\n") or not text else text + "\n").encode() + line.encode() + b"\n"

    return edit


def _run(cmd: list[str], what: str, cwd: str | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise ImageError(f"{what}: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


@dataclass(frozen=True)
class BuiltImage:
    name: str
    archive: Path
    image: oci.Image
    seconds: float


class Builder:
    """Builds the images into one blob store, reusing cached layers whose inputs are unchanged."""

    def __init__(self, repo: Path, cache: Path, log: bool = True) -> None:
        self.repo, self.cache, self.log = repo, cache, log
        self.store = oci.BlobStore(cache)
        self.layers_dir = cache / "layers"
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        self.epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or 0)  # mtime clamp of the layers built here
        self.recipe = _recipe()

    def say(self, message: str) -> None:
        if self.log:
            print(f"image: {message}", file=sys.stderr, flush=True)

    def cached_layer(self, what: str, inputs: object, build: Callable[[], oci.Layer]) -> oci.Layer:
        """The layer recorded for these inputs if its blob is still there, else `build()` (then recorded)."""
        key = hashlib.sha256(json.dumps([self.recipe, what, inputs], sort_keys=True).encode()).hexdigest()
        record = self.layers_dir / f"{what}-{key[:24]}.json"
        if record.exists():
            data = json.loads(record.read_text())
            blob = self.store.get(data["digest"], data["size"])
            if blob:
                return oci.Layer(blob, data["diff_id"], data["uncompressed_size"])
        self.say(f"building layer {what}")
        layer = build()
        tmp = record.with_name(f".{record.name}.{os.getpid()}")
        tmp.write_text(json.dumps(layer.to_json()))
        os.replace(tmp, record)
        return layer

    @cached_property
    def rootfs(self) -> debian.Rootfs:
        return debian.ensure_rootfs(self.cache, DEBIAN_PACKAGES, log=self.log)

    @cached_property
    def base_layer(self) -> tuple[oci.Layer, str]:
        """Debian with python3, without device nodes (the runtime makes /dev), plus the nonroot user."""
        rootfs = self.rootfs
        edits = {"etc/passwd": _append_line(f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/usr/sbin/nologin"),
                 "etc/group": _append_line(f"nonroot:x:{NONROOT}:")}

        def build() -> oci.Layer:
            layer = oci.LayerBuilder(rootfs.epoch)
            with tarfile.open(rootfs.tarball) as tar:
                layer.add_tar(tar, keep=lambda member: not (member.ischr() or member.isblk() or member.isfifo()),
                              edits=edits)
                layer.add_dir("home/nonroot", 0o755, NONROOT, NONROOT)
                return layer.write(self.store)

        made_by = (f"mmdebstrap --variant={debian.VARIANT} --include={','.join(DEBIAN_PACKAGES)} {debian.SUITE}; "
                   f"user nonroot ({NONROOT})")
        return self.cached_layer("debian", [rootfs.tarball.name, rootfs.epoch, NONROOT], build), made_by

    def venv_layer(self, meta: dict[str, str]) -> tuple[oci.Layer, str]:
        """/opt/poolkeeper: the wheel and the locked dependencies from local wheels, the handlers, .pyc files."""
        lock = self.repo / wheels.LOCK_PATH
        pins = wheels.lock_pins(lock)
        python_version = self.rootfs.version("python3").split(":", 1)[-1].split("-", 1)[0]  # 3.11.2-1+b1
        target_venv.check_host_matches(python_version)
        handlers = self.repo / "handlers"
        with tempfile.TemporaryDirectory(prefix="poolkeeper-wheel-") as wheel_dir:
            wheel = wheels.build_project_wheel(self.repo, Path(wheel_dir))
            house = wheels.wheelhouse(lock, self.cache)

            def build() -> oci.Layer:
                with tempfile.TemporaryDirectory(prefix="poolkeeper-venv-") as tmp:
                    venv = target_venv.create(Path(tmp), PREFIX, python_version)
                    wheels.install_offline(Path(tmp), PREFIX, [*pins, f"{meta['name']}=={meta['version']}"],
                                           [house, Path(wheel_dir)])
                    target_venv.fix_scripts(venv, PREFIX)
                    shutil.copytree(handlers, venv / "handlers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                    target_venv.byte_compile(venv, PREFIX)
                    target_venv.check_no_host_paths(Path(tmp), [tmp, str(self.repo), sys.prefix, str(self.cache)])
                    layer = oci.LayerBuilder(self.epoch)
                    layer.add_dir("opt")
                    layer.add_tree(venv, PREFIX)
                    return layer.write(self.store)

            inputs = [python_version, pins, wheels.wheel_content_digest(wheel), _digest_tree(handlers), self.epoch]
            layer = self.cached_layer("operator-venv", inputs, build)
        return layer, f"venv {PREFIX}: {wheel.name}, {wheels.LOCK_PATH}, handlers/"

    def operator(self) -> oci.Image:
        meta = wheels.project_metadata(self.repo)
        labels = {"org.opencontainers.image.title": meta["name"], "org.opencontainers.image.version": meta["version"],
                  "org.opencontainers.image.description": meta["description"], LICENSE: meta["license"]}
        env = [f"PATH={PREFIX}/bin:{SYSTEM_PATH}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"]
        config = self._debian_config(["poolkeeper"], ["run"], env, PREFIX, labels)
        return oci.assemble(self.store, operator_name(self.repo), [self.base_layer, self.venv_layer(meta)], config)

    def testweb(self) -> oci.Image:
        source = (Path(__file__).parent / "testweb_server.py").read_bytes()

        def build() -> oci.Layer:
            layer = oci.LayerBuilder(self.epoch)
            layer.add_bytes("testweb.py", source, 0o755)
            return layer.write(self.store)

        app = self.cached_layer("testweb", [hashlib.sha256(source).hexdigest(), self.epoch], build)
        labels = {"org.opencontainers.image.title": "testweb",
                  "org.opencontainers.image.description": "poolkeeper's test workload: a small HTTP server"}
        env = [f"PATH={SYSTEM_PATH}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PORT=8080"]
        config = self._debian_config(["python3", "/testweb.py"], [], env, "/", labels)
        return oci.assemble(self.store, TESTWEB_IMAGE, [self.base_layer, (app, "/testweb.py: testweb_server.py")],
                            config)

    def _debian_config(self, entrypoint: list[str], cmd: list[str], env: list[str], working_dir: str,
                       labels: dict[str, str]) -> oci.ImageConfig:
        created = max(self.rootfs.epoch, self.epoch)
        return oci.ImageConfig(
            entrypoint=entrypoint, cmd=cmd, env=env, user=f"{NONROOT}:{NONROOT}", working_dir=working_dir,
            labels={**labels, "org.opencontainers.image.created": _rfc3339(created)},
            exposed_ports=["8080/tcp"], created=created,
        )

    def pause(self) -> oci.Image:
        source = pause_source()
        compiler = _run(["gcc", "--version"], "pause").splitlines()[0]

        def build() -> oci.Layer:
            with tempfile.TemporaryDirectory(prefix="poolkeeper-pause-") as tmp:
                binary = Path(tmp) / "pause"
                _run(["gcc", *PAUSE_CFLAGS, "-o", str(binary), str(source)], "pause")
                layer = oci.LayerBuilder(self.epoch)
                layer.add_bytes("pause", binary.read_bytes(), 0o755)
                return layer.write(self.store)

        inputs = [hashlib.sha256(source.read_bytes()).hexdigest(), PAUSE_CFLAGS, compiler, self.epoch]
        layer = self.cached_layer("pause", inputs, build)
        config = oci.ImageConfig(
            entrypoint=["/pause"], user=f"{PAUSE_USER}:{PAUSE_USER}", env=[f"PATH={SYSTEM_PATH}"], created=self.epoch,
            labels={"org.opencontainers.image.title": "pause", "org.opencontainers.image.version": "3.10",
                    LICENSE: "Apache-2.0", "org.opencontainers.image.source":
                    f"https://github.com/kubernetes/kubernetes/tree/{KUBERNETES_VERSION}/build/pause"},
        )
        made_by = f"gcc {' '.join(PAUSE_CFLAGS)} build/pause/linux/pause.c (k8s.io/kubernetes@{KUBERNETES_VERSION})"
        return oci.assemble(self.store, PAUSE_IMAGE, [(layer, made_by)], config)


def pause_source() -> Path:
    """build/pause/linux/pause.c of the Kubernetes module the dev cluster builds (from the Go module cache)."""
    go_on_path()
    if shutil.which("go") is None:
        raise ImageError("the `go` command is not on PATH; it locates Kubernetes' pause.c in the module cache")
    with tempfile.TemporaryDirectory() as outside_any_module:
        out = _run(["go", "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"], "pause",
                   cwd=outside_any_module, env=dict(os.environ, GOFLAGS="-mod=mod"))
    source = Path(json.loads(out)["Dir"]) / "build" / "pause" / "linux" / "pause.c"
    if not source.is_file():
        raise ImageError(f"{source} is missing from the Go module cache")
    return source


def build(out_dir: Path | None = None, log: bool = True) -> list[BuiltImage]:
    """Build all three images and write one OCI archive each; returns them with their build times."""
    try:
        ensure(["image"], install=False)
    except MissingRequirement as exc:
        raise ImageError(f"{exc} (or run: python -m poolkeeper_dev.requirements image)") from None
    repo = wheels.repo_root()
    out_dir = out_dir or repo / ".images"
    out_dir.mkdir(parents=True, exist_ok=True)
    builder = Builder(repo, cache_root(), log=log)
    built: list[BuiltImage] = []
    for make in (builder.operator, builder.pause, builder.testweb):
        started = time.monotonic()
        try:
            image = make()
        except (debian.RootfsError, wheels.WheelError, target_venv.TargetVenvError, ValueError) as exc:
            raise ImageError(str(exc)) from exc
        archive = oci.write_archive(image, out_dir / archive_name(image.name))
        built.append(BuiltImage(image.name, archive, image, time.monotonic() - started))
    return built


def build_images(out_dir: Path | None = None, log: bool = True) -> dict[str, Path]:
    """Image name → OCI archive, for the dev cluster's node and the tests."""
    return {item.name: item.archive for item in build(out_dir, log)}


def load_images(archives: Mapping[str, Path], address: str, namespace: str = "k8s.io") -> None:
    """Import each archive into the containerd at `address` and check the image has exactly its name."""
    for name, archive in archives.items():
        _run(["ctr", "--address", address, "-n", namespace, "images", "import",
              "--base-name", name.rsplit(":", 1)[0], str(archive)], f"importing {name}")
    present = set(_run(["ctr", "--address", address, "-n", namespace, "images", "ls", "-q"], "listing").split())
    missing = sorted(set(archives) - present)
    if missing:
        raise ImageError(f"after import, containerd at {address} lacks {missing} (it has {sorted(present)})")


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def format_table(built: list[BuiltImage], relative_to: Path | None = None) -> str:
    rows = [("IMAGE", "COMPRESSED", "UNCOMPRESSED", "BUILD", "ARCHIVE")]
    for item in built:
        archive = item.archive
        if relative_to and archive.is_relative_to(relative_to):
            archive = archive.relative_to(relative_to)
        rows.append((item.name, _size(item.image.compressed_size), _size(item.image.uncompressed_size),
                     f"{item.seconds:.1f} s", str(archive)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) if i in (0, 4) else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
                     for row in rows)


def _running_node_socket(folder: Path) -> str | None:
    """The containerd socket of a devcluster folder's node, if that cluster runs one now."""
    from poolkeeper_dev.cluster import Cluster

    cluster = Cluster(folder)
    if not cluster.has_node or not cluster.status()["ready"]:
        return None
    return str(cluster.node_layout().containerd_address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poolkeeper_dev.image", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build the images as OCI archives (and optionally load them)")
    build_cmd.add_argument("--out", type=Path, default=None, help="folder for the archives (default: .images/)")
    build_cmd.add_argument("--load", metavar="ADDRESS", help="containerd socket to import the images into (k8s.io)")
    build_cmd.add_argument("--devcluster", metavar="DIR", type=Path, default=None,
                           help="also import them into this devcluster's node, when it runs one")
    sub.add_parser("lock", help=f"regenerate {wheels.LOCK_PATH} from a clean virtual environment")
    args = parser.parse_args(argv)
    try:
        if args.command == "lock":
            print(f"wrote {wheels.write_lock(wheels.repo_root())}")
            return 0
        started = time.monotonic()
        built = build(args.out)
        print(format_table(built, Path.cwd()))
        print(f"total {time.monotonic() - started:.1f} s")
        targets = [args.load] if args.load else []
        node_socket = _running_node_socket(args.devcluster) if args.devcluster else None
        if node_socket:
            targets.append(node_socket)
        for address in targets:
            load_images({item.name: item.archive for item in built}, address)
            print(f"loaded into {address} (namespace k8s.io)")
    except (ImageError, wheels.WheelError) as exc:
        print(f"poolkeeper image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
