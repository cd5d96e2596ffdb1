"""Pods backed by real HTTP servers: each pod gets its own 127.x address, all on one port.

The stand-in kubelet makes a pod ready by status writes; the HTTP server behind its address
is what the load balancer really sends traffic to. Shared by the demo, tests and benchmarks.
"""

from __future__ import annotations

import itertools

from poolkeeper_dev.ports import free_port
from poolkeeper_dev.standin_kubelet import FakeKubelet
from poolkeeper_dev.traffic import HTTPBackend, start_backend

_subnets = itertools.count(1)


class Workload:
    def __init__(self, kubelet: FakeKubelet, namespace: str, app: str, gates: tuple[str, ...] = (),
                 subnet: int | None = None) -> None:
        self.kubelet, self.namespace, self.app, self.gates = kubelet, namespace, app, gates
        self.port = free_port()
        self.subnet = next(_subnets) if subnet is None else subnet
        self.backends: dict[str, HTTPBackend] = {}
        self.ips: dict[str, str] = {}
        self.counter = itertools.count(1)

    def add(self, name: str, *, serve: bool = True) -> str:
        """Start the pod's server (unless `serve` is False), create the pod and make it ready."""
        n = next(self.counter)
        ip = f"127.{100 + self.subnet}.{n // 250}.{n % 250 + 1}"
        self.ips[name] = ip
        if serve:
            self.backends[name] = start_backend(ip, self.port)
        self.kubelet.create_pod(self.namespace, name, {"app": self.app}, gates=self.gates, port=self.port)
        self.kubelet.set_ready(self.namespace, name, ip)
        return ip

    def unready(self, name: str) -> None:
        self.kubelet.set_ready(self.namespace, name, self.ips[name], ready=False)

    def begin_termination(self, name: str) -> None:
        """Graceful deletion: the pod turns Terminating and its server keeps serving."""
        self.kubelet.delete_pod(self.namespace, name)

    def finish_termination(self, name: str) -> None:
        """The process exits (in-flight requests finish first), then the pod object goes."""
        backend = self.backends.pop(name, None)
        if backend is not None:
            backend.stop()
        self.kubelet.finish_termination(self.namespace, name)
        self.ips.pop(name, None)

    def stop_all(self) -> None:
        for backend in self.backends.values():
            backend.stop()
        self.backends.clear()
