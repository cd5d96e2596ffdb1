"""Which Lease a write is fenced by, carried in the asyncio context.

With one Lease every write checks it (KubeApi.may_write, the HAProxy and AWS clients' may_act).
With shards, a write belongs to one shard's work: the code that starts that work (a pool's
reconcile, a handler's deliveries, a LoadBalancer's status) runs it inside `fenced(check)`, and
every task it starts inherits the check (asyncio copies the context into new tasks), so a status
flush or an Event posted later is still refused once that shard is lost. `current()` is what the
write path asks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Check = Callable[[], bool]
_FENCE: ContextVar[Check | None] = ContextVar("poolkeeper_fence", default=None)


@contextlib.contextmanager
def fenced(check: Check | None) -> Iterator[None]:
    """Run the block (and every task started in it) fenced by `check` (None: no fence of its own)."""
    token = _FENCE.set(check)
    try:
        yield
    finally:
        _FENCE.reset(token)


def current() -> Check | None:
    return _FENCE.get()


def always() -> bool:
    """The fence of work any replica may do (deleting the outbox of a handler that is gone)."""
    return True
