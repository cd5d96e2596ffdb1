"""Shared fixtures. Integration tests run against a real kube-apiserver + etcd started here.

If the control plane cannot be built or started, the fixture FAILS with the reason: it never
skips, so a broken environment can not pass for a green run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolkeeper_dev import Cluster
from support.kube import install_crds

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real control plane for the whole test session (reuses POOLKEEPER_TEST_CLUSTER if set)."""
    reuse = os.environ.get("POOLKEEPER_TEST_CLUSTER")
    root = Path(reuse) if reuse else tmp_path_factory.mktemp("devcluster")
    try:
        started = Cluster(root).up()
    except Exception as exc:
        pytest.fail(f"the local control plane could not start: {exc}", pytrace=False)
    install_crds(started)
    yield started
    if not reuse:
        started.down()
