"""The handlers shipped in handlers/: audit, warmup (against a real local HTTP server), annotate's patch."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from poolkeeper.functions.invoke_cli import sample_event
from poolkeeper.functions.resolver import check_handler, load_handler, load_module
from poolkeeper.functions.worker import InvocationContext

HANDLERS = Path(__file__).resolve().parents[2] / "handlers"


def context(name: str, seconds: float = 5.0) -> InvocationContext:
    return InvocationContext(function_name=name, event_id="evt", attempt=1, deadline=time.monotonic() + seconds)


def event(kind: str = "Pod", namespace: str = "shop", name: str = "web-1", port: int = 8080) -> dict[str, Any]:
    return sample_event(event="up", kind=kind, namespace=namespace, name=name, pool="web", address="127.0.0.1",
                        port=port)


@pytest.mark.parametrize("name", ["audit.handle", "warmup.handle", "annotate.handle"])
def test_shipped_handlers_load(name: str) -> None:
    check_handler(HANDLERS, name)


@pytest.mark.parametrize("file", ["audit", "warmup", "annotate"])
def test_docstring_shows_a_lifecycle_handler(file: str) -> None:
    doc = load_module(HANDLERS, file).__doc__ or ""
    assert "kind: LifecycleHandler" in doc and f"handler: {file}.handle" in doc


def test_audit_writes_one_json_line_per_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log_file = tmp_path / "audit.jsonl"
    monkeypatch.setenv("POOLKEEPER_AUDIT_LOG", str(log_file))
    handle = load_handler(HANDLERS, "audit.handle")
    first, second = event(), event(name="web-2")
    with caplog.at_level(logging.INFO, logger="poolkeeper.function.audit"):
        assert handle(first, context("audit")) == {"logged": first["id"]}
        assert handle(second, context("audit")) == {"logged": second["id"]}
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [line["id"] for line in lines] == [first["id"], second["id"]]
    assert lines[0] == {
        "time": first["time"], "id": first["id"], "type": "dev.poolkeeper.instance.up", "subject": "Pod/shop/web-1",
        "pool": "shop/web", "from": "down", "to": "up", "reason": "sample event from poolkeeper invoke",
        "address": "127.0.0.1", "port": 8080, "handler": "audit", "attempt": 1,
    }
    assert [json.loads(r.getMessage())["id"] for r in caplog.records] == [first["id"], second["id"]]


def test_audit_without_a_file_only_logs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("POOLKEEPER_AUDIT_LOG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_handler(HANDLERS, "audit.handle")(event(), context("audit"))["logged"]
    assert list(tmp_path.iterdir()) == []


class Flaky(BaseHTTPRequestHandler):
    """503 for the first `failures` GETs, then 200; records the paths asked for."""

    failures = 0
    paths: list[str] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        status = 503 if len(type(self).paths) <= type(self).failures else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[tuple[type[Flaky], int]]:
    handler = type("FlakyForTest", (Flaky,), {"failures": 2, "paths": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, server.server_address[1]
    server.shutdown()
    server.server_close()


def test_warmup_retries_until_200(flaky_server: tuple[type[Flaky], int], monkeypatch: pytest.MonkeyPatch) -> None:
    handler, port = flaky_server
    monkeypatch.setenv("WARMUP_PATH", "/healthz")
    result = load_handler(HANDLERS, "warmup.handle")(event(port=port), context("warmup"))
    assert result == {"warm": True, "attempts": 3, "url": f"http://127.0.0.1:{port}/healthz"}
    assert handler.paths == ["/healthz"] * 3


def test_warmup_gives_up_when_time_runs_out(flaky_server: tuple[type[Flaky], int]) -> None:
    handler, port = flaky_server
    handler.failures = 10**6
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not answer 200 in time \(\d+ attempts, last: HTTP 503\)"):
        load_handler(HANDLERS, "warmup.handle")(event(port=port), context("warmup", seconds=0.8))
    assert time.monotonic() - started < 0.8  # fails by itself, before the operator would kill it
    assert len(handler.paths) >= 3


def test_warmup_reports_an_unreachable_instance() -> None:
    with pytest.raises(TimeoutError, match="last: URLError"):
        load_handler(HANDLERS, "warmup.handle")(event(port=1), context("warmup", seconds=0.5))


def test_warmup_urls() -> None:
    probe_url = load_module(HANDLERS, "warmup").probe_url
    v6 = event()
    v6["data"]["instance"]["address"] = "fd00::1"
    assert probe_url(v6) == "http://[fd00::1]:8080/"
    no_port = event()
    no_port["data"]["instance"]["port"] = None
    with pytest.raises(ValueError, match="no address and port"):
        probe_url(no_port)


def test_annotate_patch_body() -> None:
    module = load_module(HANDLERS, "annotate")
    sent = event()
    body = module.patch_body(sent)
    value = json.loads(body["metadata"]["annotations"]["poolkeeper.dev/last-transition"])
    assert value == {"type": "dev.poolkeeper.instance.up", "id": sent["id"], "time": sent["time"], "pool": "shop/web"}
    assert list(body) == ["metadata"] and list(body["metadata"]) == ["annotations"]


@pytest.mark.parametrize(
    ("kind", "namespace", "expected"),
    [("Pod", "shop", ("Pod", "shop", "web-1")), ("Node", "", ("Node", "", "web-1")),
     ("Instance", "shop", ("Instance", "shop", "web-1"))],
)
def test_annotate_targets(kind: str, namespace: str, expected: tuple[str, str, str]) -> None:
    assert load_module(HANDLERS, "annotate").patch_target(event(kind=kind, namespace=namespace)) == expected


def test_annotate_refuses_other_kinds() -> None:
    with pytest.raises(ValueError, match="only Pods, Nodes and Instances"):
        load_module(HANDLERS, "annotate").patch_target(event(kind="Service"))
