"""`make demo AWS=1`: an Auto Scaling group scales out and in against an AWS emulator, and the pool follows.

The loopback demo's control plane, HAProxy and operator, plus moto's server mode on loopback
(`poolkeeper_dev.aws_emulator`, a process of its own that `make demo-down` stops). The demo creates
an Auto Scaling group with a launch and a terminate lifecycle hook, an SQS queue, and a TargetPool
with an EC2 source (the group's tag) behind an HAProxy backend with health checks, then keeps
setting the group's desired capacity up and down under 200 requests/s through HAProxy.

The emulator launches and terminates the instances but sends no events: as in the tests, the demo
delivers what EventBridge and the hooks would send to the queue (state changes, lifecycle actions),
and each instance's `poolkeeper.dev/address` tag points at a real HTTP server on 127.78.0.0/16
standing in for it. On scale-out the operator registers the instance, and completes the launch hook
with CONTINUE once it is Active; on scale-in it drains the instance and completes the terminate hook
once it is out of the backend, and only then does the instance stop (its state changes are sent and
its server stops). `--seconds N` ends with a summary; the exit code is 1 unless no request failed,
HAProxy's error counters are 0, every hook was completed with CONTINUE and the pool's members are
the group's instances.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from poolkeeper_dev.aws_emulator import (
    CREDENTIALS,
    REGION,
    ec2_state_change,
    lifecycle_message,
    recorded,
)
from poolkeeper_dev.aws_emulator import client as aws_client
from poolkeeper_dev.demo import NAMESPACE, Demo, DemoError, LiveView, _say
from poolkeeper_dev.ports import free_port
from poolkeeper_dev.rollout import NO_ERRORS, backend_errors
from poolkeeper_dev.traffic import HTTPBackend, LoadGenerator, start_backend

GROUP = "web-asg"
ADDRESS_TAG = "poolkeeper.dev/address"
HOOKS = {"LAUNCHING": "launching", "TERMINATING": "terminating"}
MIN_SIZE, MAX_SIZE = 1, 4
STEP_SECONDS = 60.0  # a hook the pool does not complete within this is a failure of the demo
EMULATOR = b"poolkeeper_dev.aws_emulator"


class ScalingGroup:
    """The Auto Scaling group on the emulator, and what AWS would send about it to the pool's queue."""

    def __init__(self, endpoint: str, record_file: Path, port: int) -> None:
        self.ec2, self.sqs, self.asg = (aws_client(s, endpoint) for s in ("ec2", "sqs", "autoscaling"))
        self.record_file, self.port = record_file, port
        self.queue = ""
        self.servers: dict[str, HTTPBackend] = {}  # instance id -> the HTTP server standing in for it
        self.hooks: dict[str, tuple[str, str]] = {}  # token -> (transition, instance id), every hook sent
        self._hosts = itertools.count(1)

    def create(self) -> None:
        self.queue = self.sqs.create_queue(QueueName=f"{GROUP}-events")["QueueUrl"]
        self.ec2.create_launch_template(LaunchTemplateName=GROUP, LaunchTemplateData={
            "ImageId": "ami-12c6146b", "InstanceType": "t3.micro"})
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName=GROUP, MinSize=0, MaxSize=MAX_SIZE, DesiredCapacity=0,
            LaunchTemplate={"LaunchTemplateName": GROUP}, AvailabilityZones=[f"{REGION}a"],
            Tags=[{"Key": "app", "Value": GROUP, "PropagateAtLaunch": True}])
        for transition, hook in HOOKS.items():
            self.asg.put_lifecycle_hook(AutoScalingGroupName=GROUP, LifecycleHookName=hook,
                                        LifecycleTransition=f"autoscaling:EC2_INSTANCE_{transition}",
                                        HeartbeatTimeout=30, DefaultResult="ABANDON")

    def instances(self) -> set[str]:
        found = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"]
        return {i["InstanceId"] for i in found[0]["Instances"]} if found else set()

    def _desired(self, change: int) -> set[str]:
        """Set the desired capacity; the instances before."""
        before = self.instances()
        self.asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=len(before) + change)
        return before

    def _hook(self, transition: str, instance_id: str) -> str:
        token = str(uuid.uuid4())
        self.hooks[token] = (transition, instance_id)
        self.sqs.send_message(QueueUrl=self.queue, MessageBody=lifecycle_message(
            GROUP, HOOKS[transition], transition, instance_id, token))
        return token

    def scale_out(self) -> tuple[str, str]:
        """One more instance: its stand-in server, address tag, state changes and launch hook."""
        before = self._desired(+1)
        (instance_id,) = self.instances() - before
        address = f"127.78.0.{next(self._hosts) % 250 + 1}"
        self.servers[instance_id] = start_backend(address, self.port)
        self.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": ADDRESS_TAG, "Value": address}])
        for state in ("pending", "running"):
            self.sqs.send_message(QueueUrl=self.queue, MessageBody=ec2_state_change(instance_id, state))
        return instance_id, self._hook("LAUNCHING", instance_id)

    def scale_in(self) -> tuple[str, str]:
        """One instance fewer: the group picks it; it waits in Terminating:Wait for the pool."""
        before = self._desired(-1)
        (instance_id,) = before - self.instances()
        return instance_id, self._hook("TERMINATING", instance_id)

    def terminated(self, instance_id: str) -> None:
        """The hook went on: the instance shuts down (its state changes), its server stops."""
        for state in ("shutting-down", "terminated"):
            self.sqs.send_message(QueueUrl=self.queue, MessageBody=ec2_state_change(instance_id, state))
        server = self.servers.pop(instance_id, None)
        if server is not None:
            server.stop()

    def results(self) -> dict[str, str]:
        """Token -> LifecycleActionResult of every CompleteLifecycleAction the emulator received."""
        return {c["LifecycleActionToken"]: c.get("LifecycleActionResult", "")
                for c in recorded(self.record_file) if c.get("Action") == "CompleteLifecycleAction"}

    def heartbeats(self) -> int:
        return sum(1 for c in recorded(self.record_file) if c.get("Action") == "RecordLifecycleActionHeartbeat")

    def lines(self) -> list[str]:
        """The live view's lines about the group."""
        results = self.results()
        done = [results[t] for t in self.hooks if t in results]
        waiting = [f"{transition.lower()} {instance}" for t, (transition, instance) in self.hooks.items()
                   if t not in results]
        return ["", f"Auto Scaling group {GROUP}: {len(self.instances())} instances "
                    f"(min {MIN_SIZE}, max {MAX_SIZE}), stand-ins on 127.78.0.0/16",
                f"lifecycle actions: {done.count('CONTINUE')} CONTINUE, {len(done) - done.count('CONTINUE')} "
                f"other, {self.heartbeats()} heartbeats; waiting: {', '.join(waiting) or 'none'}"]

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()


