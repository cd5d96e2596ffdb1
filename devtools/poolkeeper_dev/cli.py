"""`poolkeeper devcluster ...`: start, stop and inspect a local cluster (control plane, optionally a real node)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from poolkeeper_dev.build import BuildError, ensure_binaries
from poolkeeper_dev.cluster import Cluster, ClusterError
from poolkeeper_dev.requirements import MissingRequirement


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolkeeper devcluster", description=__doc__)
    parser.add_argument("action", choices=("build", "up", "down", "status"))
    parser.add_argument("--dir", default=".devcluster", help="state folder (default: ./.devcluster)")
    parser.add_argument("--node", action="store_true",
                        help="with up: also run a real node (containerd, kubelet, kube-proxy, kube-scheduler)")
    return parser


def devcluster_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cluster = Cluster(Path(args.dir))
    started = time.monotonic()
    try:
        if args.action == "build":
            print(f"devcluster binaries in {ensure_binaries()} ({time.monotonic() - started:.1f}s)")
        elif args.action == "up":
            cluster.up(node=args.node)
            what = "control plane and node" if cluster.has_node else "control plane"
            print(f"devcluster {what} ready in {time.monotonic() - started:.1f}s at {cluster.server}")
            print(f"  kubeconfig: {cluster.kubeconfig}\n  source {cluster.env_file}  # KUBECONFIG and kubectl on PATH")
        elif args.action == "down":
            stopped = cluster.down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            status = cluster.status()
            print(json.dumps(status, indent=2))
            return 0 if status["ready"] else 1
    except (ClusterError, BuildError, MissingRequirement, OSError) as exc:
        print(f"devcluster {args.action} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(devcluster_main(sys.argv[1:]))
