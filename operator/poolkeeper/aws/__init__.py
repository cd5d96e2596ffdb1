"""AWS adapters (the optional extra `poolkeeper[aws]`): aiobotocore is imported lazily, so an
operator without it still runs and says so on the objects that need it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

NOT_LEADING = "NotLeading"


class AWSError(Exception):
    """An AWS call failed; `reason` becomes the pool's Synced reason (Throttled, TargetGroupNotFound, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


NOT_INSTALLED = ("AWSSupportNotInstalled",
                 "this operator was installed without AWS support: install poolkeeper[aws] (aiobotocore)")


def installed() -> bool:
    return importlib.util.find_spec("aiobotocore") is not None


# Every AWS call that changes something: registrations, lifecycle hooks, and the queue's messages (a
# receive hides them from the next leader for their visibility timeout, a delete loses them for it).
FENCED = frozenset({"RegisterTargets", "DeregisterTargets", "CompleteLifecycleAction",
                    "RecordLifecycleActionHeartbeat", "ReceiveMessage", "DeleteMessage"})


def fence(client: Any, may_act: Callable[[], bool] | None) -> None:
    """Refuse the FENCED calls of a replica that no longer leads, as the HAProxy client does.

    Checked on botocore's `before-send` event, so at the last moment before each attempt goes on
    the wire: a leader paused mid-call (or backing off between throttled attempts) that wakes after
    another took over sends nothing more. The AWSError (reason NotLeading) is not retried.
    """
    if may_act is None:  # no leader election: always
        return

    def check(event_name: str = "", **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        if operation in FENCED and not may_act():
            raise AWSError(NOT_LEADING, f"{operation} not sent to AWS: this replica no longer leads")
    client.meta.events.register("before-send", check)
