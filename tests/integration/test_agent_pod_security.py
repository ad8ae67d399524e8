"""Agent pods against the Pod Security admission of a real API server.

A namespace labelled ``pod-security.kubernetes.io/enforce: restricted``
admits the agent pod of a tcg guest and of a kvm guest whose /dev/kvm comes
from a device plugin, and refuses the hostPath kvm pod (which needs the
``privileged`` standard), as ``manifests.security_context`` documents. The
memory-backed emptyDir, the secret volume and the rest of the pod shape pass
the API server's own validation on the way.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from cluster import ControlPlane

from colo_operator.config import KvmMode, OperatorConfig
from colo_operator.decide import CreatePod
from colo_operator.manifests import agent_pod, service_account
from colo_operator.placement import Place
from colo_operator.snapshot import VMView
from colo_operator.spec import ColoVMSpec

PRIMARY = CreatePod(name="vm-0", serial=0, role="primary", peer=None, place=Place(("n1",), (), ()))


@pytest.fixture
def namespace(kube_apiserver: ControlPlane) -> Iterator[tuple[kubernetes.client.CoreV1Api, str]]:
    api = kubernetes.config.new_client_from_config(config_file=str(kube_apiserver.kubeconfig))
    core = kubernetes.client.CoreV1Api(api)
    name = f"restricted-{uuid.uuid4().hex[:6]}"
    core.create_namespace(
        {
            "metadata": {
                "name": name,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            }
        }
    )
    try:
        yield core, name
    finally:
        core.delete_namespace(name)
        api.close()


def _pod(namespace: str, spec: dict[str, Any], config: OperatorConfig) -> dict[str, Any]:
    view = VMView(
        namespace=namespace, name="vm", uid=str(uuid.uuid4()), generation=1,
        spec=ColoVMSpec.from_dict(spec), status={},
    )  # fmt: skip
    return agent_pod(view, config, PRIMARY)


def _create(core: kubernetes.client.CoreV1Api, namespace: str, pod: dict[str, Any]) -> str | None:
    """None when admitted, else the API server's reason."""
    pod = {**pod, "metadata": {k: v for k, v in pod["metadata"].items() if k != "ownerReferences"}}
    try:
        core.create_namespaced_pod(namespace, pod, dry_run="All")
    except kubernetes.client.ApiException as exc:
        return str(exc.body)
    return None


def test_the_restricted_standard_admits_tcg_and_device_plugin_kvm_agents_only(
    namespace: tuple[kubernetes.client.CoreV1Api, str],
) -> None:
    core, ns = namespace
    view = VMView(namespace=ns, name="vm", uid="u", generation=1, spec=ColoVMSpec.from_dict({}), status={})
    core.create_namespaced_service_account(ns, service_account(view))

    tcg = _pod(ns, {"guest": {"accel": "tcg", "memory": "128Mi"}}, OperatorConfig())
    assert _create(core, ns, tcg) is None
    by_plugin = _pod(ns, {"guest": {"accel": "kvm"}}, OperatorConfig(kvm_group=36))
    assert _create(core, ns, by_plugin) is None

    by_path = _pod(ns, {"guest": {"accel": "kvm"}}, OperatorConfig(kvm_mode=KvmMode.HOST_PATH))
    refused = _create(core, ns, by_path)
    assert refused is not None and "violates PodSecurity" in refused and "hostPath" in refused

    # The namespace really enforces: the same tcg pod without its security context is refused.
    bare = _pod(ns, {"guest": {"accel": "tcg"}}, OperatorConfig())
    del bare["spec"]["securityContext"]
    del bare["spec"]["containers"][0]["securityContext"]
    refused = _create(core, ns, bare)
    assert refused is not None and "violates PodSecurity" in refused
