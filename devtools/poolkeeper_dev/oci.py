"""OCI image layouts written byte for byte the same from the same inputs.

Layers are gzip tars with sorted entries, mtimes clamped to an epoch, numeric owners and no
user/group names, so a rebuild with unchanged inputs yields the same digests and containerd keeps
the blobs it already has. Standard library only: no registry, no docker, no skopeo.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
# File capabilities and other xattrs survive a rewrite; atime, ctime and sub-second mtimes do not.
_KEPT_PAX_PREFIX = "SCHILY.xattr."

Source = Callable[[], IO[bytes]]
Edit = Callable[[bytes], bytes]


@dataclass(frozen=True)
class Blob:
    """A content-addressed file in a BlobStore."""

    digest: str
    size: int
    path: Path

    def descriptor(self, media_type: str, **extra: Any) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Layer:
    """A compressed layer blob and the digest of its uncompressed tar (the config's diff_id)."""

    blob: Blob
    diff_id: str
    uncompressed_size: int

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.blob.digest, "size": self.blob.size, "diff_id": self.diff_id,
                "uncompressed_size": self.uncompressed_size}


class BlobStore:
    """blobs/sha256/<hex> under a root folder, filled atomically so a crash leaves no half blob."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.dir / digest.removeprefix("sha256:")

    def get(self, digest: str, size: int) -> Blob | None:
        path = self.path(digest)
        try:
            return Blob(digest, size, path) if path.stat().st_size == size else None
        except FileNotFoundError:
            return None

    def put_bytes(self, data: bytes) -> Blob:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        existing = self.get(digest, len(data))
        if existing:
            return existing
        with self.writer() as out:
            out.write(data)
            return out.commit()

    def writer(self) -> _BlobWriter:
        return _BlobWriter(self)


class _BlobWriter(io.RawIOBase):
    """A write-only file that hashes what passes through and lands in the store on commit()."""

    def __init__(self, store: BlobStore) -> None:
        super().__init__()
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.dir, prefix=".tmp-")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self._committed: Blob | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self._file.write(view)
        self.size += view.nbytes
        return view.nbytes

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._committed is None:
            self._tmp.unlink(missing_ok=True)
        super().close()

    def commit(self) -> Blob:
        self._file.close()
        digest = "sha256:" + self._hash.hexdigest()
        target = self._store.path(digest)
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, target)
        self._committed = Blob(digest, self.size, target)
        return self._committed


class _Sink(Protocol):
    def write(self, data: Any, /) -> int | None: ...


class _Digest(io.RawIOBase):
    """Counts and hashes the uncompressed tar on its way into gzip: that digest is the diff_id."""

    def __init__(self, sink: _Sink) -> None:
        super().__init__()
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += view.nbytes
        self._sink.write(view)
        return view.nbytes


def clean_name(name: str) -> str:
    """Layer paths are relative without './' ('' is the root, which layers leave out)."""
    return os.path.normpath("/" + name).lstrip("/") if name.strip("./") else ""


@dataclass
class _Entry:
    info: tarfile.TarInfo
    source: Source | None = None


@dataclass
class LayerBuilder:
    """Collects entries from tars, folders and bytes, then writes them as one deterministic layer."""

    epoch: int
    entries: dict[str, _Entry] = field(default_factory=dict)

    def add(self, info: tarfile.TarInfo, source: Source | None = None) -> None:
        info = _normalized(info, self.epoch)
        if info.name:
            self.entries[info.name] = _Entry(info, source)

    def add_dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self.add(_info(name, tarfile.DIRTYPE, mode, uid, gid, self.epoch))

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        self.add_file(_info(name, tarfile.REGTYPE, mode, uid, gid, self.epoch), data)

    def add_file(self, info: tarfile.TarInfo, data: bytes) -> None:
        """A regular file with these bytes and the rest of `info` (mode, owner, mtime)."""
        info = _normalized(info, self.epoch)
        info.size = len(data)
        self.add(info, lambda: io.BytesIO(data))

    def add_tar(self, tar: tarfile.TarFile, keep: Callable[[tarfile.TarInfo], bool] = lambda _: True,
                edits: Mapping[str, Edit] | None = None) -> None:
        """Copy a tar's members (as `keep` allows), rewriting the files named in `edits`."""
        pending = dict(edits or {})
        for member in tar.getmembers():
            if not keep(member):
                continue
            edit = pending.pop(clean_name(member.name), None)
            if edit is not None and member.isfile():
                with _tar_source(tar, member)() as handle:
                    self.add_file(member, edit(handle.read()))
            else:
                self.add(member, _tar_source(tar, member) if member.isfile() else None)
        if pending:
            raise ValueError(f"files to edit are not regular files in the tar: {sorted(pending)}")

    def add_tree(self, root: Path, prefix: str) -> None:
        """A folder built on this machine, owned by root in the image whoever built it.

        Modes are reduced to 0755/0644 (executable or not), so the builder's umask does not show.
        """
        self.add_dir(prefix)
        for path in sorted(root.rglob("*")):
            name = f"{prefix.rstrip('/')}/{path.relative_to(root)}"
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                info = _info(name, tarfile.SYMTYPE, 0o777, mtime=int(st.st_mtime))
                info.linkname = os.readlink(path)
                self.add(info)
            elif stat.S_ISDIR(st.st_mode):
                self.add_dir(name)
            elif stat.S_ISREG(st.st_mode):
                info = _info(name, tarfile.REGTYPE, 0o755 if st.st_mode & 0o111 else 0o644, mtime=int(st.st_mtime))
                info.size = st.st_size
                self.add(info, _path_source(path))
            else:
                raise ValueError(f"{path}: only files, folders and symlinks go into a layer")

    def write(self, store: BlobStore, level: int = 6) -> Layer:
        with store.writer() as out:
            with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=out, mtime=0) as zipped:
                digest = _Digest(zipped)
                with tarfile.open(fileobj=digest, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for entry in _ordered(self.entries):
                        if entry.source is None:
                            tar.addfile(entry.info)
                        else:
                            with entry.source() as data:
                                tar.addfile(entry.info, data)
            blob = out.commit()
        return Layer(blob, "sha256:" + digest.hash.hexdigest(), digest.size)


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, mtime
    return info


def _normalized(info: tarfile.TarInfo, epoch: int) -> tarfile.TarInfo:
    out = tarfile.TarInfo(clean_name(info.name))
    out.type, out.mode, out.uid, out.gid, out.size = info.type, info.mode & 0o7777, info.uid, info.gid, info.size
    out.linkname = clean_name(info.linkname) if info.islnk() else info.linkname
    out.devmajor, out.devminor = info.devmajor, info.devminor
    out.mtime = min(int(info.mtime), epoch)
    out.uname = out.gname = ""
    out.pax_headers = {k: v for k, v in info.pax_headers.items() if k.startswith(_KEPT_PAX_PREFIX)}
    if not (out.isreg() or out.islnk()):
        out.size = 0
    return out


def _tar_source(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Source:
    def open_member() -> IO[bytes]:
        handle = tar.extractfile(member)
        assert handle is not None
        return handle

    return open_member


def _path_source(path: Path) -> Source:
    return lambda: path.open("rb")


def _ordered(entries: Mapping[str, _Entry]) -> Iterable[_Entry]:
    """Sorted by path components (parents first); a hard link never precedes the file it names.

    Within each group of hard links the first name in order carries the data, the rest link to it.
    """
    entries = dict(entries)
    groups: dict[str, list[str]] = {}
    for name, entry in entries.items():
        if entry.info.islnk():
            groups.setdefault(entry.info.linkname, []).append(name)
    for target, links in groups.items():
        if target not in entries or not entries[target].info.isreg():
            raise ValueError(f"hard link to {target!r}, which is not a file in the layer")
        data = entries[target]
        first, *rest = sorted([target, *links], key=_path_key)
        entries[first] = _Entry(_renamed(data.info, first), data.source)
        for name in rest:
            link = _renamed(data.info, name)
            link.type, link.linkname, link.size = tarfile.LNKTYPE, first, 0
            entries[name] = _Entry(link)
    return [entries[name] for name in sorted(entries, key=_path_key)]


def _renamed(info: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    copy = _normalized(info, int(info.mtime))
    copy.name = name
    return copy


def _path_key(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ImageConfig:
    """The runtime settings of an image (the OCI config's `config` object, plus its creation time)."""

    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    user: str = ""
    working_dir: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: list[str] = field(default_factory=list)
    created: int = 0

    def to_json(self) -> dict[str, Any]:
        config: dict[str, Any] = {"Entrypoint": self.entrypoint, "Env": self.env}
        optional = {"Cmd": self.cmd, "User": self.user, "WorkingDir": self.working_dir, "Labels": self.labels,
                    "ExposedPorts": {port: {} for port in self.exposed_ports}}
        config.update({key: value for key, value in optional.items() if value})
        return config


@dataclass(frozen=True)
class Image:
    """A single-platform image whose blobs are all in one store."""

    name: str
    index: bytes
    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]

    @property
    def compressed_size(self) -> int:
        return self.manifest.size + self.config.size + sum(layer.blob.size for layer in self.layers)

    @property
    def uncompressed_size(self) -> int:
        return sum(layer.uncompressed_size for layer in self.layers)


def assemble(store: BlobStore, name: str, layers: Iterable[tuple[Layer, str]], config: ImageConfig,
             os_name: str = "linux", architecture: str = "amd64") -> Image:
    """Config, manifest and a one-entry index naming the image for `ctr images import`.

    `layers` pairs each layer with the line its history entry shows (what made it).
    """
    pairs = list(layers)
    made_by = [line for _, line in pairs]
    image_layers = tuple(layer for layer, _ in pairs)
    created = datetime.fromtimestamp(config.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config_blob = store.put_bytes(canonical_json({
        "created": created, "architecture": architecture, "os": os_name, "config": config.to_json(),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in image_layers]},
        "history": [{"created": created, "created_by": line} for line in made_by],
    }))
    manifest_blob = store.put_bytes(canonical_json({
        "schemaVersion": 2, "mediaType": MANIFEST, "config": config_blob.descriptor(CONFIG),
        "layers": [layer.blob.descriptor(LAYER) for layer in image_layers],
    }))
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = canonical_json({
        "schemaVersion": 2, "mediaType": INDEX,
        "manifests": [manifest_blob.descriptor(
            MANIFEST, platform={"architecture": architecture, "os": os_name},
            annotations={CONTAINERD_NAME: name, REF_NAME: tag},
        )],
    })
    return Image(name, index, manifest_blob, config_blob, image_layers)


def write_archive(image: Image, path: Path) -> Path:
    """An OCI layout as one uncompressed tar (what `ctr images import` and skopeo `oci-archive:` read)."""
    blobs = sorted({image.manifest, image.config, *(layer.blob for layer in image.layers)}, key=lambda b: b.digest)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for folder in ("blobs", "blobs/sha256"):
            tar.addfile(_info(folder, tarfile.DIRTYPE, 0o755))  # mtime 0: the archive is a carrier only
        for blob in blobs:
            info = _info(f"blobs/sha256/{blob.digest.removeprefix('sha256:')}", tarfile.REGTYPE, 0o644)
            info.size = blob.size
            with blob.path.open("rb") as content:
                tar.addfile(info, content)
        for name, data in (("index.json", image.index), ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')):
            info = _info(name, tarfile.REGTYPE, 0o644)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path
