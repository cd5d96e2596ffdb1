"""The machine check every make target and .ci/run start with (pure lookups, no installs here)."""

from __future__ import annotations

import pytest

from poolkeeper_dev import requirements
from poolkeeper_dev.requirements import NEEDS, MissingRequirement, Need


def test_a_missing_program_is_named_with_the_package_that_brings_it(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = Need("haproxy", ("/nonexistent/haproxy",), "haproxy")
    monkeypatch.setitem(NEEDS, "demo", (absent,))
    with pytest.raises(MissingRequirement, match=r"missing: haproxy \(apt-get install haproxy\)"):
        requirements.ensure(["demo"], install=False)


def test_a_program_apt_cannot_bring_says_where_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    go = Need("go", ("/nonexistent/go",), None, "install Go 1.24 or newer")
    monkeypatch.setitem(NEEDS, "control-plane", (go,))
    with pytest.raises(MissingRequirement, match=r"install Go 1\.24 or newer"):
        requirements.ensure(["control-plane"], install=True)  # nothing apt can do: no install is tried


def test_present_programs_pass_and_each_is_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    here = Need("python", ("python3",), None)
    gone = Need("x", ("/nonexistent/x",), "x-pkg")
    monkeypatch.setitem(NEEDS, "demo", (here, gone))
    monkeypatch.setitem(NEEDS, "haproxy", (gone,))
    assert requirements.missing(["demo", "haproxy"]) == [gone]
    requirements.ensure([], install=False)


def test_the_test_suite_needs_everything_the_node_and_images_need() -> None:
    names = {need.name for need in NEEDS["test"]}
    assert {"containerd", "runc", "CNI bridge plugin", "mmdebstrap", "haproxy", "go", "openssl"} <= names
