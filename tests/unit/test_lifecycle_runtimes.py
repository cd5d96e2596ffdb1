"""Runtimes: a pool's handlers come from an index that follows every change of the map."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from poolkeeper.lifecycle.handlers import Runtimes


def runtime(pool: str) -> Any:
    return SimpleNamespace(spec=SimpleNamespace(pool=pool))


def test_a_pools_handlers_follow_adds_replacements_and_removals() -> None:
    runtimes = Runtimes()
    a, b, c = runtime("web"), runtime("web"), runtime("api")
    runtimes[("ns", "a")] = a
    runtimes[("ns", "b")] = b
    runtimes[("other", "c")] = c
    assert runtimes.for_pool("ns", "web") == [a, b]  # in the order they were loaded
    assert runtimes.for_pool("ns", "api") == []  # another namespace's pool of that name is not this one
    assert runtimes.for_pool("other", "api") == [c]
    moved = runtime("api")
    runtimes[("ns", "a")] = moved  # a handler moved to another pool: a new runtime
    assert runtimes.for_pool("ns", "web") == [b] and runtimes.for_pool("ns", "api") == [moved]
    assert runtimes.pop(("ns", "b")) is b and runtimes.for_pool("ns", "web") == []
    assert runtimes.pop(("ns", "b"), None) is None
    with pytest.raises(KeyError):
        runtimes.pop(("ns", "b"))
    del runtimes[("other", "c")]
    assert runtimes.for_pool("other", "api") == []
    runtimes.clear()
    assert runtimes.for_pool("ns", "api") == [] and not runtimes
    d, e, f = runtime("web"), runtime("web"), runtime("web")
    runtimes.update({("ns", "d"): d})
    assert runtimes.for_pool("ns", "web") == [d]
    assert runtimes.setdefault(("ns", "e"), e) is e and runtimes.for_pool("ns", "web") == [d, e]
    assert runtimes.popitem() == (("ns", "e"), e) and runtimes.for_pool("ns", "web") == [d]
    runtimes.update([(("ns", "f"), f)])
    assert runtimes.for_pool("ns", "web") == [d, f]
