"""EC2 instances as a pool source: listed once (DescribeInstances by tags), then kept current from
the EventBridge state-change events an SQS queue delivers (long polling, each message deleted once
applied), as aws-node-termination-handler's queue mode does; a slow re-list is only the safety net.

One feed per EC2 pool; it writes InstanceState records (kind EC2, the pool's namespace) into the
same store Pods and Instances go to, so the pool controller and lifecycle handlers need nothing new.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from poolkeeper.aws import NOT_LEADING
from poolkeeper.aws import client as aws
from poolkeeper.core.ec2 import (
    LAUNCHING,
    TERMINATING,
    Ec2Source,
    LifecycleAction,
    instance_record,
    lifecycle_result,
    parse_lifecycle,
    parse_message,
    with_state,
)
from poolkeeper.core.model import InstanceState, Phase
from poolkeeper.core.poolspec import PoolSpec

log = logging.getLogger("poolkeeper.ec2")

Key = tuple[str, str]
Apply = Callable[[InstanceState, bool], None]  # (state, gone): into the store, pools queued
ReadSecret = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]  # (namespace, name) -> Secret or None
MemberState = Callable[[Key, str], str | None]  # (pool, instance ref) -> its status.members state, None: no row
PostEvent = Callable[[Key, str, str, bool], None]  # (pool, reason, message, warning): a Kubernetes Event
HEARTBEAT_SECONDS = 60.0  # RecordLifecycleActionHeartbeat this often while a hook waits for us
RELIST_SECONDS = 300.0
WAIT_SECONDS = 20  # SQS long polling, its maximum
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class SourceProblem(Exception):
    """Why the feed cannot list or receive now; reason and message go into the pool's `Synced`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotVisibleYet(Exception):
    """An event named an instance DescribeInstances does not know yet."""


