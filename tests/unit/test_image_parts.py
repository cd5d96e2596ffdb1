"""The pure parts of the image build: layer ordering and determinism, apt sources, containerd's config."""

from __future__ import annotations

import gzip
import io
import tarfile
import tomllib
from pathlib import Path

import pytest

from poolkeeper_dev import debian, oci
from poolkeeper_dev.containerd import ContainerdConfig


def _tar(*members: tuple[str, bytes, bytes | None]) -> tarfile.TarFile:
    """A tar of (name, type, data-or-linkname) in the given order, with a late mtime."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.uname = kind, 2_000_000_000, "someone"
            if kind == tarfile.LNKTYPE:
                info.linkname = (payload or b"").decode()
                tar.addfile(info)
            elif kind == tarfile.REGTYPE:
                info.size = len(payload or b"")
                tar.addfile(info, io.BytesIO(payload or b""))
            else:
                tar.addfile(info)
    buffer.seek(0)
    return tarfile.open(fileobj=buffer)


def _members(layer: oci.Layer) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.blob.path.read_bytes()))) as tar:
        return [*tar.getmembers()]


def test_layers_are_sorted_clamped_and_identical_when_rebuilt(tmp_path: Path) -> None:
    store = oci.BlobStore(tmp_path)
    members = (("./usr/bin/b", tarfile.REGTYPE, b"b"), ("./usr/", tarfile.DIRTYPE, None),
               ("./usr/bin/", tarfile.DIRTYPE, None), ("./", tarfile.DIRTYPE, None), ("./etc", tarfile.DIRTYPE, None))
    layers = []
    for order in (members, members[::-1]):
        builder = oci.LayerBuilder(epoch=1000)
        builder.add_tar(_tar(*order))
        layers.append(builder.write(store))
    assert layers[0] == layers[1]
    written = _members(layers[0])
    assert [m.name for m in written] == ["etc", "usr", "usr/bin", "usr/bin/b"]
    assert {(m.mtime, m.uname) for m in written} == {(1000, "")}


def test_a_hard_link_never_precedes_the_file_it_names(tmp_path: Path) -> None:
    """Sorted, `a` comes before `z`: so `a` carries the data and `z` becomes the link."""
    builder = oci.LayerBuilder(epoch=0)
    builder.add_tar(_tar(("z", tarfile.REGTYPE, b"data"), ("a", tarfile.LNKTYPE, b"z")))
    first, second = _members(builder.write(oci.BlobStore(tmp_path)))
    assert (first.name, first.isreg(), first.size) == ("a", True, 4)
    assert (second.name, second.islnk(), second.linkname) == ("z", True, "a")


def test_edits_must_find_their_file(tmp_path: Path) -> None:
    builder = oci.LayerBuilder(epoch=0)
    with pytest.raises(ValueError, match="etc/group"):
        builder.add_tar(_tar(("etc/passwd", tarfile.REGTYPE, b"root\n")), edits={"etc/group": lambda data: data})


SOURCES = """\
Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"""


def test_the_mirror_is_the_one_serving_the_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(SOURCES)
    (tmp_path / "sources.list.d" / "cloud.list").write_text("deb https://packages.example/apt cloud-bookworm main\n")
    (tmp_path / "sources.list.d" / "old.list.disabled").write_text("deb http://elsewhere/debian bookworm main\n")
    mirror = debian.host_mirror("bookworm", debian.read_apt_sources(tmp_path))
    assert mirror == debian.Mirror("http://mirror.example/debian", "http://mirror.example/debian-security")
    assert mirror.source_lines("bookworm")[-1] == "deb http://mirror.example/debian-security bookworm-security main"


def test_containerd_config_is_valid_toml(tmp_path: Path) -> None:
    config = ContainerdConfig(root=tmp_path / "root", state=tmp_path / "state", address=tmp_path / "c.sock", cri=True,
                              cni_bin_dir=Path("/usr/lib/cni"), cni_conf_dir=tmp_path / "net.d")
    parsed = tomllib.loads(config.toml())
    cri = parsed["plugins"]["io.containerd.grpc.v1.cri"]
    assert parsed["grpc"]["address"] == str(tmp_path / "c.sock") and parsed["disabled_plugins"] == []
    assert cri["sandbox_image"] == "registry.k8s.io/pause:3.10"
    assert cri["containerd"]["runtimes"]["runc"]["options"] == {"SystemdCgroup": False}
    assert cri["cni"]["conf_dir"] == str(tmp_path / "net.d")
    without_cri = tomllib.loads(ContainerdConfig(root=tmp_path, state=tmp_path, address=tmp_path / "s").toml())
    assert without_cri["disabled_plugins"] == ["io.containerd.grpc.v1.cri"]
