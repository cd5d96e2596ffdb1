"""Warm-up probe for a blocking `up` hook: hold a new member out of rotation until it answers 200.

GETs http://<instance address>:<port><WARMUP_PATH> every 0.2 s until the answer is 200
(WARMUP_PATH is an environment variable, default "/"). If the function's time runs out first
it raises, so the hook fails and spec.onFailure decides what happens to the member.
Returns {"warm": true, "attempts": N, "url": ...}.

    apiVersion: poolkeeper.dev/v1alpha1
    kind: LifecycleHandler
    metadata:
      name: web-warmup
      namespace: default
    spec:
      poolRef:
        name: web
      events: [up]
      blocking: true           # the member joins the rotation only after this returns
      onFailure: Abandon       # never send traffic to a member that did not warm up
      function:
        type: Python
        python:
          handler: warmup.handle
      timeoutSeconds: 60       # how long a member may take to warm up
      retry:
        maxAttempts: 1
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from typing import Any

INTERVAL = 0.2  # seconds between probes
MARGIN = 0.1  # seconds kept back so we fail with our own message before the operator kills us
MAX_REQUEST_SECONDS = 2.0

# No proxies: instance addresses are cluster-internal, whatever HTTP_PROXY says.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe_url(event: dict[str, Any]) -> str:
    """The URL to probe for the instance in `event`."""
    instance = (event.get("data") or {}).get("instance") or {}
    address, port = instance.get("address"), instance.get("port")
    if not address or not port:
        raise ValueError(f"{event.get('subject')} has no address and port to probe")
    host = f"[{address}]" if ":" in str(address) else str(address)
    path = os.environ.get("WARMUP_PATH", "/")
    return f"http://{host}:{port}{path if path.startswith('/') else '/' + path}"


def _status(url: str, timeout: float) -> str | int:
    """The HTTP status of a GET, or a short description of why there was none."""
    try:
        with _opener.open(url, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


def handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Probe until 200 or until the time runs out; see the module docstring."""
    url = probe_url(event)
    attempts = 0
    last: str | int = "no time left to probe"
    while True:
        remaining = context.remaining_time_ms() / 1000 - MARGIN
        if remaining <= 0:
            break
        attempts += 1
        last = _status(url, min(MAX_REQUEST_SECONDS, remaining))
        if last == 200:
            context.log.info("%s is warm after %d attempt(s)", url, attempts)
            return {"warm": True, "attempts": attempts, "url": url}
        if context.remaining_time_ms() / 1000 - MARGIN <= INTERVAL:
            break
        time.sleep(INTERVAL)
    raise TimeoutError(f"{url} did not answer 200 in time ({attempts} attempts, last: {_describe(last)})")


def _describe(last: str | int) -> str:
    return f"HTTP {last}" if isinstance(last, int) else str(last)
