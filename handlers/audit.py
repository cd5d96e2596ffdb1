"""Audit log of pool member transitions: one JSON line per event.

Each line goes to the function's logger (so it shows in the operator's log) and, if the
environment variable POOLKEEPER_AUDIT_LOG names a file, is appended to that file too.
Returns {"logged": <event id>}. Because the event id is the same on every retry, a consumer
can de-duplicate lines by "id".

Use it for every transition of a pool:

    apiVersion: poolkeeper.dev/v1alpha1
    kind: LifecycleHandler
    metadata:
      name: web-audit
      namespace: default
    spec:
      poolRef:
        name: web
      events: [up, draining, down, registered, deregistered]
      function:
        type: Python
        python:
          handler: audit.handle
      timeoutSeconds: 5
"""

from __future__ import annotations

import json
import os
from typing import Any


def audit_record(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The fields worth keeping from an event, flat so log tools can index them."""
    data = event.get("data") or {}
    pool = data.get("pool") or {}
    instance = data.get("instance") or {}
    return {
        "time": event.get("time"),
        "id": event.get("id"),
        "type": event.get("type"),
        "subject": event.get("subject"),
        "pool": f"{pool.get('namespace')}/{pool.get('name')}",
        "from": data.get("from"),
        "to": data.get("to"),
        "reason": data.get("reason"),
        "address": instance.get("address"),
        "port": instance.get("port"),
        "handler": getattr(context, "function_name", None),
        "attempt": getattr(context, "attempt", None),
    }


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Write the audit line; see the module docstring."""
    line = json.dumps(audit_record(event, context), separators=(",", ":"), sort_keys=True)
    context.log.info(line)
    path = os.environ.get("POOLKEEPER_AUDIT_LOG")
    if path:
        # One write() of one line in append mode: concurrent workers' lines don't interleave.
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
    return {"logged": event.get("id")}
