"""The `poolkeeper` command: run the operator, manage a dev control plane, report heartbeats, invoke handlers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from poolkeeper.app import OperatorOptions, run_operator

    return run_operator(OperatorOptions(
        kubeconfig=args.kubeconfig, namespaces=tuple(args.namespace or ()), handlers_dir=args.handlers_dir,
        metrics_port=args.metrics_port, metrics_address=args.metrics_address,
        http_allowed_cidrs=tuple(args.http_allowed_cidrs.split(",")) if args.http_allowed_cidrs else None,
        endpointslice_allowed_cidrs=args.endpointslice_allowed_cidrs,
        endpointslice_allow_external_sources=args.endpointslice_allow_external_sources,
        pod_label_selector=args.pod_label_selector, workers=args.workers, function_workers=args.function_workers,
        leader_elect=args.leader_elect, leader_namespace=args.leader_elect_namespace,
        outbox_namespace=args.outbox_namespace, node_source_namespaces=args.node_source_namespaces,
        handler_credentials=args.handler_credentials, http_connections=args.http_connections,
        http_namespace_concurrency=args.http_namespace_concurrency, cluster_id=args.cluster_id,
        ec2_source_namespaces=args.ec2_source_namespaces,
        lifecycle_heartbeat_seconds=args.lifecycle_heartbeat_seconds, shards=args.shards,
    ))


def _heartbeat(args: argparse.Namespace) -> int:
    from poolkeeper.agent import HeartbeatError, report_heartbeat

    try:
        result = report_heartbeat(args.name, namespace=args.namespace, state=args.state, kubeconfig=args.kubeconfig,
                                  message=args.message)
    except HeartbeatError as exc:
        print(f"heartbeat failed: {exc}", file=sys.stderr)
        return 1
    print(f"instance {args.namespace}/{args.name}: state={result['state']} "
          f"lastHeartbeatTime={result['lastHeartbeatTime']}")
    return 0


def _devcluster(argv: list[str]) -> int:
    """Hand over to the development package, which the runtime image does not carry."""
    try:
        from poolkeeper_dev.cli import devcluster_main
    except ModuleNotFoundError as exc:
        if exc.name != "poolkeeper_dev":
            raise
        print("poolkeeper devcluster needs the development package: pip install -e devtools/ "
              "(from a checkout of poolkeeper)", file=sys.stderr)
        return 2
    return devcluster_main(argv)


def _invoke(argv: list[str]) -> int:
    from poolkeeper.functions.invoke_cli import invoke_main

    return invoke_main(argv)


def _cidr_list(value: str) -> tuple[Any, ...]:
    from poolkeeper.core.addresses import parse_cidr_flag

    try:
        return parse_cidr_flag([value])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _node_source_namespaces(value: str) -> Any:
    from poolkeeper.core.tenancy import parse_node_source_namespaces

    try:
        return parse_node_source_namespaces(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _cluster_id(value: str) -> str:
    from poolkeeper.core.naming import cluster_prefix

    try:
        cluster_prefix(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def _ec2_source_namespaces(value: str) -> Any:
    from poolkeeper.core.tenancy import parse_ec2_source_namespaces

    try:
        return parse_ec2_source_namespaces(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolkeeper", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator")
    run.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    run.add_argument("--namespace", action="append", help="watch only this namespace (repeatable)")
    run.add_argument("--handlers-dir", default=None, help="folder of Python handler functions (default: ./handlers)")
    run.add_argument("--metrics-port", type=int, default=8080, help="port for /healthz, /readyz, /metrics (0: off)")
    run.add_argument("--metrics-address", default="0.0.0.0", help="address for the metrics server")
    run.add_argument("--http-allowed-cidrs", default=None,
                     help="comma-separated CIDRs HTTP handlers may reach (default: any address but loopback, "
                          "unspecified, link-local, multicast, broadcast, IPv4-mapped, zoned and cloud metadata "
                          "ones, which need a listed CIDR inside their range, e.g. 127.0.0.0/8)")
    run.add_argument("--endpointslice-allowed-cidrs", type=_cidr_list, default=None,
                     help="comma-separated CIDRs EndpointSlice endpoints may have (default: any address but the "
                          "special ones --http-allowed-cidrs names, which need a listed CIDR inside their range)")
    run.add_argument("--endpointslice-allow-external-sources", action="store_true",
                     help="let TargetPools with Instance or Node sources write EndpointSlices (default: Pod "
                          "sources only; such a pool shows Synced=False SourceNotAllowed)")
    run.add_argument("--node-source-namespaces", type=_node_source_namespaces, default=None,
                     help="namespaces whose TargetPools may select Nodes: a comma list of names or a namespace "
                          "label selector (e.g. 'poolkeeper.dev/node-sources=allowed'); default: every namespace. "
                          "Other pools with Node sources show Synced=False NodeSourceNotAllowed")
    run.add_argument("--ec2-source-namespaces", type=_ec2_source_namespaces, default=None,
                     help="namespaces whose EC2-source TargetPools may use the operator's own AWS identity or "
                          "set endpointURL: names, a namespace label selector, or '*'; default: none (such pools "
                          "need credentialsSecretRef, else Synced=False EC2SourceNotAllowed)")
    run.add_argument("--lifecycle-heartbeat-seconds", type=_positive, default=60,
                     help="while an Auto Scaling lifecycle hook waits for an EC2 pool (registration, draining, "
                          "blocking handlers), send RecordLifecycleActionHeartbeat this often (default 60; keep "
                          "it below the hook's heartbeat timeout)")
    run.add_argument("--handler-credentials", choices=("none", "operator"), default="none",
                     help="what Python handler functions may authenticate as: none (default: no token, no "
                          "kubeconfig, KUBECONFIG=/dev/null) or operator (the operator's own identity, e.g. for "
                          "annotate.handle; bind manifests/optional/annotate-handler-rbac.yaml)")
    run.add_argument("--http-connections", type=_positive, default=100,
                     help="HTTP handler deliveries in flight, all namespaces together (default: 100)")
    run.add_argument("--http-namespace-concurrency", type=_positive, default=None,
                     help="HTTP handler deliveries in flight for one namespace, all its handlers together "
                          "(default: a quarter of --http-connections; always fewer than it)")
    run.add_argument("--pod-label-selector", default=None,
                     help="server-side label selector for the Pod watch (e.g. 'poolkeeper.dev/member')")
    run.add_argument("--cluster-id", type=_cluster_id, default="",
                     help="owner id of this operator's servers, for HAProxy backends shared with other clusters: "
                          "its server names start with pk.<id>. and it touches no other server; default empty: "
                          "names start with pk- as before (1-16 of a-z, 0-9, '-')")
    run.add_argument("--workers", type=int, default=4, help="pools reconciled concurrently")
    run.add_argument("--function-workers", type=int, default=None,
                     help="worker processes for Python handlers (default: max(2, CPUs))")
    run.add_argument("--leader-elect", action="store_true",
                     help="run as one of several replicas: only the holder of a Lease acts")
    run.add_argument("--shards", type=_positive, default=1,
                     help="spread the pools over this many shards, one Lease each (poolkeeper-shard-<i>), held "
                          "by the replicas in about equal parts; the same on every replica. Default 1: one Lease "
                          "(poolkeeper) and one acting replica, as --leader-elect. Above 1 implies leader election "
                          "per shard")
    run.add_argument("--leader-elect-namespace", default=os.environ.get("POD_NAMESPACE") or "poolkeeper-system",
                     help="namespace of the Lease (default: $POD_NAMESPACE, else poolkeeper-system)")
    run.add_argument("--outbox-namespace", default=os.environ.get("POD_NAMESPACE") or "poolkeeper-system",
                     help="namespace of the handlers' outbox ConfigMaps; tenants must not write there "
                          "(default: $POD_NAMESPACE, else poolkeeper-system)")
    run.add_argument("--log-format", choices=("json", "plain"), default="json", help="log lines as JSON (default)")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_run)

    sub.add_parser("devcluster", help="a local cluster for development (needs the poolkeeper-dev package)",
                   add_help=False)

    inst = sub.add_parser("instance", help="report an Instance's state, as a machine's agent")
    inst_sub = inst.add_subparsers(dest="instance_command", required=True)
    hb = inst_sub.add_parser("heartbeat", help="write status.state and lastHeartbeatTime")
    hb.add_argument("name")
    hb.add_argument("--namespace", "-n", default="default")
    hb.add_argument("--state", default="running",
                    choices=("pending", "running", "stopping", "stopped", "terminated"))
    hb.add_argument("--message", default=None)
    hb.add_argument("--kubeconfig", default=None)
    hb.set_defaults(func=_heartbeat)

    sub.add_parser("invoke", help="run a handler function locally with a sample event", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["invoke"]:
        return _invoke(argv[1:])
    if argv[:1] == ["devcluster"]:
        return _devcluster(argv[1:])
    args = build_parser().parse_args(argv)
    from poolkeeper.logs import configure

    configure(getattr(args, "log_format", "plain"), logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    return int(args.func(args))
