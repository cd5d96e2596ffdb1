"""A real local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kubectl).

Used by `poolkeeper devcluster`, the test fixtures and the demo, so all three run the same code.
"""

from poolkeeper.devcluster.build import KUBERNETES_VERSION, ensure_binaries
from poolkeeper.devcluster.cluster import Cluster, ClusterError

__all__ = ["KUBERNETES_VERSION", "Cluster", "ClusterError", "ensure_binaries"]
