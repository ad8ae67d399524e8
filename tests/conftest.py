"""Options and fixtures shared by every test directory.

The local cluster harness lives in ``tests/e2e/cluster`` (package
``cluster``); it is put on ``sys.path`` here so that integration tests can
use a real API server through the ``kube_apiserver`` fixture as well.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

from cluster import ControlPlane
from cluster.testing import any_test_failed, binaries_or_skip, mark_failed

# Hypothesis tests assert what each example produces, not how fast: on a shared,
# loaded machine one example may well take longer than the default 200 ms deadline.
settings.register_profile("colo", deadline=None)
settings.load_profile("colo")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("colo-e2e", "end-to-end cluster")
    group.addoption(
        "--e2e-driver",
        choices=("local", "kind", "existing"),
        default=os.environ.get("COLO_E2E_DRIVER", "local"),
        help="local: start etcd, the control plane and process nodes here (default); "
        "kind: create a kind cluster of the offline node image (bash .ci/kind builds it) with "
        "colo-operator:dev loaded; existing: use the cluster of $KUBECONFIG",
    )
    group.addoption(
        "--e2e-keep-logs",
        action="store_true",
        help="keep the local cluster's logs even when every test passed",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, object]:
    report = yield
    # Session fixtures keep the cluster's logs when any test failed.
    if getattr(report, "failed", False):
        mark_failed(item.session)
    return report


@pytest.fixture(scope="session")
def kube_apiserver(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """A real etcd + kube-apiserver on loopback (no controllers, no nodes).

    ``.kubeconfig`` is an admin kubeconfig, ``.server`` the URL; ``.get(path)``
    does an admin GET.
    """
    binaries_or_skip()
    workdir = tmp_path_factory.mktemp("kube-apiserver")
    plane = ControlPlane(workdir, controllers=False).start()
    try:
        yield plane
    finally:
        plane.stop()
        if any_test_failed(request.session):
            print(f"\nkube-apiserver logs kept in {plane.log_dir}", file=sys.stderr)
