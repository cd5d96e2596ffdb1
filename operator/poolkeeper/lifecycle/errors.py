"""Errors the pool reconciler needs to know about without importing the handler runtime."""


class OutboxError(Exception):
    """Pending deliveries could not be recorded: the backend must not act on them yet."""
