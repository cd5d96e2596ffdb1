"""Share what many instance records repeat, so 100,000 pods cost their names and little else.

The pods of one Deployment carry the same labels; every pod of a namespace carries its name.
Decoded from JSON, each is a fresh string and a fresh dict per pod. Records keep one shared copy
instead: label maps are looked up by their items (a map lives while some record holds it, so
a tenant's unique labels cost no more than before), and label keys, values and namespaces are
interned (CPython frees an interned string with its last reference). Shared maps are never
mutated: records are read-only.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping

from poolkeeper.core.model import NO_ENTRIES


class Labels(dict[str, str]):
    """A label map that can be shared (a plain dict cannot be weakly referenced)."""

    __slots__ = ("__weakref__",)


_LABELS: weakref.WeakValueDictionary[tuple[tuple[str, str], ...], Labels] = weakref.WeakValueDictionary()


def shared_labels(labels: Mapping[str, str] | None) -> Mapping[str, str]:
    """The one map equal to `labels` that records share (insertion order as the API server sends it)."""
    if not labels:
        return NO_ENTRIES
    items = tuple(labels.items())
    found = _LABELS.get(items)
    if found is None:
        found = _LABELS[items] = Labels((sys.intern(str(k)), sys.intern(str(v))) for k, v in items)
    return found


def shared_name(text: str) -> str:
    """A namespace (or other name many records repeat), interned."""
    return sys.intern(text) if type(text) is str else text
