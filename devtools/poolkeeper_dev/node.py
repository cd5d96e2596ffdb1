"""A real node beside the local control plane, as Kubernetes' `hack/local-up-cluster.sh` makes one.

containerd + runc run the pods, CNI `bridge` + `host-local` give them addresses in 198.18.0.0/16
on the bridge `pk0` (the node itself is 198.18.0.1 there), kube-proxy programs Services in
198.19.0.0/16 with iptables, the kubelet and kube-scheduler come from the same Kubernetes module
as the API server. Nothing leaves this machine: no masquerading, no route but the bridge's own.

This machine kind has cgroup v1 and no systemd, so the kubelet uses the cgroupfs driver with
`failCgroupV1: false`, under a cgroup root of its own that `down` removes again.

Every piece of host state `up` creates is recorded in the cluster's state file (the bridge, the
cgroup root, the sysctl it changed, the sandboxes' network namespaces); `teardown` undoes exactly
that, so `down` leaves the machine as it found it, and a stale node left by a killed session is
cleaned before a new one starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poolkeeper_dev.pki import KUBERNETES_SERVICE_IP, NODE_IP, NODE_NAME, Pki

BRIDGE = "pk0"
POD_CIDR = "198.18.0.0/16"
SERVICE_CIDR = "198.19.0.0/16"
CGROUP_ROOT = "poolkeeper-node"
CGROUP_V1 = Path("/sys/fs/cgroup")
OWNER_FILE = Path("/run/poolkeeper-devcluster-node")
FORWARD_SYSCTL = Path("/proc/sys/net/ipv4/ip_forward")
BRIDGE_NF_SYSCTL = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"
NODE_COMPONENTS = ("kube-scheduler", "containerd", "kubelet", "kube-proxy")

if TYPE_CHECKING:
    from poolkeeper_dev.containerd import Containerd, ContainerdConfig

__all__ = ["BRIDGE", "KUBERNETES_SERVICE_IP", "NODE_COMPONENTS", "NODE_IP", "NODE_NAME", "POD_CIDR",
           "SERVICE_CIDR", "NodeError", "NodeLayout"]


class NodeError(RuntimeError):
    """The node could not be set up; the message says which step and why."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()[-600:]}")
    return proc


