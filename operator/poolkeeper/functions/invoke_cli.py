"""`poolkeeper invoke FILE.FUNCTION`: run a handler once on a realistic sample event.

It goes through the same FunctionPool and event builder as the operator, so what works here
works there (apart from the cluster access a handler may need).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from poolkeeper.core.cloudevents import EVENT_TYPES, build_event
from poolkeeper.functions.pool import FunctionPool, InvocationResult

# A plausible previous state for each event, so the sample's from/to read like the real thing.
_FROM_TO = {
    "up": ("down", "up"),
    "draining": ("up", "draining"),
    "down": ("draining", "down"),
    "registered": ("unregistered", "registered"),
    "deregistered": ("registered", "unregistered"),
}
_SAMPLE_UIDS = uuid.UUID("0b5e4f47-5f0c-4c8e-9a55-3f1f0f1f7c2a")  # uuid5 namespace: stable sample uids


def _instance_ref(value: str) -> tuple[str, str, str]:
    """(kind, namespace, name) from `Kind/namespace/name` or `Node/name`."""
    parts = value.split("/")
    if len(parts) == 2 and parts[0] == "Node" and parts[1]:
        return "Node", "", parts[1]
    if len(parts) == 3 and all(parts) and parts[0] != "Node":
        return parts[0], parts[1], parts[2]
    raise argparse.ArgumentTypeError(f"{value!r} is not Kind/namespace/name (or Node/name)")


def _sample_uid(what: str) -> str:
    return str(uuid.uuid5(_SAMPLE_UIDS, what))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolkeeper invoke", description="Run a Python handler function once on a sample event."
    )
    parser.add_argument("handler", help="FILE.FUNCTION, e.g. audit.handle calls handle() in audit.py")
    parser.add_argument("--event", choices=tuple(EVENT_TYPES), default="up", help="transition (default: up)")
    parser.add_argument(
        "--instance", type=_instance_ref, default=("Pod", "default", "web-1"),
        help="Kind/namespace/name or Node/name (default: Pod/default/web-1)",
    )
    parser.add_argument("--pool", default="sample-pool", help="TargetPool name (default: sample-pool)")
    parser.add_argument(
        "--handlers-dir", default=os.environ.get("POOLKEEPER_HANDLERS_DIR", "handlers"),
        help="folder holding FILE.py (default: $POOLKEEPER_HANDLERS_DIR, else ./handlers)",
    )
    parser.add_argument("--address", default="127.0.0.1", help="instance address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="instance port (default: 8080)")
    parser.add_argument("--timeout", type=float, default=10.0, help="time limit in seconds (default: 10)")
    parser.add_argument("--show-event", action="store_true", help="print the event sent to the function too")
    return parser


def sample_event(
    *, event: str, kind: str, namespace: str, name: str, pool: str, address: str, port: int
) -> dict[str, Any]:
    """A CloudEvent like the operator would send, with stable made-up uids."""
    ref = f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"
    pool_namespace = namespace or "default"
    from_state, to_state = _FROM_TO[event]
    return build_event(
        handler_uid=_sample_uid("handler"),
        pool_uid=_sample_uid(f"pool/{pool_namespace}/{pool}"),
        pool_namespace=pool_namespace,
        pool_name=pool,
        instance={
            "kind": kind, "namespace": namespace, "name": name, "uid": _sample_uid(ref),
            "address": address, "port": port, "labels": {"app": name.rsplit("-", 1)[0]},
        },
        event_type=event,
        sequence=1,
        from_state=from_state,
        to_state=to_state,
        reason="sample event from poolkeeper invoke",
        time=datetime.now(UTC),
    )


async def _invoke_once(directory: str, handler: str, event: dict[str, Any], limit: float) -> InvocationResult:
    async with FunctionPool(size=1) as pool:
        return await pool.invoke(
            directory, handler, event, timeout=limit, attempt=1, function_name=handler.split(".", 1)[0]
        )


def invoke_main(argv: list[str]) -> int:
    """Entry point; argv excludes `invoke`. 0 if the function succeeded, 1 if it failed."""
    args = build_parser().parse_args(argv)
    kind, namespace, name = args.instance
    event = sample_event(
        event=args.event, kind=kind, namespace=namespace, name=name, pool=args.pool,
        address=args.address, port=args.port,
    )
    if args.show_event:
        print(json.dumps(event, indent=2))
    print(f"event id: {event['id']}")
    result = asyncio.run(_invoke_once(args.handlers_dir, args.handler, event, args.timeout))
    if not result.ok:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    print(json.dumps(result.value, indent=2))
    return 0
