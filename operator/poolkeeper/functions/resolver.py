"""Find `file.function` in a handlers directory and load it, reloading when the file changes.

Modules are compiled from source ourselves (no importlib bytecode cache) because .pyc
validation only looks at whole-second mtimes and size: an edit within the same second could run
stale code, and handlers dirs are often read-only ConfigMap mounts where .pyc can't be written.
Only successful loads are cached (keyed by the file's stat); a broken file is re-read every time,
so fixing it takes effect on the next call without restarting anything.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
MODULE_PREFIX = "poolkeeper_handlers."


class HandlerLoadError(Exception):
    """A handler can't be loaded; the message is meant for a Ready condition as is."""


@dataclass(frozen=True, slots=True)
class _Loaded:
    stamp: tuple[int, int, int, int]
    module: types.ModuleType


_cache: dict[str, _Loaded] = {}
_lock = threading.Lock()  # exec of module code and sys.path juggling are not thread-safe


def split_name(name: str) -> tuple[str, str]:
    """`("audit", "handle")` for `"audit.handle"`; HandlerLoadError unless FILE.FUNCTION."""
    match = _NAME.match(name)
    if not match:
        raise HandlerLoadError(
            f"handler {name!r} must be FILE.FUNCTION, two Python identifiers joined by one dot "
            "(e.g. audit.handle calls handle() in audit.py)"
        )
    return match.group(1), match.group(2)


def _stamp(path: Path) -> tuple[int, int, int, int]:
    """What identifies one version of a file: changes on edit, on atomic replace and on remount."""
    st = path.stat()
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def load_module(handlers_dir: str | os.PathLike[str], file: str) -> types.ModuleType:
    """The module in `<handlers_dir>/<file>.py`, executed afresh whenever the file changed."""
    path = Path(handlers_dir) / f"{file}.py"
    try:
        stamp = _stamp(path)
    except FileNotFoundError:
        raise HandlerLoadError(f"{path} not found") from None
    except OSError as exc:
        raise HandlerLoadError(f"{path} can't be read: {exc.strerror or exc}") from None
    key = str(path)
    with _lock:
        cached = _cache.get(key)
        if cached is not None and cached.stamp == stamp:
            return cached.module
        _cache.pop(key, None)
        module = _execute(path, file)
        _cache[key] = _Loaded(stamp, module)
        return module


def _execute(path: Path, file: str) -> types.ModuleType:
    """Compile and run `path` as a new module; any failure becomes a HandlerLoadError."""
    module_name = MODULE_PREFIX + file
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    # In sys.modules while it runs, as for a normal import (dataclasses and pickle look it up).
    previous = sys.modules.get(module_name)
    sys.modules[module_name] = module
    handlers_dir = str(path.parent)
    sys.path.insert(0, handlers_dir)  # lets a handler import helper modules next to it
    try:
        source = path.read_bytes()
        code = compile(source, str(path), "exec", dont_inherit=True)
        exec(code, module.__dict__)
    except (Exception, SystemExit) as exc:
        if previous is None:
            sys.modules.pop(module_name, None)
        else:
            sys.modules[module_name] = previous
        raise HandlerLoadError(f"{path.name} failed to import: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(handlers_dir)
    return module


def load_handler(handlers_dir: str | os.PathLike[str], name: str) -> Callable[..., Any]:
    """The function `name` (FILE.FUNCTION) from the handlers dir; HandlerLoadError if unusable."""
    file, function = split_name(name)
    module = load_module(handlers_dir, file)
    if not hasattr(module, function):
        raise HandlerLoadError(f"{file}.py has no function {function!r}")
    handler = getattr(module, function)
    refused = refuse_handler(module, function, handler)
    if refused:
        raise HandlerLoadError(f"{file}.py: {refused}")
    return handler  # type: ignore[no-any-return]


def refuse_handler(module: types.ModuleType, function: str, handler: Any) -> str | None:
    """Why `handler` may not be a LifecycleHandler's entry point, or None.

    Only public functions defined in the file itself: a handler name chosen by a tenant must not
    reach a class (`audit.__class__`), a private helper or client (`annotate._client`), or
    something the module imported (`os.system` as `audit.system`).
    """
    if function.startswith("_"):
        return f"{function!r} is private (names starting with '_' can't be handlers)"
    if not (inspect.isfunction(handler) or inspect.iscoroutinefunction(handler)):
        return f"{function!r} is not a function defined with def (it is a {type(handler).__name__})"
    if handler.__module__ != module.__name__:
        return f"{function!r} is imported from {handler.__module__}, not defined in this file"
    return None


def check_handler(handlers_dir: str | os.PathLike[str], name: str) -> None:
    """Raise HandlerLoadError if `name` can't be called; runs the module's top-level code.

    In the operator prefer FunctionPool.check, which runs this in a worker process so a module
    that hangs or crashes at import can't take the operator with it.
    """
    load_handler(handlers_dir, name)