class NodeLayout:
    """Where a node's files live under the cluster folder, and the config files for each component."""

    def __init__(self, root: Path, pki: Pki, ports: dict[str, int]) -> None:
        self.root = root / "node"
        self.pki = pki
        self.ports = ports

    # ----- paths
    @property
    def containerd_address(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    def kubeconfig(self, component: str) -> Path:
        return self.root / f"{component}.kubeconfig"

    # ----- configuration
    def write_configs(self, server: str) -> None:
        for sub in ("containerd", "cni/net.d", "cni/ipam", "kubelet", "logs/pods"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for component in ("kubelet", "kube-proxy", "kube-scheduler"):
            cert, key = self.pki.client(component)
            self.kubeconfig(component).write_text(json.dumps(kubeconfig(server, self.pki.ca_cert, cert, key)))
        (self.cni_conf_dir / "10-poolkeeper.conflist").write_text(json.dumps(self.cni_config(), indent=2))
        (self.root / "kubelet.yaml").write_text(json.dumps(self.kubelet_config(), indent=2))
        (self.root / "kube-proxy.yaml").write_text(json.dumps(self.proxy_config(), indent=2))

    def containerd(self) -> Containerd:
        """The node's containerd: started, stopped and cleaned up by the same class the image tests use."""
        from poolkeeper_dev.containerd import Containerd

        return Containerd(self.containerd_config(), self.root / "containerd")

    def containerd_config(self) -> ContainerdConfig:
        from poolkeeper_dev.containerd import ContainerdConfig

        return ContainerdConfig(
            root=self.root / "containerd" / "root", state=self.root / "containerd" / "state",
            address=self.containerd_address, cri=True, cni_bin_dir=Path("/usr/lib/cni"),
            cni_conf_dir=self.cni_conf_dir, sandbox_image=SANDBOX_IMAGE,
            restrict_oom_score_adj=not can_lower_oom_score(),
        )

    def cni_config(self) -> dict[str, Any]:
        """One bridge network; pods get 198.18.1.1 and up, the node keeps 198.18.0.1 as their gateway."""
        return {
            "cniVersion": "0.4.0", "name": "poolkeeper",
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                "ipam": {
                    "type": "host-local", "dataDir": str(self.root / "cni" / "ipam"),
                    "ranges": [[{"subnet": POD_CIDR, "rangeStart": "198.18.1.1", "rangeEnd": "198.18.255.254",
                                 "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }],
        }

    def kubelet_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # cgroup v1 without systemd: the cgroupfs driver, a root of our own, v1 allowed explicitly.
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "cgroupRoot": f"/{CGROUP_ROOT}",
            "cgroupsPerQOS": True, "enforceNodeAllocatable": ["pods"], "failSwapOn": False,
            "address": NODE_IP, "port": self.ports["kubelet"], "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.ports["kubelet_healthz"],
            "tlsCertFile": str(self.pki.folder / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(self.pki.folder / "kubelet-serving.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.pki.ca_cert)}},
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.containerd_address}",
            "podLogsDir": str(self.root / "logs" / "pods"),
            "resolvConf": "/etc/resolv.conf", "clusterDNS": [], "maxPods": 250,
            "serializeImagePulls": False, "registerNode": True,
            # A shared test machine: evict only when truly out of room, never garbage-collect our images.
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "nodeStatusReportFrequency": "10s", "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s", "fileCheckFrequency": "10s", "volumeStatsAggPeriod": "0s",
            "localStorageCapacityIsolation": False, "protectKernelDefaults": False,
            "makeIPTablesUtilChains": False,
            "shutdownGracePeriod": "0s",
        }

    def kubelet_args(self) -> list[str]:
        return [
            f"--config={self.root / 'kubelet.yaml'}", f"--kubeconfig={self.kubeconfig('kubelet')}",
            f"--root-dir={self.kubelet_dir}", f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
            f"--cert-dir={self.root / 'kubelet-pki'}", "--v=1",
        ]

    def proxy_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE_NAME,
            "clientConnection": {"kubeconfig": str(self.kubeconfig("kube-proxy"))},
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{self.ports['proxy_healthz']}",
            "metricsBindAddress": f"127.0.0.1:{self.ports['proxy_metrics']}",
            # NodePorts only on the bridge address: no route_localnet, nothing on the outer interface.
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # Leave the machine's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0},
            "iptables": {"masqueradeAll": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        }

    def proxy_args(self) -> list[str]:
        return [f"--config={self.root / 'kube-proxy.yaml'}", "--v=1"]

    def scheduler_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig('kube-scheduler')}",
            f"--authentication-kubeconfig={self.kubeconfig('kube-scheduler')}",
            f"--authorization-kubeconfig={self.kubeconfig('kube-scheduler')}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={self.ports['scheduler']}",
            f"--cert-dir={self.root / 'scheduler-pki'}",
        ]


def node_owner() -> Path | None:
    """The cluster folder that last claimed this machine's node, if any."""
    try:
        return Path(OWNER_FILE.read_text().strip())
    except OSError:
        return None


def claim_node(root: Path) -> None:
    OWNER_FILE.write_text(str(root))


def release_node(root: Path) -> None:
    if node_owner() == root:
        OWNER_FILE.unlink(missing_ok=True)


def can_lower_oom_score() -> bool:
    """Whether we hold CAP_SYS_RESOURCE (bit 24), which a negative oom_score_adj needs."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def kubeconfig(server: str, ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    """A one-context kubeconfig for a client certificate (kubeconfig is YAML, and JSON is YAML)."""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "devcluster",
        "clusters": [{"name": "devcluster", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": "user"}}],
    }


# ----- host network and cgroups: each step records what it changed, teardown undoes only that


def prepare_host(record: dict[str, Any]) -> None:
    """The bridge with the node address, forwarding and bridge netfilter on, the kubelet's cgroup root."""
    # Called once this cluster holds the machine's node claim: a bridge still here is a dead node's
    # leftover (a killed session), so it is made anew and becomes ours to delete.
    _run("ip", "link", "del", BRIDGE, check=False)
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    record["bridge_created"] = True
    addresses = _run("ip", "-o", "-4", "addr", "show", "dev", BRIDGE).stdout
    if f" {NODE_IP}/" not in addresses:
        _run("ip", "addr", "add", f"{NODE_IP}/16", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    # Service addresses route to the bridge too: if kube-proxy has not programmed one yet, a packet
    # for it dies here instead of following the default route off the machine.
    _run("ip", "route", "replace", SERVICE_CIDR, "dev", BRIDGE)
    record.setdefault("sysctl", {})
    for sysctl in (FORWARD_SYSCTL, BRIDGE_NF_SYSCTL):
        if not sysctl.exists():
            raise NodeError(f"{sysctl} is missing: the kernel needs IP forwarding and bridge netfilter")
        old = sysctl.read_text().strip()
        if old != "1":
            record["sysctl"].setdefault(str(sysctl), old)
            sysctl.write_text("1")
    record["cgroups"] = []
    for controller in _cgroup_controllers():
        path = controller / CGROUP_ROOT
        path.mkdir(exist_ok=True)
        record["cgroups"].append(str(path))
    if (CGROUP_V1 / "cpuset" / CGROUP_ROOT).exists():
        # A new cpuset cgroup starts with no CPUs or memory nodes: inherit the parent's.
        for name in ("cpuset.cpus", "cpuset.mems"):
            child = CGROUP_V1 / "cpuset" / CGROUP_ROOT / name
            if not child.read_text().strip():
                child.write_text((CGROUP_V1 / "cpuset" / name).read_text())


def _cgroup_controllers() -> list[Path]:
    if not (CGROUP_V1 / "memory").is_dir():
        return []  # cgroup v2 (unified): the kubelet makes its own root under the one mount
    return sorted(p for p in CGROUP_V1.iterdir() if p.is_dir() and not p.is_symlink() and p.name != "unified")


def sandbox_netns(ctr: list[str]) -> list[str]:
    """Network-namespace files of the pod sandboxes containerd knows (to remove after a hard stop)."""
    proc = subprocess.run([*ctr, "containers", "list", "-q"], capture_output=True, text=True, check=False)
    found = []
    for cid in proc.stdout.split():
        info = subprocess.run([*ctr, "containers", "info", cid], capture_output=True, text=True, check=False)
        try:
            namespaces = json.loads(info.stdout)["Spec"]["linux"]["namespaces"]
        except (ValueError, KeyError, TypeError):
            continue
        found += [ns["path"] for ns in namespaces if ns.get("type") == "network" and ns.get("path")]
    return found


def kill_containers(ctr: list[str]) -> None:
    """SIGKILL every task containerd runs for the node and delete them (the kubelet is already gone)."""
    tasks = subprocess.run([*ctr, "tasks", "list", "-q"], capture_output=True, text=True, check=False).stdout.split()
    for task in tasks:
        subprocess.run([*ctr, "tasks", "kill", "-s", "SIGKILL", task], capture_output=True, check=False)
    for task in tasks:
        subprocess.run([*ctr, "tasks", "delete", "-f", task], capture_output=True, check=False)
    containers = subprocess.run([*ctr, "containers", "list", "-q"], capture_output=True, text=True,
                                check=False).stdout.split()
    for cid in containers:
        subprocess.run([*ctr, "containers", "delete", cid], capture_output=True, check=False)


def unmount_under(paths: Iterable[Path]) -> int:
    """Unmount every mount point below these folders, deepest first; return how many."""
    prefixes = [str(p.resolve()) + "/" for p in paths]
    mounts = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            point = line.split()[1].replace("\\040", " ")
            if any(point.startswith(prefix) or point + "/" == prefix for prefix in prefixes):
                mounts.append(point)
    for point in sorted(set(mounts), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return len(set(mounts))


def remove_kube_chains() -> None:
    """What `kube-proxy --cleanup` leaves: the kubelet's KUBE-FIREWALL and its jumps, v4 and v6.

    Every KUBE-* chain on this machine is the node's (one node per machine)."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            rules = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True, check=False).stdout
            for rule in rules.splitlines():
                words = rule.split()
                if words[:1] == ["-A"] and "-j" in words and words[words.index("-j") + 1].startswith("KUBE-"):
                    subprocess.run([tool, "-t", table, "-D", *words[1:]], capture_output=True, check=False)
            for rule in rules.splitlines():
                if rule.startswith("-N KUBE-"):
                    chain = rule.split()[1]
                    subprocess.run([tool, "-t", table, "-F", chain], capture_output=True, check=False)
                    subprocess.run([tool, "-t", table, "-X", chain], capture_output=True, check=False)


def remove_netns(paths: Iterable[str]) -> None:
    for path in paths:
        subprocess.run(["umount", path], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            os.unlink(path)


def remove_cgroups(paths: Iterable[str]) -> None:
    """rmdir a cgroup tree bottom-up (cgroupfs files vanish with their folder)."""
    for top in paths:
        root = Path(top)
        if not root.is_dir():
            continue
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


def restore_host(record: dict[str, Any]) -> None:
    """Undo prepare_host: the bridge if we made it, the sysctls we changed, our cgroup root."""
    remove_cgroups(record.get("cgroups", []))
    _run("ip", "route", "del", SERVICE_CIDR, "dev", BRIDGE, check=False)
    if record.get("bridge_created"):
        _run("ip", "link", "del", BRIDGE, check=False)
    for path, old in record.get("sysctl", {}).items():
        with contextlib.suppress(OSError):
            Path(path).write_text(old)
