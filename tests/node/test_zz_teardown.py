"""`down` undoes everything `up --node` did on this machine, and `up --node` comes back from it.

Named to run last in this folder: it stops the session's node and starts it again."""

from __future__ import annotations

import subprocess
from pathlib import Path

from poolkeeper_dev import Cluster
from poolkeeper_dev.node import BRIDGE, CGROUP_ROOT, NODE_NAME
from support.kube import wait_for


def host_traces(root: Path) -> dict[str, object]:
    """What a node leaves on the host while it runs: each must be gone after down."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(root))]
    chains = [line for tool in ("iptables", "ip6tables") for table in ("nat", "filter", "mangle")
              for line in subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True,
                                         check=True).stdout.splitlines() if "KUBE-" in line]
    bridge = subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True, check=False).returncode == 0
    processes = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True, check=False).stdout.split()
    shims = subprocess.run(["pgrep", "-f", "containerd-shim"], capture_output=True, text=True, check=False)
    return {"mounts": mounts, "iptables": chains, "bridge": bridge, "processes": processes,
            "cgroup": Path("/sys/fs/cgroup/memory", CGROUP_ROOT).exists(), "shims": shims.stdout.split()}


def test_down_leaves_nothing_behind_and_up_comes_back(node_cluster: Cluster) -> None:
    running = wait_for(lambda: (t := host_traces(node_cluster.root))["iptables"] and t, 30, "kube-proxy's rules")
    assert running["bridge"] and running["mounts"] and running["cgroup"] and running["processes"]

    changed_sysctls = dict(node_cluster.state["host"].get("sysctl", {}))
    stopped = node_cluster.down()
    assert {"kubelet", "containerd", "kube-proxy", "kube-scheduler", "kube-apiserver", "etcd"} <= set(stopped)
    after = host_traces(node_cluster.root)
    assert after == {"mounts": [], "iptables": [], "bridge": False, "processes": [], "cgroup": False, "shims": []}
    for path, before in changed_sysctls.items():
        assert Path(path).read_text().strip() == before, f"{path} not restored"

    back = Cluster(node_cluster.root).up(node=True)
    assert back.kubectl_run("get", "node", NODE_NAME, "-o",
                            "jsonpath={.status.conditions[?(@.type=='Ready')].status}").stdout == "True"
