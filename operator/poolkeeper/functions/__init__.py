"""Running LifecycleHandler functions: Python handlers in worker processes, HTTP handlers by POST.

resolver: find FILE.FUNCTION in the handlers dir; worker: the code inside a worker process;
pool: the FunctionPool the operator invokes through; http: CloudEvents delivery over HTTP;
invoke_cli: `poolkeeper invoke`, to try a handler by hand.
"""

from poolkeeper.functions.http import (
    DeliveryResult,
    check_url_allowed,
    deliver_http,
    make_http_session,
    parse_cidrs,
)
from poolkeeper.functions.pool import FunctionPool, InvocationResult
from poolkeeper.functions.resolver import HandlerLoadError, check_handler

__all__ = [
    "DeliveryResult",
    "FunctionPool",
    "HandlerLoadError",
    "InvocationResult",
    "check_handler",
    "check_url_allowed",
    "deliver_http",
    "make_http_session",
    "parse_cidrs",
]
