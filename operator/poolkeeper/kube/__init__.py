"""Thin adapters to the Kubernetes API: credentials, an async client, Events, status writes."""
