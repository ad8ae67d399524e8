"""What the benchmarks on the local cluster share: the e2e harness on the path, and the chart
installed on a started cluster."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "tests", ROOT / "tests" / "e2e"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from cluster import LocalCluster  # noqa: E402
from cluster.testing import ClusterHandle  # noqa: E402
from operator_e2e import CHART, RELEASE, RELEASE_NAMESPACE, helm  # noqa: E402


def with_operator(local: LocalCluster, namespace: str, *helm_args: str) -> ClusterHandle:
    """The chart installed on `local` (with `helm_args`) and `namespace` created for ColoVMs."""
    cluster = ClusterHandle("local", local.kubeconfig, local.node_names, local)
    result = helm(cluster, "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
                  "--create-namespace", "--wait", "--timeout", "300s", *helm_args)
    if result.returncode != 0:
        raise SystemExit(result.stdout + result.stderr)
    cluster.kubectl("create", "namespace", namespace, check=False)
    return cluster
