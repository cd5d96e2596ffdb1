"""The CRDs and manifests against a real kube-apiserver: schemas, defaults, CEL rules, printer columns.

Every invalid object is sent with `kubectl apply` and must be rejected by the API server with the
message a person would read, so the assertions quote (parts of) the server's own messages.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from poolkeeper_dev import Cluster

# The session operator would reconcile these objects and rewrite the status the tests write.
pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("without_session_operator")]

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
EXAMPLES = MANIFESTS / "examples"
GROUP = "poolkeeper.dev"
API_VERSION = f"{GROUP}/v1alpha1"
TEST_LABEL = "poolkeeper.dev/test"
KINDS = {
    "LoadBalancer": ("loadbalancers", "lb", "Cluster"),
    "TargetPool": ("targetpools", "tp", "Namespaced"),
    "Instance": ("instances", "inst", "Namespaced"),
    "LifecycleHandler": ("lifecyclehandlers", "lh", "Namespaced"),
}

Obj = dict[str, Any]


# ----------------------------------------------------------------------------- helpers
def kubectl(cluster: Cluster, *args: str, input: str | None = None, check: bool = True) -> Any:
    return cluster.kubectl_run(*args, input=input, check=check)


def get_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(kubectl(cluster, "get", *args, "-o", "json").stdout)


def set_path(obj: Obj, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        obj = obj.setdefault(key, {})
    obj[last] = value


def del_path(obj: Obj, path: str) -> None:
    *parents, last = path.split(".")
    for key in parents:
        obj = obj[key]
    del obj[last]


def base(kind: str) -> Obj:
    """A minimal valid object of each kind (asserted valid by test_base_objects_are_valid)."""
    specs: dict[str, Obj] = {
        "LoadBalancer": {"haproxy": {"endpoint": "tcp://10.0.0.5:9999", "backends": [{"name": "be_web"}]}},
        "TargetPool": {
            "source": {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}},
            "port": 8080,
            "backend": {"type": "HAProxy",
                        "haproxy": {"loadBalancerRef": {"name": "edge"}, "backend": "be_web"}},
        },
        "Instance": {"address": "192.0.2.10"},
        "LifecycleHandler": {
            "poolRef": {"name": "web"},
            "events": ["up"],
            "function": {"type": "Python", "python": {"handler": "audit.handle"}},
        },
    }
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": "probe", "labels": {TEST_LABEL: "crds"}},
        "spec": copy.deepcopy(specs[kind]),
    }


Mutation = Callable[[Obj], None]


def setting(**paths: Any) -> Mutation:
    """Mutation setting dotted paths under the object (keys use __ for dots: spec__port=0)."""

    def mutate(obj: Obj) -> None:
        for key, value in paths.items():
            set_path(obj, key.replace("__", "."), copy.deepcopy(value))

    return mutate


def deleting(*paths: str) -> Mutation:
    def mutate(obj: Obj) -> None:
        for path in paths:
            del_path(obj, path)

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(obj: Obj) -> None:
        for mutation in mutations:
            mutation(obj)

    return mutate


HAPROXY_MEMBER = {"loadBalancerRef": {"name": "edge"}, "backend": "be_web"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ns(cluster: Cluster) -> Iterator[str]:
    name = f"crd-tests-{uuid.uuid4().hex[:6]}"
    kubectl(cluster, "create", "namespace", name)
    had_edge = kubectl(cluster, "get", "lb", "edge", "--ignore-not-found", "-o", "name").stdout.strip()
    yield name
    kubectl(cluster, "delete", "namespace", name, "--wait=false", check=False)
    kubectl(cluster, "delete", "lb", "-l", f"{TEST_LABEL}=crds", "--ignore-not-found", check=False)
    if not had_edge:
        kubectl(cluster, "delete", "lb", "edge", "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="module")
def examples(cluster: Cluster, ns: str) -> str:
    """The examples applied into the module's namespace; returns the namespace."""
    kubectl(cluster, "apply", "-n", ns, "-f", str(EXAMPLES))
    return ns


