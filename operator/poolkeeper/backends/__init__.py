"""Load balancer adapters behind one small protocol: read what is there, apply a plan.

The core decides; a backend only moves bytes and says, per action, whether it worked, so a
failed action is retried by the next reconcile instead of being remembered here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from poolkeeper.core.model import Action, ActualMember


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What became of one action; `message` is the load balancer's own words when it failed."""

    action: Action
    ok: bool
    message: str = ""


class Backend(Protocol):
    """One pool's members in one load balancer."""

    async def read_members(self) -> dict[str, ActualMember]:
        """The pool's members as the load balancer reports them now, by name."""
        ...

    async def apply(self, actions: Sequence[Action]) -> list[ActionResult]:
        """Carry out `actions` in order; one result per action, failures are not exceptions."""
        ...


class ServerBackend(Backend, Protocol):
    """A backend of servers (HAProxy) that reads them back in the round trip of its actions, and
    reads only what a pool without health checks needs to see that nothing moved."""

    async def apply_and_read(self, actions: Sequence[Action]) -> tuple[list[ActionResult],
                                                                       dict[str, ActualMember] | None]:
        """`apply`, then the pool's members as the actions left them (None: not to be trusted)."""
        ...

    async def read_servers(self) -> dict[str, ActualMember]:
        """The members without sessions or check results (right for servers without checks)."""
        ...
