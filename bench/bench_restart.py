"""A restart of the operator over pools whose status is already right: what it costs the API server.

    .venv/bin/python bench/bench_restart.py --baseline /tmp/wt-old [--restarts 3]

One control plane and one HAProxy; --pools TargetPools (1,000) of --pool-size Ready pods each, over
--namespaces namespaces, reconciled until every pool is Ready and left to settle. Then the operator
is restarted --restarts times (SIGTERM, start again), alternating this checkout's code with
--baseline's (a folder holding another checkout's operator/), so both see the same machine load.
Unlike the envelope's cold start, nothing is wiped: the statuses stay as the last run wrote them,
as after an upgrade, a crash or a leader failover. Per restart: the TargetPool status PATCHes the
API server counted, its CPU and etcd's, from the operator's start until every pool has been
reconciled once (`poolkeeper_reconciles_total`) plus 2 s, and that time. Prints a table; writes
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_envelope import (
    ManyBackendsHAProxy,
    counter_total,
    create_load_balancers,
    create_pools,
    layout,
    on_fresh_cluster,
    populate,
    start_from,
    wait_pools_ready,
)
from bench_operator import Kube, cpu_seconds, log, wait_until
from bench_sidebyside import api_writes

from poolkeeper_dev import Cluster
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.shipped_python import shipped_python

THIS, BASE = "this checkout", "baseline"
STATUS_PATCH = "PATCH targetpools/status"


async def restart(kube: Kube, cluster: Cluster, operator: OperatorProcess, pools: int,
                  source: Path | None) -> dict[str, Any]:
    await asyncio.to_thread(operator.stop)
    await asyncio.sleep(1.0)
    control = {name: cluster.state["pids"][name] for name in ("kube-apiserver", "etcd")}
    writes0 = await api_writes(kube)
    cpu0 = {name: cpu_seconds(pid) for name, pid in control.items()}
    await start_from(operator, source)
    started = operator.spawned_at

    async def all_reconciled() -> bool:
        try:
            text = await asyncio.to_thread(operator.metrics)
        except OSError:
            return False
        return counter_total(text, "poolkeeper_reconciles_total") >= pools
    await wait_until(all_reconciled, 300, f"{pools} pools reconciled", interval=0.1)
    seconds = time.monotonic() - started
    await asyncio.sleep(2.0)  # a status write is sent within 0.25 s of its reconcile
    writes1 = await api_writes(kube)
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in control.items()}
    return {"patches": writes1.get(STATUS_PATCH, 0.0) - writes0.get(STATUS_PATCH, 0.0), "seconds": seconds,
            "apiserver": cpu["kube-apiserver"], "etcd": cpu["etcd"],
            "operator": cpu_seconds(operator.pid) if operator.pid else 0.0}


async def run(cluster: Cluster, haproxy: ManyBackendsHAProxy, args: argparse.Namespace) -> list[dict[str, Any]]:
    lay = layout(args)
    kube = Kube(cluster.kubeconfig)
    operator = OperatorProcess(cluster.kubeconfig, args.dir / "logs", python=shipped_python(),
                               extra_args=("--http-allowed-cidrs", "127.0.0.0/8"))
    rows: list[dict[str, Any]] = []
    try:
        await create_load_balancers(kube, haproxy)
        await populate(kube, lay, args)
        await create_pools(kube, lay.pools, args.concurrency)
        await asyncio.to_thread(operator.start, False)
        await wait_pools_ready(kube, lay.pools, args.pool_size, 600, poll=2.0)
        log(f"{len(lay.pools)} pools Ready; settling {args.settle:g} s")
        await asyncio.sleep(args.settle)
        variants = [(THIS, None), *([(BASE, args.baseline)] if args.baseline else [])]
        for round_ in range(args.restarts):
            for name, source in variants if round_ % 2 == 0 else variants[::-1]:
                row = {"variant": name, "round": round_,
                       **await restart(kube, cluster, operator, len(lay.pools), source)}
                log(f"{name}: {row['patches']:.0f} status PATCHes, every pool reconciled {row['seconds']:.1f} s "
                    f"after the start; kube-apiserver {row['apiserver']:.1f} s CPU, etcd {row['etcd']:.1f} s, "
                    f"operator {row['operator']:.1f} s")
                rows.append(row)
    finally:
        await asyncio.to_thread(operator.stop)
        await kube.close()
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | round | TargetPool status PATCHes | every pool reconciled | kube-apiserver CPU | "
             "etcd CPU | operator CPU |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['round']} | {row['patches']:.0f} | {row['seconds']:.1f} s | "
                     f"{row['apiserver']:.1f} s | {row['etcd']:.1f} s | {row['operator']:.1f} s |")
    lines.append("")
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        lines.append(f"- {name}, medians of {len(mine)}: {statistics.median(r['patches'] for r in mine):.0f} "
                     f"PATCHes, every pool reconciled {statistics.median(r['seconds'] for r in mine):.1f} s, "
                     f"kube-apiserver {statistics.median(r['apiserver'] for r in mine):.1f} s CPU, "
                     f"operator {statistics.median(r['operator'] for r in mine):.1f} s CPU")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout (its operator/ is run)")
    parser.add_argument("--restarts", type=int, default=3, help="rounds (each restarts every variant once)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pk-restart"), help="control plane folder (wiped)")
    parser.add_argument("--pools", type=int, default=1_000)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds idle after every pool is Ready")
    args = parser.parse_args(argv)
    args.pods, args.handlers = args.pools * args.pool_size, 0
    args.dir = args.dir.resolve()
    started = time.monotonic()
    rows = on_fresh_cluster(args, layout(args), lambda cluster, haproxy: run(cluster, haproxy, args))
    print(render(rows))
    log(f"whole run {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
