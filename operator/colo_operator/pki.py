"""The operator's side of mutual TLS: the cluster CA's Secret, each VM's certificate, its own.

Pure issuance lives in `certs`; this module reads and writes the Secrets
(through `Kube`) and builds the operator's client context. With a
cert-manager issuer configured, the operator writes a Certificate per VM
instead and cert-manager keeps the Secret; the operator's own certificate
then comes from the directory the chart mounts.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import ssl
import tempfile
from pathlib import Path

from colo_agent.api.identity import OPERATOR_IDENTITY, vm_identity

from . import certs, manifests
from .config import OperatorConfig
from .kube import Kube
from .snapshot import VMView

log = logging.getLogger(__name__)

CA_SECRET = "colo-operator-ca"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _data(secret: dict[str, object] | None, key: str) -> bytes | None:
    data = (secret or {}).get("data")
    value = data.get(key) if isinstance(data, dict) else None
    return base64.b64decode(value) if isinstance(value, str) else None


def ca_secret(namespace: str, ca: certs.KeyPair) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": CA_SECRET,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "colo-operator", "app.kubernetes.io/component": "ca"},
        },
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": base64.b64encode(ca.cert_pem).decode(),
            "tls.key": base64.b64encode(ca.key_pem).decode(),
        },
    }


async def load_or_create_ca(kube: Kube, namespace: str) -> certs.KeyPair:
    """The cluster CA from its Secret in the operator's namespace; made on first start.

    Creating is the lock between operator replicas: the loser reads the winner's CA.
    """
    for _ in range(2):
        secret = await kube.get("Secret", namespace, CA_SECRET)
        cert, key = _data(secret, "tls.crt"), _data(secret, "tls.key")
        if cert and key:
            return certs.KeyPair(cert, key)
        if secret is None:
            ca = certs.new_ca(_now())
            if await kube.create(ca_secret(namespace, ca)):
                log.info("created the cluster CA in Secret %s/%s", namespace, CA_SECRET)
                return ca
    raise RuntimeError(f"Secret {namespace}/{CA_SECRET} exists but holds no tls.crt and tls.key")


def operator_context(config: OperatorConfig, ca: certs.KeyPair | None) -> ssl.SSLContext:
    """The operator's client context: from the mounted directory (cert-manager) or a
    certificate it issues itself from the CA, kept in a private temporary directory."""
    if config.tls_dir:
        return certs.client_context(Path(config.tls_dir))
    if ca is None:
        raise RuntimeError("no CA and no COLO_TLS_DIR: the operator has no client certificate")
    leaf = certs.issue(ca, OPERATOR_IDENTITY, _now())
    with tempfile.TemporaryDirectory(prefix="colo-operator-tls-") as tmp:
        return certs.client_context(certs.write_dir(Path(tmp), ca, leaf))


async def ensure_vm_tls(kube: Kube, config: OperatorConfig, ca: certs.KeyPair | None, vm: VMView) -> bool:
    """Make sure the VM's certificate Secret exists and is fresh; True if it was (re)issued.

    A renewed Secret reaches the running agents through their volume, and
    they use it from their next pairing on.
    """
    issuer = config.issuer_ref
    if issuer is not None:
        return await kube.create(manifests.certificate(vm, issuer))
    assert ca is not None
    name = manifests.Names(vm.name).tls_secret
    secret = await kube.get("Secret", vm.namespace, name)
    cert = _data(secret, "tls.crt")
    now = _now()
    if cert is not None and not certs.needs_renewal(cert, now, ca) and certs.uri_of(cert) == _uri(vm):
        return False
    leaf = certs.issue(ca, _uri(vm), now)
    body = manifests.tls_secret(vm, leaf.cert_pem, leaf.key_pem, ca.cert_pem)
    if secret is None:
        created = await kube.create(body)
        if created:
            log.info("issued the agent certificate of %s/%s", vm.namespace, vm.name)
            return True
    await kube.patch("Secret", vm.namespace, name, {"data": body["data"]})
    log.info("renewed the agent certificate of %s/%s", vm.namespace, vm.name)
    return True


def _uri(vm: VMView) -> str:
    return vm_identity(vm.namespace, vm.name)
