"""Helpers that start real things for tests and demos: HAProxy, HTTP backends, load."""
