"""The operator's side of mutual TLS: the cluster CA's Secret, each VM's certificate, its own.

Pure issuance lives in `certs`; this module reads and writes the Secrets
(through `Kube`) and keeps the operator's client credentials valid. With a
cert-manager issuer configured, the operator writes a Certificate per VM
instead and cert-manager keeps the Secret; the operator's own certificate
then comes from the directory the chart mounts, read again when it changes.

A CA rotation is three edits of the CA Secret, each picked up by the
running operator (docs/security.md): stage the new CA in `ca.crt`, make it
the signer, retire the old one from `ca.crt`. Each VM Secret carries the
bundle of the moment, so both ends of every connection trust both CAs for
as long as certificates of both are in use.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ClusterCa:
    """The cluster CA as its Secret holds it: the CA that signs, and the bundle everyone trusts.

    `tls.crt`/`tls.key` are the signing CA. `ca.crt`, when present, lists
    CAs trusted besides it: the other half of a rotation's overlap (the new
    CA, staged before it signs; or the old one, kept until every certificate
    it signed is replaced). The signer is always trusted.
    """

    signer: certs.KeyPair
    trust_pem: bytes

    @classmethod
    def of(cls, signer: certs.KeyPair, extra_trust: bytes = b"") -> ClusterCa:
        return cls(signer, certs.bundle(signer.cert_pem, extra_trust))


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


def _read_ca(secret: dict[str, object] | None) -> ClusterCa | None:
    cert, key = _data(secret, "tls.crt"), _data(secret, "tls.key")
    if not (cert and key):
        return None
    try:
        return ClusterCa.of(certs.KeyPair(cert, key), _data(secret, "ca.crt") or b"")
    except ValueError as exc:
        raise RuntimeError(f"Secret {CA_SECRET}: ca.crt is not a PEM bundle of certificates: {exc}") from exc


async def load_ca(kube: Kube, namespace: str) -> ClusterCa | None:
    """The cluster CA as its Secret holds it now (None: no usable Secret)."""
    return _read_ca(await kube.get("Secret", namespace, CA_SECRET))


async def load_or_create_ca(kube: Kube, namespace: str) -> ClusterCa:
    """The cluster CA from its Secret in the operator's namespace; made on first start.

    Creating is the lock between operator replicas: the loser reads the winner's CA.
    """
    for _ in range(2):
        secret = await kube.get("Secret", namespace, CA_SECRET)
        ca = _read_ca(secret)
        if ca is not None:
            return ca
        if secret is None:
            signer = certs.new_ca(_now())
            if await kube.create(ca_secret(namespace, signer)):
                log.info("created the cluster CA in Secret %s/%s", namespace, CA_SECRET)
                return ClusterCa.of(signer)
    raise RuntimeError(f"Secret {namespace}/{CA_SECRET} exists but holds no tls.crt and tls.key")


class OperatorCredentials:
    """The operator's client certificate for the agents' control API, kept valid.

    Issued by the operator itself from the cluster CA: issued again when a
    third of its life is left or when the CA that signs changed, and trusting
    the CA bundle of the moment. From a mounted directory (cert-manager
    renews it): read again when its files change. `context()` is cheap and
    asked for at every call, so renewal needs no restart.
    """

    def __init__(
        self, config: OperatorConfig, ca: ClusterCa | None, clock: Callable[[], dt.datetime] = _now
    ) -> None:
        self._directory = Path(config.tls_dir) if config.tls_dir else None
        if self._directory is None and ca is None:
            raise RuntimeError("no CA and no COLO_TLS_DIR: the operator has no client certificate")
        self._ca = ca
        self._clock = clock
        self._leaf: certs.KeyPair | None = None
        self._stamp: tuple[int, ...] = ()
        self._renew_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._context = self._build()

    @property
    def leaf_pem(self) -> bytes:
        """The certificate the operator presents now."""
        return self._leaf.cert_pem if self._leaf is not None else b""

    def update_ca(self, ca: ClusterCa) -> None:
        """The CA Secret changed: trust its bundle, and issue again if the signer changed."""
        if self._directory is not None or ca == self._ca:
            return
        reissue = self._ca is None or ca.signer != self._ca.signer
        self._ca = ca
        self._context = self._build(reissue=reissue)

    def context(self) -> ssl.SSLContext:
        if self._directory is not None:
            stamp = self._files_stamp()
            if stamp != self._stamp:
                try:
                    self._context = self._build()
                    log.info("the operator's certificate in %s changed", self._directory)
                except (OSError, ssl.SSLError, ValueError) as exc:  # mid-update: keep the last good one
                    log.warning("cannot reload the operator's certificate from %s: %s", self._directory, exc)
        elif self._clock() >= self._renew_at:
            self._context = self._build(reissue=True)
            log.info("renewed the operator's client certificate")
        return self._context

    def _files_stamp(self) -> tuple[int, ...]:
        assert self._directory is not None
        try:
            stats = [(self._directory / f).stat() for f in ("tls.crt", "tls.key", "ca.crt")]
        except OSError:
            return self._stamp
        # Inode and mtime: the kubelet's update writes new files behind the symlinks.
        return tuple(x for st in stats for x in (st.st_ino, st.st_mtime_ns, st.st_size))

    def _build(self, *, reissue: bool = True) -> ssl.SSLContext:
        if self._directory is not None:
            self._stamp = self._files_stamp()
            self._leaf = certs.KeyPair((self._directory / "tls.crt").read_bytes(), b"")
            return certs.client_context(self._directory)
        assert self._ca is not None
        if reissue or self._leaf is None:
            self._leaf = certs.issue(self._ca.signer, OPERATOR_IDENTITY, self._clock())
            self._renew_at = certs.renewal_time(self._leaf.cert_pem)
        with tempfile.TemporaryDirectory(prefix="colo-operator-tls-") as tmp:
            directory = certs.write_dir(Path(tmp), self._ca.signer, self._leaf)
            (directory / "ca.crt").write_bytes(self._ca.trust_pem)
            return certs.client_context(directory)


async def ensure_vm_tls(kube: Kube, config: OperatorConfig, ca: ClusterCa | None, vm: VMView) -> bool:
    """Make sure the VM's certificate Secret exists, is fresh and carries the current
    trust bundle; True if anything in it changed.

    A renewed Secret reaches the running agents through their volume, and
    they use it from their next pairing on. A new bundle alone (a CA rotation
    staged or retired) changes only `ca.crt`: the leaf stays.
    """
    issuer = config.issuer_ref
    if issuer is not None:
        return await kube.create(manifests.certificate(vm, issuer))
    assert ca is not None
    name = manifests.Names(vm.name).tls_secret
    secret = await kube.get("Secret", vm.namespace, name)
    cert = _data(secret, "tls.crt")
    now = _now()
    if (
        cert is not None
        and not certs.needs_renewal(cert, now, ca.signer)
        and certs.uri_of(cert) == _uri(vm)
    ):
        if _data(secret, "ca.crt") == ca.trust_pem:
            return False
        await kube.patch("Secret", vm.namespace, name, {"data": {"ca.crt": _b64(ca.trust_pem)}})
        log.info("updated the CA bundle of %s/%s", vm.namespace, vm.name)
        return True
    leaf = certs.issue(ca.signer, _uri(vm), now)
    body = manifests.tls_secret(vm, leaf.cert_pem, leaf.key_pem, ca.trust_pem)
    if secret is None:
        created = await kube.create(body)
        if created:
            log.info("issued the agent certificate of %s/%s", vm.namespace, vm.name)
            return True
    await kube.patch("Secret", vm.namespace, name, {"data": body["data"]})
    log.info("renewed the agent certificate of %s/%s", vm.namespace, vm.name)
    return True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _uri(vm: VMView) -> str:
    return vm_identity(vm.namespace, vm.name)