class AwsDemo(Demo):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.endpoint = ""
        self.queue = ""
        self.port = free_port()

    def _start_emulator(self) -> str:
        """moto's server as a process of its own (`down` stops it), recording lifecycle calls to a file."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._stop_recorded("emulator_pid", EMULATOR, group=False)  # an earlier run's
        record = self.root / "lifecycle-actions.jsonl"
        record.unlink(missing_ok=True)
        port = free_port()
        log = open(self.root / "emulator.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen([sys.executable, "-m", "poolkeeper_dev.aws_emulator", "--port", str(port),
                                 "--record", str(record)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.record(emulator_pid=proc.pid)
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(300):
            if proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                _say(f"AWS emulator (moto) {endpoint}, pid {proc.pid}, log {self.root / 'emulator.log'}")
                return endpoint
            time.sleep(0.1)
        raise DemoError(f"the AWS emulator did not start (see {self.root / 'emulator.log'}; it needs "
                        "moto[server], which `pip install -e '.[dev]'` installs)")

    def pool_body(self) -> dict[str, Any]:
        """The loopback demo's pool (HAProxy backend, health checks), its source the group's instances."""
        body = super().pool_body()
        body["spec"]["source"] = {"kind": "EC2", "ec2": {
            "region": REGION, "endpointURL": self.endpoint, "credentialsSecretRef": {"name": "aws"},
            "tags": {"app": GROUP}, "queueURL": self.queue, "addressTag": ADDRESS_TAG}}
        return body

    @staticmethod
    def _secret(core: client.CoreV1Api) -> None:
        """The tenant's AWS keys (the emulator's dummy ones) in a Secret of the pool's namespace."""
        with contextlib.suppress(ApiException):
            core.create_namespace(body=cast(Any, {"metadata": {"name": NAMESPACE}}))
        with contextlib.suppress(ApiException):
            core.delete_namespaced_secret(name="aws", namespace=NAMESPACE)
        core.create_namespaced_secret(namespace=NAMESPACE, body=cast(Any, {"metadata": {"name": "aws"}, "data": {
            k: base64.b64encode(v.encode()).decode() for k, v in CREDENTIALS.items()}}))

    def run(self, seconds: float) -> int:
        self.endpoint = self._start_emulator()
        # the demo namespace may point its pool at the emulator (endpointURL); heartbeats every 2 s
        self.start(operator_args=("--ec2-source-namespaces", NAMESPACE, "--lifecycle-heartbeat-seconds", "2"))
        api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))  # type: ignore[no-untyped-call]
        group = ScalingGroup(self.endpoint, self.root / "lifecycle-actions.jsonl", self.port)
        try:
            return self._scale(api, group, seconds)
        finally:
            group.close()
            api.close()

    def _scale(self, api: client.ApiClient, group: ScalingGroup, seconds: float) -> int:
        group.create()
        self.queue = group.queue
        self._secret(client.CoreV1Api(api))
        self.objects(api)
        view = LiveView(api, self.haproxy.frontend_url("web"))
        view.extra = group.lines
        problems: list[str] = []
        for _ in range(MIN_SIZE + 1):
            self._step(view, group, "scale-out", problems)
        load = LoadGenerator(self.haproxy.frontend_url("web"), connections=8, rate=200).start()
        view.load = load
        deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
        steps = itertools.cycle(["scale-out", "scale-out", "scale-in", "scale-in"])
        report, interrupted = view.drive(lambda: self._step(view, group, next(steps), problems),
                                         until=lambda: time.monotonic() >= deadline or bool(problems))
        errors = backend_errors(self.haproxy.admin_endpoint, "web")  # retries 0: nothing hides a failure
        problems += self._final_check(view, group)
        results = group.results()
        outcomes = [results.get(token, "none") for token in group.hooks]
        launched = sum(1 for t, (kind, _) in group.hooks.items() if kind == "LAUNCHING" and results.get(t))
        _say(f"summary: {report.ok} requests served, {report.failed} failed, {len(group.hooks)} capacity changes, "
             f"lifecycle actions completed: {launched} launches and {len(outcomes) - launched - outcomes.count('none')}"
             f" terminations, {outcomes.count('CONTINUE')} of {len(outcomes)} with CONTINUE, "
             f"{group.heartbeats()} heartbeats; members now {len(view.members())}, group instances "
             f"{len(group.instances())}; HAProxy counters {errors}" + (" (interrupted)" if interrupted else ""))
        for line in [*problems, *(f"failure: {f}" for f in report.failures[:5])]:
            _say(f"  {line}")
        _say(f"still running: `source {self.cluster.env_file}` then `kubectl describe tp web -n {NAMESPACE}`; "
             f"the emulator at {self.endpoint}; `make demo-down` stops everything")
        ok = report.failed == 0 and errors == NO_ERRORS and not problems and not interrupted
        return 0 if ok and outcomes.count("CONTINUE") == len(outcomes) else 1

    def _step(self, view: LiveView, group: ScalingGroup, step: str, problems: list[str]) -> None:
        """One change of the desired capacity, followed until the pool has done its part of the hook."""
        size = len(group.instances())
        if (step == "scale-in" and size <= MIN_SIZE) or (step == "scale-out" and size >= MAX_SIZE):
            return
        instance_id, token = group.scale_out() if step == "scale-out" else group.scale_in()
        view.note(f"{step}: desired capacity {size} -> {size + (1 if step == 'scale-out' else -1)}, "
                  f"{'launching' if step == 'scale-out' else 'terminating'} {instance_id}")
        view._wait(lambda: token in group.results(), float("inf"), STEP_SECONDS)
        result = group.results().get(token)
        if result is None:
            problems.append(f"{step} of {instance_id}: the lifecycle hook was not completed in {STEP_SECONDS:.0f} s")
            return
        view.note(f"{step}: lifecycle action of {instance_id} completed: {result}")
        if step == "scale-in":
            group.terminated(instance_id)

    @staticmethod
    def _final_check(view: LiveView, group: ScalingGroup) -> list[str]:
        """The pool's members are the group's instances, all Active."""
        def same() -> bool:
            members = {m["instance"].rsplit("/", 1)[-1]: m["state"] for m in view.members()}
            return members == dict.fromkeys(group.instances(), "Active")
        view._wait(same, float("inf"), 30)
        if same():
            return []
        return [f"the pool's members {sorted(m['instance'] for m in view.members())} are not the group's "
                f"instances {sorted(group.instances())}, all Active"]
