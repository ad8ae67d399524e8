"""The local end-to-end cluster: a real control plane and process nodes.

``LocalCluster`` is the whole thing; ``ControlPlane`` alone serves tests
that only need a real API server (the Lease arbiter's). Binaries come from
``build.ensure_built()`` (``bash .ci/e2e-tools``).
"""

from .cluster import ClusterError, LocalCluster, ProcessNode
from .controlplane import ControlPlane, ControlPlaneError

__all__ = ["ClusterError", "ControlPlane", "ControlPlaneError", "LocalCluster", "ProcessNode"]
