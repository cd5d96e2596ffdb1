"""AWS adapters (the optional extra `poolkeeper[aws]`): aiobotocore is imported lazily, so an
operator without it still runs and says so on the objects that need it."""

from __future__ import annotations

import importlib.util


class AWSError(Exception):
    """An AWS call failed; `reason` becomes the pool's Synced reason (Throttled, TargetGroupNotFound, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


NOT_INSTALLED = ("AWSSupportNotInstalled",
                 "this operator was installed without AWS support: install poolkeeper[aws] (aiobotocore)")


def installed() -> bool:
    return importlib.util.find_spec("aiobotocore") is not None
