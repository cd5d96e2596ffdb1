"""Free loopback ports for the processes the dev tools start."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_again(previous: object, host: str = "") -> int:
    """The port used last time when it is still free, else a new one.

    A cluster folder started again keeps its API server address, so its kubeconfig stays valid and
    the `kubernetes` Service's endpoints stored in etcd are not left pointing at an old port.
    """
    if isinstance(previous, int) and previous > 0:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, previous))
                return previous
            except OSError:
                pass
    return free_port()
