"""Operator CPU per 1,000 transitions, two code trees side by side in one run (A/B pairs).

    .venv/bin/python bench/bench_cpu_ab.py --a /work/wt-cbase/operator --b operator [--pairs 3]

One control plane, one HAProxy and the envelope benchmark's 10-pool layout (bench_envelope's
`flips` phase: readiness flips of the pods of 10 pools at --rate/s, CPU from /proc until HAProxy
shows every server back). The operator runs from tree A, then from tree B (each a fresh process,
the other stopped), --pairs times, alternating, so both see the same machine load. Prints a
table of every run and the medians, and the ratio B/A of the medians. --py-spy profiles each run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_envelope import (
    SMALL,
    ManyBackendsHAProxy,
    create_load_balancers,
    create_pools,
    flips,
    layout,
    on_fresh_cluster,
    populate,
    wait_pools_ready,
)
from bench_operator import Kube, log

from poolkeeper_dev import Cluster
from poolkeeper_dev.operator_process import OperatorProcess
from poolkeeper_dev.shipped_python import shipped_python

REPO = Path(__file__).resolve().parent.parent


async def run_pairs(cluster: Cluster, haproxy: ManyBackendsHAProxy, args: argparse.Namespace) -> list[dict[str, Any]]:
    lay = layout(args)
    kube = Kube(cluster.kubeconfig)
    rows: list[dict[str, Any]] = []
    try:
        await create_load_balancers(kube, haproxy)
        await populate(kube, lay, args)
        await create_pools(kube, lay.pools, args.concurrency)
        for pair in range(args.pairs):
            for label, tree, python in (("A", args.a, args.python_a), ("B", args.b, args.python_b)):
                operator = OperatorProcess(cluster.kubeconfig, args.dir / "logs" / f"{label}{pair}",
                                           extra_args=("--http-allowed-cidrs", "127.0.0.0/8"), python=python)
                os.environ["PYTHONPATH"] = f"{tree.resolve()}:{REPO / 'devtools'}"
                try:
                    await asyncio.to_thread(operator.start, False)
                    await asyncio.to_thread(operator.wait_ready, 120.0)
                    await wait_pools_ready(kube, lay.pools, args.pool_size, 120)
                    await asyncio.sleep(args.settle)
                    result = await flips(kube, operator, haproxy, lay, args, f"{label}{pair}")
                finally:
                    await asyncio.to_thread(operator.stop)
                rows.append({"label": label, "pair": pair, "load": os.getloadavg()[0], **result})
    finally:
        await kube.close()
    return rows


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["| run | tree | transitions | operator CPU s | s per 1,000 | reconciles | HAProxy actions | load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        tree = args.a if row["label"] == "A" else args.b
        python = args.python_a if row["label"] == "A" else args.python_b
        tree = f"{tree} ({python})" if args.python_a != args.python_b else tree
        lines.append(f"| {row['label']}{row['pair']} | {tree} | {row['transitions']} | {row['cpu']:.2f} | "
                     f"{row['per_1000']:.2f} | {row['reconciles']:.0f} | {row['backend_actions']:.0f} | "
                     f"{row['load']:.1f} |")
    med = {label: statistics.median(r["per_1000"] for r in rows if r["label"] == label) for label in ("A", "B")}
    lines += ["", f"median CPU per 1,000 transitions at {SMALL} pools: A {med['A']:.2f} s, B {med['B']:.2f} s, "
              f"B/A {med['B'] / med['A']:.2f} ({args.pairs} pairs, {args.transitions} flips at {args.rate:g}/s)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--a", type=Path, required=True, help="operator source folder of run A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="operator source folder of run B")
    parser.add_argument("--python-a", default=None, help="the interpreter of run A (its own packages); default: "
                        "the image's (Debian's python3 with the runtime lock, shipped_python)")
    parser.add_argument("--python-b", default=None, help="the interpreter of run B; default: the image's")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pk-cpu-ab"), help="control plane folder (wiped)")
    parser.add_argument("--pods", type=int, default=2_000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=5)
    parser.add_argument("--transitions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle after every pool is Ready")
    parser.add_argument("--py-spy", default=None, help="path of py-spy: profile each run's flips")
    args = parser.parse_args(argv)
    args.python_a = args.python_a or shipped_python()
    args.python_b = args.python_b or shipped_python()
    args.pools, args.handlers = SMALL, 0
    args.dir = args.dir.resolve()
    started = time.monotonic()
    rows = on_fresh_cluster(args, layout(args), lambda cluster, haproxy: run_pairs(cluster, haproxy, args))
    print(render(rows, args))
    log(f"whole run {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
