"""Fixtures of the end-to-end suite, the same for both drivers.

``--e2e-driver local`` (default) starts a :class:`cluster.LocalCluster`
once per session: etcd, kube-apiserver, controller-manager and scheduler
on this machine and three process nodes. ``--e2e-driver existing`` uses
the cluster of ``$KUBECONFIG`` (kind, see README.md); fault injection is
then up to the test's environment, and the handles skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from cluster import LocalCluster
from cluster.testing import ClusterHandle, any_test_failed, binaries_or_skip

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterHandle]:
    driver = request.config.getoption("--e2e-driver")
    if driver == "existing":
        path = os.environ.get("KUBECONFIG")
        if not path:
            pytest.skip("--e2e-driver existing needs $KUBECONFIG")
        api = kubernetes.config.new_client_from_config(config_file=path)
        listing = api.sanitize_for_serialization(kubernetes.client.CoreV1Api(api).list_node())
        api.close()
        workers = [
            str(n["metadata"]["name"])
            for n in listing.get("items", [])
            if "node-role.kubernetes.io/control-plane" not in (n["metadata"].get("labels") or {})
        ]
        yield ClusterHandle(driver, Path(path), workers)
        return
    binaries_or_skip()
    if os.geteuid() != 0:
        pytest.skip("the local e2e driver needs root (network namespaces)")
    local = LocalCluster(3, keep_logs=request.config.getoption("--e2e-keep-logs"))
    local.start()
    try:
        yield ClusterHandle(driver, local.kubeconfig, local.node_names, local)
    finally:
        local.stop(failed=any_test_failed(request.session))


@pytest.fixture(scope="session")
def kube_api(cluster: ClusterHandle) -> Iterator[kubernetes.client.ApiClient]:
    """A ``kubernetes`` ApiClient configured for the cluster under test (admin)."""
    api = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()
