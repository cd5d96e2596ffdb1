"""Lambda-style lifecycle handlers: transitions -> outbox -> ordered, retried deliveries."""

from poolkeeper.lifecycle.handlers import LifecycleHandlers

__all__ = ["LifecycleHandlers"]
