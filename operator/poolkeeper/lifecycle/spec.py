"""LifecycleHandler specs as a frozen record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    namespace: str
    name: str
    uid: str
    generation: int
    pool: str
    events: frozenset[str]
    function_type: str  # Python | HTTP
    python_handler: str = ""
    url: str = ""
    secret: tuple[str, str] | None = None  # (secret name, key)
    blocking: bool = False
    on_failure: str = "Continue"
    timeout: float = 10.0
    max_attempts: int = 3
    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    dead_letter_url: str = ""
    max_concurrency: int = 16
    max_pending: int = 500  # undelivered non-blocking events kept; older ones are dead-lettered

    @property
    def function_name(self) -> str:
        return self.python_handler or self.url


def parse_handler(obj: Mapping[str, Any]) -> HandlerSpec:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    function = spec.get("function") or {}
    http = function.get("http") or {}
    secret = http.get("secretRef")
    retry = spec.get("retry") or {}
    return HandlerSpec(
        namespace=meta.get("namespace") or "", name=meta.get("name") or "", uid=meta.get("uid") or "",
        generation=int(meta.get("generation") or 0), pool=(spec.get("poolRef") or {}).get("name", ""),
        events=frozenset(spec.get("events") or []), function_type=function.get("type") or "",
        python_handler=(function.get("python") or {}).get("handler", ""), url=http.get("url", ""),
        secret=(secret["name"], secret["key"]) if secret else None, blocking=bool(spec.get("blocking")),
        on_failure=spec.get("onFailure") or "Continue", timeout=float(spec.get("timeoutSeconds") or 10),
        max_attempts=int(retry.get("maxAttempts") or 3), initial_backoff=float(retry.get("initialBackoffSeconds") or 1),
        max_backoff=float(retry.get("maxBackoffSeconds") or 60),
        dead_letter_url=((spec.get("deadLetter") or {}).get("http") or {}).get("url", ""),
        max_concurrency=int(spec.get("maxConcurrency") or 16),
        max_pending=int(spec.get("maxPendingEvents") or 500),
    )