class Ec2Feed:
    """The instances of one pool's EC2 source, kept current in the store."""

    def __init__(self, key: Key, source: Ec2Source, *, apply: Apply, read_secret: ReadSecret,
                 changed: Callable[[Key], None], member_state: MemberState = lambda key, ref: None,
                 post: PostEvent = lambda key, reason, message, warning: None,
                 relist_seconds: float = RELIST_SECONDS, wait_seconds: int = WAIT_SECONDS,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS, may_act: Callable[[], bool] | None = None) -> None:
        self.key, self.source, self.post = key, source, post
        self.may_act = may_act  # the leader fence of hooks and messages (poolkeeper.aws.fence); None: always
        self.apply, self.read_secret, self.changed, self.member_state = apply, read_secret, changed, member_state
        self.relist_seconds, self.wait_seconds = relist_seconds, wait_seconds
        self.heartbeat_seconds = heartbeat_seconds
        # lifecycle hooks waiting for us, by token: (action, receipt handle of its message, last heartbeat)
        self.actions: dict[str, tuple[LifecycleAction, str, float]] = {}
        self.terminating: set[str] = set()  # instances Auto Scaling terminates: draining, whatever EC2 says
        self.known: dict[str, InstanceState] = {}  # instance id -> what the store has from this feed
        self.event_times: dict[str, float] = {}  # instance id -> time of the last event applied
        self.listed = False  # a first DescribeInstances is complete: the pool may act on its instances
        self.problem: tuple[str, str] | None = None
        self.warned: set[str] = set()  # message ids of messages we do not handle, warned about once
        self.failures = 0  # sessions failed in a row: the backoff before the next one

    @property
    def namespace(self) -> str:
        return self.key[0]

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except SourceProblem as exc:
                self._trouble(exc.reason, str(exc))
            except Exception as exc:  # botocore, aiohttp and OS errors alike: retried with backoff
                self._trouble("EC2SourceUnavailable", f"{type(exc).__name__}: {exc}")
            if self.problem is not None and self.problem[0] == aws.NOT_INSTALLED[0]:
                return
            await asyncio.sleep(BACKOFF[min(self.failures, len(BACKOFF) - 1)])
            self.failures += 1

    def _trouble(self, reason: str, message: str) -> None:
        log.warning("EC2 source of pool %s/%s: %s", *self.key, message)
        if self.problem != (reason, message):
            self.problem = (reason, message)
            self.changed(self.key)

    async def _credentials(self) -> aws.Credentials | None:
        name = self.source.credentials_secret
        if not name:
            return None
        secret = await self.read_secret(self.namespace, name)
        if secret is None:
            raise SourceProblem("EC2CredentialsNotFound", f"Secret {self.namespace}/{name} not found")
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.get("data") or {}).items()}
        creds = aws.Credentials.from_secret(data)
        if creds is None:
            raise SourceProblem("EC2CredentialsNotFound",
                                f"Secret {self.namespace}/{name} has no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        return creds

    async def _session(self) -> None:
        """List, then receive until the next re-list is due; an error ends the session (retried)."""
        if not aws.available():
            raise SourceProblem(*aws.NOT_INSTALLED)
        creds = await self._credentials()
        src = self.source
        async with aws.clients(("ec2", "sqs", "autoscaling"), src.region, src.endpoint_url, creds,
                               read_timeout=self.wait_seconds + 20, may_act=self.may_act) as (ec2, sqs, asg):
            while True:
                await self._relist(ec2)
                self.failures = 0
                if self.problem is not None or not self.listed:
                    self.listed, self.problem = True, None
                    self.changed(self.key)
                due = time.monotonic() + self.relist_seconds
                while (left := due - time.monotonic()) > 0:
                    wait = 1 if self.actions else self.wait_seconds  # hooks waiting: look at them often
                    await self._receive(ec2, sqs, min(wait, max(1, int(left))))
                    await self._progress(sqs, asg)

    async def _relist(self, ec2: Any) -> None:
        listed: dict[str, InstanceState] = {}
        async for page in ec2.get_paginator("describe_instances").paginate(Filters=self.source.describe_filters()):
            for reservation in page.get("Reservations") or []:
                for raw in reservation.get("Instances") or []:
                    record = instance_record(raw, self.namespace, self.source)
                    listed[record.name] = record
        for gone in set(self.known) - set(listed):
            self._gone(gone, "instance no longer listed")
        for record in listed.values():
            self._put(record)

    async def _receive(self, ec2: Any, sqs: Any, wait: int) -> None:
        reply = await sqs.receive_message(QueueUrl=self.source.queue_url, MaxNumberOfMessages=10,
                                          WaitTimeSeconds=wait)
        for message in reply.get("Messages") or []:
            change = parse_message(str(message.get("Body") or ""))
            action = parse_lifecycle(str(message.get("Body") or "")) if change is None else None
            if action is not None:  # deleted once completed: a restart meanwhile receives it again
                with contextlib.suppress(NotVisibleYet):  # not described yet: the message comes back
                    await self._lifecycle(ec2, action, str(message["ReceiptHandle"]))
                continue
            if change is None:  # not ours to judge: left for the queue's redrive policy, said once
                if message.get("MessageId") not in self.warned:
                    self.warned.add(str(message.get("MessageId")))
                    log.warning("pool %s/%s: message %s on %s is not an EC2 state-change event; left in the queue",
                                *self.key, message.get("MessageId"), self.source.queue_url)
                continue
            try:
                await self._state_change(ec2, change.instance_id, change.state, change.time)
            except NotVisibleYet:  # eventual consistency: the message comes back after its visibility timeout
                log.info("pool %s/%s: instance %s not described yet; its event is retried", *self.key,
                         change.instance_id)
                continue
            await sqs.delete_message(QueueUrl=self.source.queue_url, ReceiptHandle=message["ReceiptHandle"])

    async def _state_change(self, ec2: Any, instance_id: str, state: str, at: float) -> None:
        before = self.event_times.get(instance_id)
        if before and at and at < before:
            return  # an older event delivered late: the newer one already applied
        if at:
            self.event_times[instance_id] = at
        known = self.known.get(instance_id)
        if known is None:
            if state == "terminated":
                return
            known = await self._describe(ec2, instance_id, state)
            if known is None:
                return  # not one of ours (its tags do not match)
        if state == "terminated":
            self._put(with_state(known, state))
            self._gone(instance_id, "instance terminated")
        else:
            self._put(with_state(known, state))

    async def _describe(self, ec2: Any, instance_id: str, state: str) -> InstanceState | None:
        """An instance we have not listed (launched since): its tags and address, if it is ours."""
        try:
            reply = await ec2.describe_instances(InstanceIds=[instance_id])
        except Exception as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
                raise NotVisibleYet(instance_id) from exc
            raise
        for reservation in reply.get("Reservations") or []:
            for raw in reservation.get("Instances") or []:
                record = instance_record(raw, self.namespace, self.source, state)
                if self.source.matches(record.labels):
                    return record
        return None

    async def _lifecycle(self, ec2: Any, action: LifecycleAction, receipt: str) -> None:
        """A hook to complete once the pool is done with the instance: registered and Active (launch),
        or drained and removed (termination)."""
        if action.token in self.actions:  # delivered again (visibility timeout): keep the newest receipt
            self.actions[action.token] = (action, receipt, self.actions[action.token][2])
            return
        if action.instance_id not in self.known:
            found = await self._describe(ec2, action.instance_id, "")
            if found is not None:
                self._put(found)
        if action.transition == TERMINATING and action.instance_id in self.known:
            self.terminating.add(action.instance_id)
            self._put(self.known[action.instance_id])
        what = "registered and Active" if action.transition == LAUNCHING else "drained and removed"
        self.post(self.key, "LifecycleActionWaiting", f"Auto Scaling group {action.group}, hook {action.hook}: "
                  f"instance {action.instance_id} waits until it is {what}", False)
        self.actions[action.token] = (action, receipt, time.monotonic())

    async def _progress(self, sqs: Any, asg: Any) -> None:
        """Complete the hooks whose instance the pool is done with; heartbeat the others."""
        for token, (action, receipt, beat) in list(self.actions.items()):
            ref = f"EC2/{self.namespace}/{action.instance_id}"
            if action.transition == LAUNCHING and action.instance_id not in self.known:
                result: str | None = "CONTINUE"  # not one of the pool's instances: none of its business
            else:
                result = lifecycle_result(action.transition, self.member_state(self.key, ref))
            ids = {"AutoScalingGroupName": action.group, "LifecycleHookName": action.hook,
                   "LifecycleActionToken": action.token, "InstanceId": action.instance_id}
            what = f"Auto Scaling group {action.group}, hook {action.hook}, instance {action.instance_id}"
            try:
                if result is not None:
                    await asg.complete_lifecycle_action(LifecycleActionResult=result, **ids)
                    del self.actions[token]
                    self.post(self.key, "LifecycleActionCompleted", f"{what}: {result}", result != "CONTINUE")
                    await sqs.delete_message(QueueUrl=self.source.queue_url, ReceiptHandle=receipt)
                elif time.monotonic() - beat >= self.heartbeat_seconds:
                    await asg.record_lifecycle_action_heartbeat(**ids)
                    self.actions[token] = (action, receipt, time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # said, then retried with the session: a hook never times out unseen
                if getattr(exc, "reason", "") != NOT_LEADING:  # the next leader completes it
                    self.post(self.key, "LifecycleActionFailed", f"{what}: {type(exc).__name__}: {exc}", True)
                raise

    def _put(self, record: InstanceState) -> None:
        if record.name in self.terminating and record.phase is Phase.UP:
            record = replace(record, phase=Phase.DRAINING, reason="Auto Scaling terminates the instance")
        self.known[record.name] = record
        self.apply(record, False)

    def _gone(self, instance_id: str, reason: str) -> None:
        record = self.known.pop(instance_id, None)
        self.event_times.pop(instance_id, None)
        self.terminating.discard(instance_id)
        if record is not None:
            self.apply(replace(record, phase=Phase.DOWN, reason=reason), True)


class Ec2Feeds:
    """A feed per EC2 pool: started, restarted when its source changes, stopped with the pool."""

    def __init__(self, *, apply: Apply, read_secret: ReadSecret, changed: Callable[[Key], None],
                 member_state: MemberState = lambda key, ref: None,
                 post: PostEvent = lambda key, reason, message, warning: None,
                 relist_seconds: float = RELIST_SECONDS, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 may_act: Callable[[Key], bool] | None = None) -> None:
        self.apply, self.read_secret, self.changed, self.member_state = apply, read_secret, changed, member_state
        self.post, self.may_act = post, may_act  # per pool: with shards, the Lease of the pool's shard
        self.relist_seconds, self.heartbeat_seconds = relist_seconds, heartbeat_seconds
        self.feeds: dict[Key, tuple[Ec2Feed, asyncio.Task[None]]] = {}

    def sync(self, specs: Iterable[PoolSpec]) -> None:
        """Run exactly one feed for each of these specs (EC2 pools that may have one), no others."""
        wanted = {s.key: s.ec2 for s in specs if s.ec2 is not None and not s.deleting}
        for key, (feed, _) in list(self.feeds.items()):
            if wanted.get(key) != feed.source:
                self._stop(key)
        for key, source in wanted.items():
            if source is not None and key not in self.feeds:
                feed = Ec2Feed(key, source, apply=self.apply, read_secret=self.read_secret, changed=self.changed,
                               member_state=self.member_state, post=self.post, relist_seconds=self.relist_seconds,
                               heartbeat_seconds=self.heartbeat_seconds, may_act=self._fence(key))
                task = asyncio.get_running_loop().create_task(feed.run(), name=f"ec2-feed/{key[0]}/{key[1]}")
                self.feeds[key] = (feed, task)

    def _fence(self, key: Key) -> Callable[[], bool] | None:
        may_act = self.may_act
        return None if may_act is None else functools.partial(may_act, key)

    def block(self, spec: PoolSpec) -> tuple[str, str] | None:
        """Why an EC2 pool must not act on its instances yet (never listed), or None."""
        if spec.ec2 is None:
            return None
        if not aws.available():
            return aws.NOT_INSTALLED
        found = self.feeds.get(spec.key)
        if found is None or found[0].listed:
            return None
        feed = found[0]
        if feed.problem is not None:
            return feed.problem
        return ("EC2SourceNotListed", f"listing the instances tagged {feed.source.tag_map} in {feed.source.region}")

    def _stop(self, key: Key) -> None:
        """Cancel the feed; its instances no other feed of the namespace knows leave the store."""
        feed, task = self.feeds.pop(key)
        task.cancel()
        held = {i for k, (f, _) in self.feeds.items() if k[0] == key[0] for i in f.known}
        for instance_id in set(feed.known) - held:
            feed._gone(instance_id, "no longer listed by the pool's EC2 source")

    async def close(self) -> None:
        tasks = [task for _, task in self.feeds.values()]
        for task in tasks:
            task.cancel()
        self.feeds.clear()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
