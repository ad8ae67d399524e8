"""Fixtures of the end-to-end suite, the same for both drivers.

``--e2e-driver local`` (default) starts a :class:`cluster.LocalCluster`
once per session: etcd, kube-apiserver, controller-manager and scheduler
on this machine and three process nodes. ``--e2e-driver kind`` creates a
kind cluster of the offline node image (control plane and three workers,
``kindhost``), loads ``colo-operator:dev`` into it and installs the chart
with that image; node loss is ``docker kill``. ``--e2e-driver existing`` uses
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
from support.qemu import cached_qemu_tools

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
    if driver == "kind":
        yield from _kind_cluster(request)
        return
    binaries_or_skip()
    if os.geteuid() != 0:
        pytest.skip("the local e2e driver needs root (network namespaces)")
    # The qemu backend's QEMU on the pods' PATH, where the agent image has it.
    qemu = cached_qemu_tools()
    extra_path = [str(Path(qemu.binaries.qemu).parent)] if qemu is not None else []
    local = LocalCluster(3, keep_logs=request.config.getoption("--e2e-keep-logs"), extra_path=extra_path)
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


KIND_IMAGE = "colo-operator:dev"


def _kind_cluster(request: pytest.FixtureRequest) -> Iterator[ClusterHandle]:
    from dockerhost import engine
    from kindhost import build as kind_build
    from kindhost.cluster import KindCluster

    def unavailable(message: str) -> None:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    binaries_or_skip()
    if os.geteuid() != 0:
        pytest.skip("the kind e2e driver needs root (host routes)")
    eng = engine.current()
    if eng is None:
        unavailable("no Docker engine: run bash .ci/docker")
        return
    if eng.docker("image", "inspect", kind_build.node_image(), check=False).returncode != 0:
        unavailable(f"no node image {kind_build.node_image()}: run bash .ci/kind")
    if eng.docker("image", "inspect", KIND_IMAGE, check=False).returncode != 0:
        unavailable(f"no image {KIND_IMAGE}: run bash .ci/docker")
    kind = KindCluster(eng, workers=3)
    try:
        created = kind.start()
        loaded = kind.load_image(KIND_IMAGE)
        print(f"\nkind: cluster of 1 control plane + 3 workers created in {created:.1f}s, "
              f"{KIND_IMAGE} loaded in {loaded:.1f}s")  # fmt: skip
        repository, tag = KIND_IMAGE.rsplit(":", 1)
        values = ("--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
                  "--set", "image.pullPolicy=Never")  # fmt: skip
        yield ClusterHandle("kind", kind.kubeconfig, kind.worker_names(), kind=kind, chart_values=values)
    finally:
        if any_test_failed(request.session) or request.config.getoption("--e2e-keep-logs"):
            logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"colo-kind-logs-{os.getpid()}"
            kind.export_logs(logs)
            print(f"\nkind: cluster logs in {logs}")
        kind.stop()
