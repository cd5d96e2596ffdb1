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
