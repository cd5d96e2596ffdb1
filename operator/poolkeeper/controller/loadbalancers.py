"""LoadBalancers: one runtime-API client each, a 1 s health watch, and their status.

Watching the load balancer's own state is allowed (instance discovery is never polled):
it is how a restarted or reloaded HAProxy, which lost every runtime server, is noticed and
re-filled. Each LoadBalancer is probed on its own (at most one probe in flight each, with a
short timeout and a backoff while it does not answer), so a hung HAProxy delays nobody else.
A restart is noticed sooner than the next probe: the exiting process closes our open runtime
connections, and that loss triggers a probe at once, repeated quickly while the new process
is not listening yet.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from poolkeeper import aws
from poolkeeper.aws.elbv2_client import ELBv2Client
from poolkeeper.backends.haproxy_client import HAProxyBusy, HAProxyClient, HAProxyUnreachable, TLSFiles
from poolkeeper.core.conditions import Condition, merge_conditions
from poolkeeper.core.lbprocess import ProcessChange, ProcessIdentity, identity_of, probe_delay, process_change
from poolkeeper.core.poolspec import InvalidSpec, LoadBalancerSpec, parse_load_balancer
from poolkeeper.kube import fence
from poolkeeper.kube.api import KubeApi, resource_path
from poolkeeper.kube.events import EventRecorder, now_rfc3339
from poolkeeper.kube.status import StatusWriter

log = logging.getLogger(__name__)
GROUP_VERSION = "poolkeeper.dev/v1alpha1"
PROBE_TIMEOUT = 2.0  # `show info` answers in well under a millisecond; 2 s is a hung process
QUICK_RETRY = 0.05  # after a lost connection: probe again this soon while the new process starts


@dataclass
class _Entry:
    spec: LoadBalancerSpec
    client: HAProxyClient
    reachable: bool | None = None
    identity: ProcessIdentity | None = None  # to notice restarts and reloads
    version: str = ""
    error: str = ""
    failures: int = 0  # probes in a row without an answer
    next_probe: float = 0.0  # loop time
    quick_until: float = 0.0  # loop time: a lost connection's probes are retried quickly, unreported, until then
    published: tuple[bool | None, str, str] | None = None  # (reachable, version, error) last published
    # moves whenever HAProxy may hold other servers than the pools left there (a new process, a lost
    # connection, unreachable and back): a pool's remembered view of its servers is void after it
    generation: int = 0


class LoadBalancers:
    def _may_act(self) -> bool:
        """HAProxy and ELBv2 writes are fenced like API writes (kube/api.py may_write): a replica
        that no longer leads sends no runtime command and registers no target."""
        may_write = self.api.may_write if self.api is not None else None
        return may_write is None or may_write()

    def __init__(self, api: KubeApi, status: StatusWriter, events: EventRecorder,
                 pools_using: Callable[[str], list[tuple[str, str]]], enqueue: Callable[[tuple[str, str]], None],
                 interval: float = 1.0, probe_timeout: float = PROBE_TIMEOUT) -> None:
        self.api, self.status, self.events = api, status, events
        self.pools_using, self.enqueue, self.interval = pools_using, enqueue, interval
        self.probe_timeout = probe_timeout
        self._entries: dict[str, _Entry] = {}
        # clients of LoadBalancers deleted or made invalid: pools still drain their own servers there
        self._retired: dict[str, HAProxyClient] = {}
        self._bodies: dict[str, dict[str, Any]] = {}
        # LoadBalancers of type ELBv2: one AWS client each (no probe loop: every pool call is a check)
        self._elbv2: dict[str, tuple[LoadBalancerSpec, ELBv2Client]] = {}
        self._elbv2_retired: dict[str, ELBv2Client] = {}
        self._elbv2_reachable: dict[str, Condition] = {}
        self._tls_dir = tempfile.mkdtemp(prefix="poolkeeper-tls-")
        self._wake = asyncio.Event()  # a probe became due before the probe loop's next look
        # With shards: the fence of a LoadBalancer's own writes (status, Events), the Lease of the
        # shard its name hashes to; None: the operator's single Lease, if any.
        self.fence_of: Callable[[str], fence.Check | None] = lambda name: None

    # ----- the watch calls these
    async def upsert(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        self._bodies[name] = body
        try:
            spec = parse_load_balancer(body)
        except InvalidSpec as exc:
            await self._retire(name)
            self._write_status(name, Condition("Reachable", False, "InvalidSpec", str(exc)))
            self._post(name, "InvalidSpec", str(exc), warning=True)
            return
        if spec.type == "ELBv2":
            await self._retire(name)
            await self._upsert_elbv2(name, body, spec)
            return
        await self._retire_elbv2(name)
        entry = self._entries.get(name)
        if entry is not None and entry.spec == spec:
            return
        # The old entry stays until the new one is in place: a pool reconciled meanwhile must never
        # find no client (its finalizer would think nothing of its own can be in HAProxy).
        try:
            tls = await self._tls_files(spec) if spec.tls_secret else None
        except InvalidSpec as exc:
            await self._retire(name)
            self._write_status(name, Condition("Reachable", False, "TLSSecretInvalid", str(exc)))
            self._post(name, "TLSSecretInvalid", str(exc), warning=True)
            return
        old = self._entries.get(name)
        client = HAProxyClient(spec.endpoint, tls, may_act=self._may_act)
        client.on_lost = functools.partial(self._connection_lost, name, client)
        self._entries[name] = _Entry(spec, client)
        retired = self._retired.pop(name, None)
        for stale in (old.client if old else None, retired):
            if stale is not None:
                await stale.close()
        await self.check(name)

    async def remove(self, name: str) -> None:
        self._bodies.pop(name, None)
        await self._retire(name)
        await self._retire_elbv2(name)
        self.status.forget(self._status_path(name))
        for key in self.pools_using(name):
            self.enqueue(key)

    async def _drop_client(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            await entry.client.close()

    async def _retire(self, name: str) -> None:
        """Keep the client of a LoadBalancer that may no longer be used, for cleanup only."""
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        previous = self._retired.get(name)
        self._retired[name] = entry.client  # before any await: a pool must always find one
        if previous is not None:
            await previous.close()

    # ----- ELBv2
    async def _upsert_elbv2(self, name: str, body: dict[str, Any], spec: LoadBalancerSpec) -> None:
        current = self._elbv2.get(name)
        if current is not None and current[0] == spec:
            return  # (a rotated credentials Secret is read when the LoadBalancer changes next)
        try:
            credentials = await self._aws_credentials(spec)
        except InvalidSpec as exc:
            await self._retire_elbv2(name)
            self._write_status(name, Condition("Reachable", False, "CredentialsSecretInvalid", str(exc)))
            self._post(name, "CredentialsSecretInvalid", str(exc), warning=True)
            return
        client = ELBv2Client(spec.region, spec.endpoint_url, credentials, may_act=self._may_act)
        self._elbv2[name] = (spec, client)  # before any await: pools always find a client
        for stale in (current[1] if current else None, self._elbv2_retired.pop(name, None)):
            if stale is not None:
                await stale.close()
        if not aws.installed():
            reason, message = aws.NOT_INSTALLED
            reachable = Condition("Reachable", False, reason, message)
        else:
            try:
                await client.check([g.name for g in spec.backends])
                reachable = Condition("Reachable", True, "APIAnswered",
                                      f"Elastic Load Balancing in {spec.region} answered; listed target groups exist")
            except aws.AWSError as exc:
                reachable = Condition("Reachable", False, exc.reason, str(exc))
        self._elbv2_reachable[name] = reachable
        self._write_status(name, reachable, accepted=_accepted(spec))
        self._notify_pools(name)

    async def _aws_credentials(self, spec: LoadBalancerSpec) -> tuple[str, str] | None:
        """The access key pair from spec.elbv2.credentialsSecretRef; None: the pod's own identity."""
        if spec.credentials_secret is None:
            return None
        namespace, secret_name = spec.credentials_secret
        secret = await self.api.get_or_none(resource_path("v1", "secrets", namespace, secret_name))
        if secret is None:
            raise InvalidSpec(f"credentials Secret {namespace}/{secret_name} not found")
        data = secret.get("data") or {}
        keys = ("aws_access_key_id", "aws_secret_access_key")
        missing = [k for k in keys if not data.get(k)]
        if missing:
            raise InvalidSpec(f"credentials Secret {namespace}/{secret_name} has no {' or '.join(missing)}")
        key_id, key = (base64.b64decode(data[k]).decode().strip() for k in keys)
        return key_id, key

    async def _retire_elbv2(self, name: str) -> None:
        """Keep the AWS client of a LoadBalancer that may no longer be used, for cleanup only."""
        entry = self._elbv2.pop(name, None)
        if entry is None:
            return
        previous = self._elbv2_retired.get(name)
        self._elbv2_retired[name] = entry[1]
        if previous is not None:
            await previous.close()

    def elbv2(self, name: str) -> tuple[LoadBalancerSpec, ELBv2Client] | None:
        return self._elbv2.get(name)

    def elbv2_for_cleanup(self, name: str) -> ELBv2Client | None:
        """The AWS client of the LoadBalancer even if it was deleted: pools deregister their own targets."""
        entry = self._elbv2.get(name)
        return entry[1] if entry else self._elbv2_retired.get(name)

    async def _tls_files(self, spec: LoadBalancerSpec) -> TLSFiles | None:
        assert spec.tls_secret is not None
        namespace, secret_name = spec.tls_secret
        secret = await self.api.get_or_none(resource_path("v1", "secrets", namespace, secret_name))
        if secret is None:
            raise InvalidSpec(f"TLS Secret {namespace}/{secret_name} not found")
        data = secret.get("data") or {}
        paths = []
        for key in ("ca.crt", "tls.crt", "tls.key"):
            if key not in data:
                raise InvalidSpec(f"TLS Secret {namespace}/{secret_name} has no {key}")
            path = os.path.join(self._tls_dir, f"{spec.name}-{key}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(base64.b64decode(data[key]))
            paths.append(path)
        return TLSFiles(ca_file=paths[0], cert_file=paths[1], key_file=paths[2])

    # ----- what pools ask
    def get(self, name: str) -> tuple[LoadBalancerSpec, HAProxyClient] | None:
        entry = self._entries.get(name)
        return (entry.spec, entry.client) if entry else None

    def generation(self, name: str) -> int:
        """See _Entry.generation; -1 for a LoadBalancer not known."""
        entry = self._entries.get(name)
        return entry.generation if entry else -1

    def client_for_cleanup(self, name: str) -> HAProxyClient | None:
        """A client to the LoadBalancer's HAProxy even if it was deleted: pools remove their own
        servers through it, and nothing else."""
        entry = self._entries.get(name)
        return entry.client if entry else self._retired.get(name)

    def body(self, name: str) -> dict[str, Any] | None:
        return self._bodies.get(name)

    def invalid(self, name: str) -> str | None:
        """Why a LoadBalancer that exists cannot be used, or None."""
        if name in self._bodies and name not in self._entries and name not in self._elbv2:
            return f"LoadBalancer {name} has an invalid spec"
        return None

    # ----- health watch
    def _connection_lost(self, name: str, client: HAProxyClient) -> None:
        """HAProxy closed a runtime connection of ours (the client's on_lost): probe now."""
        entry = self._entries.get(name)
        if entry is None or entry.client is not client:
            return  # a client replaced or retired meanwhile
        entry.generation += 1
        now = asyncio.get_running_loop().time()
        entry.next_probe = now
        entry.quick_until = now + self.interval
        self._wake.set()

    async def check(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None:
            return
        loop = asyncio.get_running_loop()
        try:
            info, left_stopping = await entry.client.current_info(within=self.probe_timeout)
        except HAProxyBusy:
            pass  # a long call of a pool: it is bounded too, and says so itself if HAProxy hangs
        except (TimeoutError, HAProxyUnreachable, OSError) as exc:
            if loop.time() < entry.quick_until and not entry.client.unanswered:
                # Just after a lost connection, refused or gone at once (not hung): a restarting
                # HAProxy that is not listening yet. Asked again soon; reported if it stays so.
                entry.next_probe = loop.time() + QUICK_RETRY
                self._wake.set()  # the probe loop may be asleep for longer
                return
            entry.failures += 1
            changed = entry.reachable is not False
            entry.reachable, entry.error = False, str(exc)
            if changed:
                log.warning("LoadBalancer %s unreachable: %s", name, exc)
                self._post(name, "Unreachable", f"HAProxy runtime API unreachable: {exc}", warning=True)
                self._notify_pools(name)
        else:
            entry.failures = 0
            identity = identity_of(info)
            change = process_change(entry.identity, identity, left_stopping=left_stopping)
            recovered = entry.reachable is False
            previous, entry.identity, entry.version, entry.error = entry.identity, identity, info.get("Version", ""), ""
            entry.reachable = True
            if change is not None:
                self._process_changed(name, change, previous, identity)
            elif recovered:
                log.info("LoadBalancer %s reachable again; re-applying its pools", name)
                self._post(name, "Reachable", "HAProxy runtime API answers again")
                self._notify_pools(name)
        entry.next_probe = loop.time() + probe_delay(entry.failures, self.interval)
        if entry.published != (entry.reachable, entry.version, entry.error):
            self.publish(name)  # a probe that found what the last one found writes nothing: idle stays idle

    def _process_changed(self, name: str, change: ProcessChange, previous: ProcessIdentity | None,
                         current: ProcessIdentity) -> None:
        """A new process has only the config file's servers: every pool puts its own back."""
        pools = self.pools_using(name)
        message = (f"HAProxy {change.value.lower()} ({previous} -> {current}): its runtime servers are gone; "
                   f"re-applying {len(pools)} pool(s)")
        log.info("LoadBalancer %s: %s", name, message)
        self._post(name, change.value, message)
        self._notify_pools(name)

    def _owned(self, name: str) -> fence.Check | None:
        """The fence of the LoadBalancer's own writes; a replica not holding its shard skips them."""
        return self.fence_of(name)

    def _post(self, name: str, reason: str, message: str, warning: bool = False) -> None:
        body = self._bodies.get(name)
        check = self._owned(name)
        if body and (check is None or check()):
            with fence.fenced(check):
                self.events.post(body, reason, message, warning=warning)

    def _notify_pools(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is not None:
            entry.generation += 1
        for key in self.pools_using(name):
            self.enqueue(key)

    def publish(self, name: str) -> None:
        if name in self._elbv2:
            self._write_status(name, self._elbv2_reachable.get(name), accepted=_accepted(self._elbv2[name][0]))
            return
        entry = self._entries.get(name)
        if entry is None:
            return
        entry.published = (entry.reachable, entry.version, entry.error)
        if entry.reachable:
            cond = Condition("Reachable", True, "RuntimeAPIAnswered", f"HAProxy {entry.version}")
        else:
            cond = Condition("Reachable", False, "RuntimeAPIUnreachable", entry.error or "not checked yet")
        self._write_status(name, cond, version=entry.version, accepted=_accepted(entry.spec))

    def _write_status(self, name: str, cond: Condition | None, version: str = "",
                      accepted: Condition | None = None) -> None:
        """Accepted and Reachable (None: not known yet)."""
        body = self._bodies.get(name) or {}
        meta = body.get("metadata") or {}
        previous = (body.get("status") or {}).get("conditions")
        if accepted is None:
            assert cond is not None
            accepted = Condition("Accepted", False, cond.reason, cond.message)
        status: dict[str, Any] = {
            "conditions": merge_conditions(previous, [accepted, *([cond] if cond else [])], meta.get("generation"),
                                           now_rfc3339()),
            "pools": len(self.pools_using(name)), "observedGeneration": meta.get("generation"),
        }
        if version:
            status["version"] = version
        check = self._owned(name)
        if check is None or check():
            with fence.fenced(check):
                self.status.submit(self._status_path(name), status, body.get("status"))

    def names(self) -> list[str]:
        """Every LoadBalancer the watch has shown (valid or not)."""
        return list(self._bodies)

    def status_path(self, name: str) -> str:
        return self._status_path(name)

    @staticmethod
    def _status_path(name: str) -> str:
        return resource_path(GROUP_VERSION, "loadbalancers", None, name, "status")

    async def run(self) -> None:
        """Probe every LoadBalancer when it is due, each on its own, forever.

        One probe in flight per LoadBalancer: a HAProxy that does not answer holds only its own.
        """
        probes: dict[str, asyncio.Task[None]] = {}
        loop = asyncio.get_running_loop()
        try:
            while True:
                for name, task in list(probes.items()):
                    if task.done():
                        del probes[name]
                        if not task.cancelled() and (exc := task.exception()) is not None:
                            log.error("probing LoadBalancer %s failed", name, exc_info=exc)
                now = loop.time()
                self._wake.clear()
                for name, entry in list(self._entries.items()):
                    if name not in probes and entry.next_probe <= now:
                        probes[name] = asyncio.create_task(self.check(name), name=f"probe-loadbalancer-{name}")
                soonest = min((e.next_probe for n, e in self._entries.items() if n not in probes),
                              default=now + self.interval)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self.interval, 0.25, max(soonest - now, QUICK_RETRY))):
                        await self._wake.wait()  # a lost connection asks for a probe now
        finally:
            for task in probes.values():
                task.cancel()

    async def close(self) -> None:
        for name in list(self._entries):
            await self._drop_client(name)
        for client in self._retired.values():
            await client.close()
        self._retired.clear()
        for name in list(self._elbv2):
            await self._retire_elbv2(name)
        for aws_client in self._elbv2_retired.values():
            await aws_client.close()
        self._elbv2_retired.clear()

    def reachable(self, name: str) -> bool | None:
        entry = self._entries.get(name)
        return entry.reachable if entry else None


def _accepted(spec: LoadBalancerSpec) -> Condition:
    """Whether the spec lets poolkeeper drive anything: it drives only the backends listed."""
    if spec.type == "ELBv2":
        if not aws.installed():
            return Condition("Accepted", False, *aws.NOT_INSTALLED)
        if not spec.backends:
            return Condition("Accepted", False, "NoTargetGroupsListed",
                             "spec.elbv2.targetGroups lists no target group, so no TargetPool may fill any; list "
                             "the target groups poolkeeper may manage (and for which namespaces)")
        return Condition("Accepted", True, "TargetGroupsListed",
                         f"TargetPools may fill target groups: {', '.join(g.name for g in spec.backends)}")
    if not spec.backends:
        return Condition("Accepted", False, "NoBackendsListed",
                         "spec.haproxy.backends lists no backend, so no TargetPool may drive this load balancer; "
                         "list the backends poolkeeper may manage (and for which namespaces)")
    names = ", ".join(g.name for g in spec.backends)
    return Condition("Accepted", True, "BackendsListed", f"TargetPools may drive backends: {names}")
