"""The development HAProxy (poolkeeper_dev.haproxy) the tests and benchmarks start: a port taken
between picking it and binding it costs a retry on fresh ports, never a failed run."""

from __future__ import annotations

import socket
from pathlib import Path

from poolkeeper_dev.haproxy import HAProxyProcess


def test_a_frontend_port_taken_before_the_first_start_is_replaced(tmp_path: Path) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web", "api"))
    proc.frontend_ports["api"] = taken  # as if another process took it after free_port() picked it
    proc.declared["web"] = f"127.0.0.1:{taken} backup"  # points at fe_api: it must follow the move
    try:
        proc.start()
        moved = proc.frontend_ports["api"]
        assert moved != taken
        assert proc.declared["web"] == f"127.0.0.1:{moved} backup"
        socket.create_connection(("127.0.0.1", moved), timeout=5).close()  # HAProxy listens there
        proc.stop()
        proc.start()
        assert proc.frontend_ports["api"] == moved  # a restart is the same HAProxy: same ports
    finally:
        proc.stop()
        squatter.close()


def test_a_port_taken_before_a_restart_is_an_error_not_a_move(tmp_path: Path) -> None:
    proc = HAProxyProcess(tmp_path / "haproxy", backends=("web",))
    proc.start()
    proc.stop()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", proc.frontend_ports["web"]))
    squatter.listen()
    try:
        try:
            proc.start()
        except RuntimeError as exc:
            assert "Address already in use" in str(exc)
        else:
            proc.stop()
            raise AssertionError("HAProxy started on a port another process holds")
    finally:
        squatter.close()