# ----------------------------------------------------------------------------- CRDs
def test_crds_established_with_short_names_and_category(cluster: Cluster) -> None:
    crds = get_json(cluster, "crd", "-l", "app.kubernetes.io/part-of=poolkeeper")["items"]
    by_kind = {crd["spec"]["names"]["kind"]: crd for crd in crds}
    assert set(by_kind) == set(KINDS)
    for kind, (plural, short, scope) in KINDS.items():
        crd = by_kind[kind]
        assert crd["metadata"]["name"] == f"{plural}.{GROUP}"
        assert crd["spec"]["scope"] == scope
        assert crd["spec"]["names"]["shortNames"] == [short]
        assert crd["spec"]["names"]["categories"] == ["poolkeeper"]
        (version,) = crd["spec"]["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert version["subresources"] == {"status": {}}
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
        assert "x-kubernetes-preserve-unknown-fields" not in json.dumps(version["schema"])

    out = kubectl(cluster, "api-resources", f"--api-group={GROUP}", "-o", "wide").stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    for plural, short, scope in KINDS.values():
        assert short in rows[plural].split()
        assert "poolkeeper" in rows[plural]
        assert ("true" if scope == "Namespaced" else "false") in rows[plural].split()


# ----------------------------------------------------------------------------- examples and defaults
def test_examples_are_accepted_and_defaulted(cluster: Cluster, examples: str) -> None:
    ns = examples
    lb = get_json(cluster, "lb", "edge")["spec"]
    assert lb["type"] == "HAProxy"
    assert lb["allowedNamespaces"] == {"from": "All"}
    assert lb["haproxy"]["endpoint"] == "unix:///var/run/haproxy/admin.sock"
    assert lb["haproxy"]["backends"] == [{"name": "be_web"}]

    web = get_json(cluster, "-n", ns, "tp", "web")["spec"]
    assert web["source"] == {"kind": "Pod", "selector": {"matchLabels": {"app": "web"}}}
    assert web["port"] == 8080
    assert web["deregistrationDelaySeconds"] == 30
    assert web["backend"] == {
        "type": "HAProxy",
        "haproxy": {"loadBalancerRef": {"name": "edge"}, "backend": "be_web",
                    "healthCheck": {"intervalSeconds": 2, "rise": 2, "fall": 3, "initialState": "Up"}},
    }
    vms = get_json(cluster, "-n", ns, "tp", "vms")["spec"]
    assert vms["backend"] == {"type": "EndpointSlice", "endpointSlice": {"serviceName": "vms"}}

    inst = get_json(cluster, "-n", ns, "inst", "vm-1")
    assert inst["spec"]["address"] == "192.0.2.10"
    assert inst["metadata"]["labels"]["group"] == "vms"

    lh = get_json(cluster, "-n", ns, "lh", "web-audit")["spec"]
    assert lh["poolRef"] == {"name": "web"}
    assert lh["events"] == ["up", "draining", "down"]
    assert lh["function"] == {"type": "Python", "python": {"handler": "audit.handle"}}
    assert lh["blocking"] is False
    assert lh["onFailure"] == "Continue"
    assert lh["timeoutSeconds"] == 10
    assert lh["retry"] == {"maxAttempts": 3, "initialBackoffSeconds": 1, "maxBackoffSeconds": 60}
    assert lh["maxConcurrency"] == 16
    assert "deadLetter" not in lh


def test_initial_state_is_explained(cluster: Cluster) -> None:
    out = " ".join(kubectl(cluster, "explain", "targetpool.spec.backend.haproxy.healthCheck.initialState")
                   .stdout.split())
    assert "Up (the default)" in out and "Checking" in out and "fall" in out, out


def test_examples_have_no_namespace() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert "namespace" not in doc["metadata"], path.name


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_base_objects_are_valid(cluster: Cluster, ns: str, kind: str) -> None:
    """The objects the invalid cases are derived from are themselves accepted."""
    out = kubectl(cluster, "apply", "-n", ns, "--dry-run=server", "-f", "-", input=json.dumps(base(kind)))
    assert "created (server dry run)" in out.stdout


VALID_VARIANTS: list[tuple[str, str, Mutation]] = [
    ("lb-unix-endpoint", "LoadBalancer", setting(spec__haproxy__endpoint="unix:///run/haproxy/admin.sock")),
    ("lb-ipv6-endpoint-tls", "LoadBalancer", setting(spec__haproxy={
        "endpoint": "tcp://[2001:db8::1]:65535",
        "tls": {"secretRef": {"namespace": "poolkeeper-system", "name": "edge-tls"}}})),
    ("lb-hostname-endpoint", "LoadBalancer", setting(spec__haproxy__endpoint="tcp://haproxy.edge.svc:1")),
    ("lb-backends-per-namespace", "LoadBalancer", setting(spec__haproxy__backends=[
        {"name": "be_web"}, {"name": "be_api:v2", "allowedNamespaces": {"from": "All"}},
        {"name": "be.team-a", "allowedNamespaces": {"from": "Selector", "selector": {
            "matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]}}}])),
    ("lb-no-backends", "LoadBalancer", setting(spec__haproxy__backends=[])),
    ("lb-selector-cidrs", "LoadBalancer", setting(
        spec__allowedNamespaces={"from": "Selector", "selector": {
            "matchLabels": {"team": "web"},
            "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]}},
        spec__allowedTargetCIDRs=["10.0.0.0/8", "2001:db8::/32"])),
    ("tp-node-without-selector", "TargetPool", setting(spec__source={"kind": "Node"})),
    ("tp-exists-expression", "TargetPool", setting(spec__source__selector={
        "matchExpressions": [{"key": "app", "operator": "Exists"}]})),
    ("tp-endpointslice", "TargetPool", setting(
        spec__backend={"type": "EndpointSlice", "endpointSlice": {"serviceName": "web"}})),
    ("tp-zero-delay", "TargetPool", setting(spec__deregistrationDelaySeconds=0)),
    ("tp-healthcheck-checking", "TargetPool",
     setting(spec__backend__haproxy__healthCheck={"initialState": "Checking"})),
    ("tp-ec2", "TargetPool", setting(spec__source={"kind": "EC2", "ec2": {
        "region": "eu-west-1", "tags": {"app": "web"}, "queueURL": "https://sqs.eu-west-1.amazonaws.com/1/q",
        "credentialsSecretRef": {"name": "aws"}, "endpointURL": "http://127.0.0.1:5000", "addressTag": "addr"}})),
    ("inst-ipv6", "Instance", setting(spec__address="2001:db8::10", spec__heartbeatTimeoutSeconds=5)),
    ("lh-http-blocking", "LifecycleHandler", setting(
        spec__function={"type": "HTTP", "http": {"url": "https://hooks.example.com/pool",
                                                  "secretRef": {"name": "hmac", "key": "key"}}},
        spec__blocking=True, spec__events=["up", "draining"], spec__onFailure="Abandon",
        spec__retry={"initialBackoffSeconds": 60},
        spec__deadLetter={"http": {"url": "http://dlq.example.com:8080/x"}})),
]


@pytest.mark.parametrize(("case", "kind", "mutate"), VALID_VARIANTS, ids=[c[0] for c in VALID_VARIANTS])
def test_valid_variants_are_accepted(cluster: Cluster, ns: str, case: str, kind: str,
                                     mutate: Mutation) -> None:
    obj = base(kind)
    mutate(obj)
    out = kubectl(cluster, "apply", "-n", ns, "--dry-run=server", "-f", "-", input=json.dumps(obj),
                  check=False)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------- invalid objects
INVALID: list[tuple[str, str, Mutation, str]] = [
    # --- TargetPool
    ("tp-port-0", "TargetPool", setting(spec__port=0),
     "spec.port in body should be greater than or equal to 1"),
    ("tp-port-70000", "TargetPool", setting(spec__port=70000),
     "spec.port in body should be less than or equal to 65535"),
    ("tp-port-missing", "TargetPool", deleting("spec.port"), "spec.port: Required value"),
    ("tp-source-kind-missing", "TargetPool", deleting("spec.source.kind"),
     "spec.source.kind: Required value"),
    ("tp-source-kind-enum", "TargetPool", setting(spec__source__kind="Service"),
     'spec.source.kind: Unsupported value: "Service": supported values: "Pod", "Node", "Instance"'),
    ("tp-pod-without-selector", "TargetPool", deleting("spec.source.selector"),
     "spec.source.selector is required when kind is Pod or Instance"),
    ("tp-instance-without-selector", "TargetPool", setting(spec__source={"kind": "Instance"}),
     "spec.source.selector is required when kind is Pod or Instance"),
    ("tp-ec2-without-ec2", "TargetPool", setting(spec__source={"kind": "EC2"}),
     "an EC2 source selects instances with spec.source.ec2.tags"),
    ("tp-ec2-with-selector", "TargetPool", setting(spec__source__kind="EC2", spec__source__ec2={
        "region": "us-east-1", "tags": {"app": "web"}, "queueURL": "https://sqs/q"}),
     "(set spec.source.ec2, not spec.source.selector)"),
    ("tp-ec2-no-tags", "TargetPool", setting(spec__source={"kind": "EC2", "ec2": {
        "region": "us-east-1", "tags": {}, "queueURL": "https://sqs/q"}}),
     "spec.source.ec2.tags in body should have at least 1 properties"),
    ("tp-ec2-region", "TargetPool", setting(spec__source={"kind": "EC2", "ec2": {
        "region": "Mars", "tags": {"a": "b"}, "queueURL": "https://sqs/q"}}),
     "spec.source.ec2.region in body should match"),
    ("tp-in-without-values", "TargetPool",
     setting(spec__source__selector={"matchExpressions": [{"key": "app", "operator": "In"}]}),
     "matchExpressions values must be non-empty when operator is In or NotIn"),
    ("tp-exists-with-values", "TargetPool", setting(spec__source__selector={
        "matchExpressions": [{"key": "app", "operator": "Exists", "values": ["web"]}]}),
     "and empty when operator is Exists or DoesNotExist"),
    ("tp-selector-operator-enum", "TargetPool", setting(spec__source__selector={
        "matchExpressions": [{"key": "app", "operator": "Equals", "values": ["web"]}]}),
     'Unsupported value: "Equals"'),
    ("tp-haproxy-type-with-endpointslice", "TargetPool", setting(
        spec__backend={"type": "HAProxy", "endpointSlice": {"serviceName": "web"}}),
     "spec.backend.haproxy must be set when type is HAProxy, and only then"),
    ("tp-both-members", "TargetPool", setting(spec__backend__endpointSlice={"serviceName": "web"}),
     "spec.backend.endpointSlice must be set when type is EndpointSlice, and only then"),
    ("tp-endpointslice-type-with-haproxy", "TargetPool", setting(
        spec__backend={"type": "EndpointSlice", "haproxy": HAPROXY_MEMBER}),
     "spec.backend.haproxy must be set when type is HAProxy, and only then"),
    ("tp-backend-type-enum", "TargetPool", setting(spec__backend__type="Envoy"),
     'spec.backend.type: Unsupported value: "Envoy"'),
    ("tp-haproxy-backend-missing", "TargetPool", deleting("spec.backend.haproxy.backend"),
     "spec.backend.haproxy.backend: Required value"),
    ("tp-haproxy-lbref-missing", "TargetPool", deleting("spec.backend.haproxy.loadBalancerRef"),
     "spec.backend.haproxy.loadBalancerRef: Required value"),
    ("tp-haproxy-backend-name", "TargetPool", setting(spec__backend__haproxy__backend="be web"),
     "spec.backend.haproxy.backend in body should match"),
    ("tp-healthcheck-rise-0", "TargetPool", setting(spec__backend__haproxy__healthCheck={"rise": 0}),
     "spec.backend.haproxy.healthCheck.rise in body should be greater than or equal to 1"),
    ("tp-healthcheck-fall-11", "TargetPool", setting(spec__backend__haproxy__healthCheck={"fall": 11}),
     "spec.backend.haproxy.healthCheck.fall in body should be less than or equal to 10"),
    ("tp-healthcheck-interval-301", "TargetPool",
     setting(spec__backend__haproxy__healthCheck={"intervalSeconds": 301}),
     "spec.backend.haproxy.healthCheck.intervalSeconds in body should be less than or equal to 300"),
    ("tp-healthcheck-initial-state", "TargetPool",
     setting(spec__backend__haproxy__healthCheck={"initialState": "Ready"}),
     'spec.backend.haproxy.healthCheck.initialState: Unsupported value: "Ready": supported values: "Up", "Checking"'),
    ("tp-healthcheck-initial-state-lowercase", "TargetPool",
     setting(spec__backend__haproxy__healthCheck={"initialState": "up"}),
     'spec.backend.haproxy.healthCheck.initialState: Unsupported value: "up"'),
    # an HAProxy-only field: the whole haproxy member is refused with other backend types
    ("tp-initial-state-with-endpointslice", "TargetPool", setting(spec__backend={
        "type": "EndpointSlice", "endpointSlice": {"serviceName": "web"},
        "haproxy": {**HAPROXY_MEMBER, "healthCheck": {"initialState": "Up"}}}),
     "spec.backend.haproxy must be set when type is HAProxy, and only then"),
    ("tp-initial-state-in-elbv2", "TargetPool", setting(spec__backend={"type": "ELBv2", "elbv2": {
        "loadBalancerRef": {"name": "aws"}, "targetGroupARN": "arn:aws:elasticloadbalancing:x",
        "healthCheck": {"initialState": "Up"}}}),
     'unknown field "spec.backend.elbv2.healthCheck"'),
    ("tp-service-name", "TargetPool", setting(
        spec__backend={"type": "EndpointSlice", "endpointSlice": {"serviceName": "Web_Svc"}}),
     "spec.backend.endpointSlice.serviceName in body should match"),
    ("tp-deregistration-delay-4000", "TargetPool", setting(spec__deregistrationDelaySeconds=4000),
     "spec.deregistrationDelaySeconds in body should be less than or equal to 3600"),
    ("tp-unknown-field", "TargetPool", setting(spec__prot=8080), 'unknown field "spec.prot"'),
    # --- Instance
    ("inst-not-an-ip", "Instance", setting(spec__address="not-an-ip"),
     "spec.address must be an IPv4 or IPv6 address"),
    ("inst-cidr-not-ip", "Instance", setting(spec__address="192.0.2.0/24"),
     "spec.address must be an IPv4 or IPv6 address"),
    ("inst-address-missing", "Instance", deleting("spec.address"), "spec.address: Required value"),
    ("inst-heartbeat-2", "Instance", setting(spec__heartbeatTimeoutSeconds=2),
     "spec.heartbeatTimeoutSeconds in body should be greater than or equal to 5"),
    # --- LoadBalancer
    ("lb-http-endpoint", "LoadBalancer", setting(spec__haproxy__endpoint="http://x"),
     "spec.haproxy.endpoint must be unix:// followed by an absolute socket path"),
    ("lb-unix-relative", "LoadBalancer", setting(spec__haproxy__endpoint="unix://run/admin.sock"),
     "spec.haproxy.endpoint must be unix:// followed by an absolute socket path"),
    ("lb-tcp-port-70000", "LoadBalancer", setting(spec__haproxy__endpoint="tcp://haproxy:70000"),
     "or tcp://HOST:PORT with PORT 1-65535"),
    ("lb-tcp-no-port", "LoadBalancer", setting(spec__haproxy__endpoint="tcp://haproxy"),
     "or tcp://HOST:PORT with PORT 1-65535"),
    ("lb-tls-with-unix", "LoadBalancer", setting(spec__haproxy={
        "endpoint": "unix:///run/haproxy/admin.sock",
        "tls": {"secretRef": {"namespace": "poolkeeper-system", "name": "edge-tls"}}}),
     "spec.haproxy.tls is only allowed with a tcp:// endpoint"),
    ("lb-haproxy-missing", "LoadBalancer", setting(spec={"type": "HAProxy"}),
     "spec.haproxy must be set when type is HAProxy, and only then"),
    ("lb-type-enum", "LoadBalancer", setting(spec__type="Nginx"), 'spec.type: Unsupported value: "Nginx"'),
    ("lb-selector-without-selector", "LoadBalancer", setting(spec__allowedNamespaces={"from": "Selector"}),
     "spec.allowedNamespaces.selector must be set when from is Selector, and only then"),
    ("lb-all-with-selector", "LoadBalancer", setting(spec__allowedNamespaces={
        "from": "All", "selector": {"matchLabels": {"team": "web"}}}),
     "spec.allowedNamespaces.selector must be set when from is Selector, and only then"),
    ("lb-bad-cidr", "LoadBalancer", setting(spec__allowedTargetCIDRs=["10.0.0.0/8", "10.0.0.0/33"]),
     "each of spec.allowedTargetCIDRs must be a CIDR"),
    ("lb-too-many-cidrs", "LoadBalancer",
     setting(spec__allowedTargetCIDRs=[f"10.{i}.0.0/16" for i in range(65)]),
     "spec.allowedTargetCIDRs: Too many: 65: must have at most 64 items"),
    ("lb-tls-secret-namespace-missing", "LoadBalancer", setting(spec__haproxy={
        "endpoint": "tcp://10.0.0.5:9999", "tls": {"secretRef": {"name": "edge-tls"}}}),
     "spec.haproxy.tls.secretRef.namespace: Required value"),
    ("lb-backend-listed-twice", "LoadBalancer", setting(spec__haproxy__backends=[{"name": "be"}, {"name": "be"}]),
     'spec.haproxy.backends[1]: Duplicate value: {"name":"be"}'),
    ("lb-backend-bad-name", "LoadBalancer", setting(spec__haproxy__backends=[{"name": "be web"}]),
     "spec.haproxy.backends[].name must be an HAProxy backend name: letters, digits and _ . : - only"),
    ("lb-backend-name-too-long", "LoadBalancer", setting(spec__haproxy__backends=[{"name": "b" * 64}]),
     "spec.haproxy.backends[0].name: Too long: may not be more than 63 bytes"),
    ("lb-backend-without-name", "LoadBalancer", setting(spec__haproxy__backends=[{}]),
     "spec.haproxy.backends[0].name: Required value"),
    ("lb-too-many-backends", "LoadBalancer",
     setting(spec__haproxy__backends=[{"name": f"be{i}"} for i in range(65)]),
     "spec.haproxy.backends: Too many: 65: must have at most 64 items"),
    ("lb-backend-same-namespace", "LoadBalancer",
     setting(spec__haproxy__backends=[{"name": "be", "allowedNamespaces": {"from": "Same"}}]),
     'spec.haproxy.backends[0].allowedNamespaces.from: Unsupported value: "Same"'),
    ("lb-backend-selector-without-selector", "LoadBalancer",
     setting(spec__haproxy__backends=[{"name": "be", "allowedNamespaces": {"from": "Selector"}}]),
     "spec.haproxy.backends[].allowedNamespaces.selector must be set when from is Selector, and only then"),
    # --- LifecycleHandler
    ("lh-empty-events", "LifecycleHandler", setting(spec__events=[]),
     "spec.events in body should have at least 1 items"),
    ("lh-unknown-event", "LifecycleHandler", setting(spec__events=["up", "crashed"]),
     'Unsupported value: "crashed"'),
    ("lh-duplicate-event", "LifecycleHandler", setting(spec__events=["up", "up"]),
     'spec.events[1]: Duplicate value: "up"'),
    ("lh-blocking-with-down", "LifecycleHandler", setting(spec__blocking=True, spec__events=["up", "down"]),
     "spec.events may only contain up and/or draining when spec.blocking is true"),
    ("lh-handler-no-dot", "LifecycleHandler", setting(spec__function__python__handler="audit"),
     "spec.function.python.handler must be FILE.FUNCTION"),
    ("lh-handler-two-dots", "LifecycleHandler", setting(spec__function__python__handler="pkg.audit.handle"),
     "spec.function.python.handler must be FILE.FUNCTION"),
    ("lh-http-ftp-url", "LifecycleHandler",
     setting(spec__function={"type": "HTTP", "http": {"url": "ftp://x"}}),
     "url must be an absolute http:// or https:// URL"),
    ("lh-http-with-python-member", "LifecycleHandler", setting(spec__function__type="HTTP"),
     "spec.function.python must be set when type is Python, and only then"),
    ("lh-python-without-member", "LifecycleHandler", setting(spec__function={"type": "Python"}),
     "spec.function.python must be set when type is Python, and only then"),
    ("lh-function-type-enum", "LifecycleHandler", setting(spec__function__type="Lambda"),
     'spec.function.type: Unsupported value: "Lambda"'),
    ("lh-backoff-order", "LifecycleHandler",
     setting(spec__retry={"initialBackoffSeconds": 120, "maxBackoffSeconds": 60}),
     "spec.retry.initialBackoffSeconds must not be greater than spec.retry.maxBackoffSeconds"),
    ("lh-backoff-order-default-max", "LifecycleHandler", setting(spec__retry={"initialBackoffSeconds": 61}),
     "spec.retry.initialBackoffSeconds must not be greater than spec.retry.maxBackoffSeconds"),
    ("lh-max-attempts-0", "LifecycleHandler", setting(spec__retry={"maxAttempts": 0}),
     "spec.retry.maxAttempts in body should be greater than or equal to 1"),
    ("lh-max-concurrency-0", "LifecycleHandler", setting(spec__maxConcurrency=0),
     "spec.maxConcurrency in body should be greater than or equal to 1"),
    ("lh-timeout-901", "LifecycleHandler", setting(spec__timeoutSeconds=901),
     "spec.timeoutSeconds in body should be less than or equal to 900"),
    ("lh-on-failure-enum", "LifecycleHandler", setting(spec__onFailure="Retry"),
     'spec.onFailure: Unsupported value: "Retry"'),
    ("lh-dead-letter-url", "LifecycleHandler", setting(spec__deadLetter={"http": {"url": "not a url"}}),
     "url must be an absolute http:// or https:// URL"),
    ("lh-http-url-no-host", "LifecycleHandler",
     setting(spec__function={"type": "HTTP", "http": {"url": "https://"}}),
     "url must be an absolute http:// or https:// URL with a host"),
    ("lh-pool-ref-missing", "LifecycleHandler", deleting("spec.poolRef"), "spec.poolRef: Required value"),
    ("lh-secret-ref-key-missing", "LifecycleHandler", setting(spec__function={
        "type": "HTTP", "http": {"url": "https://hooks.example.com", "secretRef": {"name": "hmac"}}}),
     "spec.function.http.secretRef.key: Required value"),
    # --- every kind
    ("spec-missing", "Instance", deleting("spec"), "spec: Required value"),
]


def test_enough_distinct_invalid_cases() -> None:
    ids = [case[0] for case in INVALID]
    assert len(ids) == len(set(ids)) >= 20


@pytest.mark.parametrize(("case", "kind", "mutate", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_object_is_rejected(cluster: Cluster, ns: str, case: str, kind: str, mutate: Mutation,
                                    message: str) -> None:
    obj = base(kind)
    obj["metadata"]["name"] = f"bad-{case}"
    mutate(obj)
    out = kubectl(cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    assert out.returncode != 0, f"{case} was accepted: {out.stdout}"
    assert message in out.stderr, out.stderr


def test_blocking_rule_applies_to_updates(cluster: Cluster, ns: str) -> None:
    """CEL rules run on updates too: turning on blocking for a handler of `down` is refused."""
    obj = base("LifecycleHandler")
    obj["metadata"]["name"] = "update-check"
    obj["spec"]["events"] = ["up", "down"]
    kubectl(cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(obj))
    out = kubectl(cluster, "patch", "-n", ns, "lh", "update-check", "--type=merge",
                  "-p", '{"spec": {"blocking": true}}', check=False)
    assert out.returncode != 0
    assert "spec.events may only contain up and/or draining when spec.blocking is true" in out.stderr


# ----------------------------------------------------------------------------- printing
def test_printer_columns(cluster: Cluster, examples: str) -> None:
    for pool, kinds in (("web", "Pod"), ("vms", "Instance")):  # the Source column is what the operator writes
        kubectl(cluster, "patch", "-n", examples, "tp", pool, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"source": kinds}}))
    out = kubectl(cluster, "get", "lb,tp,inst,lh", "-n", examples).stdout
    headers = [line.split() for line in out.splitlines() if line.startswith("NAME")]
    assert ["NAME", "TYPE", "ENDPOINT", "ACCEPTED", "REACHABLE", "POOLS", "AGE"] in headers
    assert ["NAME", "SOURCE", "BACKEND", "DESIRED", "ACTIVE", "DRAINING", "READY", "AGE"] in headers
    assert ["NAME", "ADDRESS", "STATE", "LAST-HEARTBEAT", "AGE"] in headers
    assert ["NAME", "POOL", "EVENTS", "INVOCATIONS", "FAILED", "DEAD", "READY", "AGE"] in headers
    rows = {line.split()[0]: line.split() for line in out.splitlines() if not line.startswith("NAME")
            and line.strip()}
    assert rows["loadbalancer.poolkeeper.dev/edge"][1:3] == ["HAProxy", "unix:///var/run/haproxy/admin.sock"]
    assert rows["targetpool.poolkeeper.dev/web"][1:3] == ["Pod", "HAProxy"]
    assert rows["targetpool.poolkeeper.dev/vms"][1:3] == ["Instance", "EndpointSlice"]
    assert rows["instance.poolkeeper.dev/vm-1"][1] == "192.0.2.10"
    assert rows["lifecyclehandler.poolkeeper.dev/web-audit"][1:3] == ["web", '["up","draining","down"]']


def test_category_lists_every_kind(cluster: Cluster, examples: str) -> None:
    out = kubectl(cluster, "get", "poolkeeper", "-n", examples, "-o", "name").stdout.split()
    for name in ("loadbalancer.poolkeeper.dev/edge", "targetpool.poolkeeper.dev/web",
                 "targetpool.poolkeeper.dev/vms", "instance.poolkeeper.dev/vm-1",
                 "lifecyclehandler.poolkeeper.dev/web-audit"):
        assert name in out


# ----------------------------------------------------------------------------- status
TIME = "2025-01-02T03:04:05Z"


def condition(type_: str, status: str = "True", reason: str = "Synced") -> Obj:
    return {"type": type_, "status": status, "reason": reason, "message": f"{type_} is {status}",
            "lastTransitionTime": TIME, "observedGeneration": 1}


STATUSES: dict[str, Obj] = {
    "TargetPool": {
        "observedGeneration": 1, "source": "Pod", "backend": "edge/be_web", "desired": 2, "active": 1, "draining": 1,
        "members": [
            {"instance": "Pod/shop/web-0", "address": "10.1.0.4", "port": 8080, "state": "Active",
             "health": "UP", "reason": "HealthCheckPassed", "since": TIME},
            {"instance": "Pod/shop/web-1", "address": "fd00::5", "port": 8080, "state": "Draining",
             "health": "DOWN", "reason": "PodTerminating", "since": TIME},
            {"instance": "Pod/shop/web-2", "state": "Registering"},
            {"instance": "Pod/shop/web-3", "state": "Held", "reason": "WaitingForHandler web-audit"},
        ],
        "conditions": [condition("Ready"), condition("BackendReachable", "False", "ConnectionRefused")],
    },
    "LoadBalancer": {"observedGeneration": 1, "pools": 3, "version": "3.0.5",
                     "conditions": [condition("Reachable")]},
    "Instance": {"state": "running", "lastHeartbeatTime": TIME, "message": "agent 1.2.3"},
    "LifecycleHandler": {
        "observedGeneration": 1, "invocations": 10, "succeeded": 7, "failed": 2, "deadLettered": 1,
        "lastInvocation": {"eventId": "0d3c8f8e", "type": "draining", "instance": "Pod/shop/web-1",
                           "result": "Failed", "attempts": 3, "durationMs": 1520,
                           "error": "ConnectionError: refused", "time": TIME},
        "conditions": [condition("Ready")],
    },
}


def write_status(cluster: Cluster, ns: str, kind: str) -> Obj:
    """Create `status-<kind>` and merge-patch STATUSES[kind] through the status subresource."""
    obj = base(kind)
    name = obj["metadata"]["name"] = f"status-{kind.lower()}"
    plural = KINDS[kind][0]
    kubectl(cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(obj))
    kubectl(cluster, "patch", "-n", ns, plural, name, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": STATUSES[kind]}))
    return get_json(cluster, "-n", ns, plural, name)  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", sorted(STATUSES))
def test_status_written_by_the_operator_is_kept(cluster: Cluster, ns: str, kind: str) -> None:
    got = write_status(cluster, ns, kind)
    assert got["status"] == STATUSES[kind]  # nothing pruned, nothing added


def test_status_columns_show_counts(cluster: Cluster, ns: str) -> None:
    write_status(cluster, ns, "TargetPool")
    out = kubectl(cluster, "get", "-n", ns, "tp", "status-targetpool", "--no-headers").stdout.split()
    assert out[1:7] == ["Pod", "HAProxy", "2", "1", "1", "True"]


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ({"members": [{"instance": "Pod/a/b", "state": "Gone"}]}, 'Unsupported value: "Gone"'),
        ({"conditions": [{"type": "Ready", "status": "Yes", "reason": "X", "message": "",
                          "lastTransitionTime": TIME}]}, 'Unsupported value: "Yes"'),
        ({"members": [{"instance": "Pod/a/b", "state": "Active", "since": "yesterday"}]},
         'members[0].since in body must be of type date-time'),
    ],
    ids=["member-state", "condition-status", "member-since"],
)
def test_invalid_status_is_rejected(cluster: Cluster, ns: str, status: Obj, message: str) -> None:
    obj = base("TargetPool")
    obj["metadata"]["name"] = "status-invalid"
    kubectl(cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(obj))
    out = kubectl(cluster, "patch", "-n", ns, "tp", "status-invalid", "--subresource=status",
                  "--type=merge", "-p", json.dumps({"status": status}), check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_spec_is_not_writable_through_status(cluster: Cluster, ns: str) -> None:
    obj = base("TargetPool")
    obj["metadata"]["name"] = "status-spec"
    kubectl(cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(obj))
    kubectl(cluster, "patch", "-n", ns, "tp", "status-spec", "--subresource=status", "--type=merge",
            "-p", '{"spec": {"port": 9090}, "status": {"desired": 0}}')
    got = get_json(cluster, "-n", ns, "tp", "status-spec")
    assert got["spec"]["port"] == 8080
    assert got["status"]["desired"] == 0


# ----------------------------------------------------------------------------- install manifests
def test_install_manifests_dry_run(cluster: Cluster) -> None:
    created = kubectl(cluster, "create", "namespace", "poolkeeper-system", check=False)
    assert created.returncode == 0 or "AlreadyExists" in created.stderr, created.stderr
    out = kubectl(cluster, "apply", "-k", str(MANIFESTS), "--dry-run=server")
    for name in ("namespace/poolkeeper-system", "customresourcedefinition.apiextensions.k8s.io/"
                 "targetpools.poolkeeper.dev", "serviceaccount/poolkeeper",
                 "clusterrole.rbac.authorization.k8s.io/poolkeeper",
                 "clusterrole.rbac.authorization.k8s.io/poolkeeper-instance-agent",
                 "clusterrolebinding.rbac.authorization.k8s.io/poolkeeper", "deployment.apps/poolkeeper",
                 "role.rbac.authorization.k8s.io/poolkeeper-outbox",
                 "rolebinding.rbac.authorization.k8s.io/poolkeeper-outbox",
                 "role.rbac.authorization.k8s.io/poolkeeper-leader-election",
                 "rolebinding.rbac.authorization.k8s.io/poolkeeper-leader-election"):
        assert name in out.stdout
    assert "annotate-handler" not in out.stdout  # optional, not installed by default
    optional = kubectl(cluster, "apply", "-f", str(MANIFESTS / "optional"), "--dry-run=server")
    assert "clusterrole.rbac.authorization.k8s.io/poolkeeper-annotate-handler" in optional.stdout


def load_docs(name: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def test_rbac_has_no_wildcards_and_agent_is_narrow() -> None:
    roles = {doc["metadata"]["name"]: doc for doc in load_docs("rbac.yaml") if doc["kind"] == "ClusterRole"}
    for role in roles.values():
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
            assert "nonResourceURLs" not in rule
    operator = {(group, res): set(rule["verbs"]) for rule in roles["poolkeeper"]["rules"]
                for group in rule["apiGroups"] for res in rule["resources"]}
    assert operator[("", "secrets")] == {"get"}
    assert operator[("", "pods/status")] == {"patch"}
    # Pods, Nodes and Instances themselves are not writable (annotate.handle's rights are optional),
    # nor Leases cluster-wide (a Role in the operator's namespace).
    for resource in (("", "pods"), ("", "nodes"), (GROUP, "instances")):
        assert not operator[resource] - {"get", "list", "watch"}, resource
    assert not any(group == "coordination.k8s.io" for group, _ in operator)
    assert operator[(GROUP, "targetpools/finalizers")] == {"update"}
    assert not any("delete" in verbs for (group, _), verbs in operator.items() if group != "discovery.k8s.io")
    agent = {(group, res): set(rule["verbs"]) for rule in roles["poolkeeper-instance-agent"]["rules"]
             for group in rule["apiGroups"] for res in rule["resources"]}
    assert agent == {(GROUP, "instances"): {"get"}, (GROUP, "instances/status"): {"get", "patch", "update"}}
    # ConfigMaps (the outboxes) only in the operator's own namespace: never in a tenant's
    assert ("", "configmaps") not in operator
    roles_here = {doc["metadata"]["name"]: doc for doc in load_docs("rbac.yaml") if doc["kind"] == "Role"}
    assert set(roles_here) == {"poolkeeper-outbox", "poolkeeper-leader-election"}
    outbox, lease = roles_here["poolkeeper-outbox"], roles_here["poolkeeper-leader-election"]
    assert outbox["metadata"]["namespace"] == lease["metadata"]["namespace"] == "poolkeeper-system"
    assert lease["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                               "verbs": ["get", "list", "create", "update", "delete"]}]  # shard Leases
    assert outbox["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                                "verbs": ["get", "list", "create", "update", "delete"]}]


def test_deployment_is_hardened() -> None:
    (deploy,) = load_docs("deployment.yaml")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/poolkeeper/poolkeeper:0.1.0"
    # no address allowances: the default policy (core/addresses.py) applies as shipped
    assert container["command"] == ["poolkeeper", "run", "--metrics-port", "8080", "--leader-elect"]
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    # The token is not at the default path (handler functions would find it there): projected elsewhere.
    assert pod["automountServiceAccountToken"] is False
    (creds,) = [v for v in pod["volumes"] if v["name"] == "operator-credentials"]
    assert any("serviceAccountToken" in source for source in creds["projected"]["sources"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["POOLKEEPER_SERVICEACCOUNT_DIR"] == mounts["operator-credentials"] != \
        "/var/run/secrets/kubernetes.io/serviceaccount"
