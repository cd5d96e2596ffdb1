"""Development tools: a real local cluster, HAProxy and traffic helpers, images, the demo.

Used by `poolkeeper devcluster`, the test fixtures and the demo, so all three run the same code.
"""

from poolkeeper_dev.build import KUBERNETES_VERSION, ensure_binaries
from poolkeeper_dev.cluster import Cluster, ClusterError

__all__ = ["KUBERNETES_VERSION", "Cluster", "ClusterError", "ensure_binaries"]
