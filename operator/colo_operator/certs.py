"""Certificates for mutual TLS between the operator and the agents (the `cryptography` library).

One cluster CA, kept in a Secret in the operator's own namespace, signs:

- one certificate per ColoVM, shared by its two agents, named
  `spiffe://colo.dev/ns/<ns>/colovm/<name>` (`colo_agent.api.identity`);
- the operator's own client certificate, `spiffe://colo.dev/operator`,
  issued at start and kept in memory and a private temporary directory.

Why one cluster CA and not one per VM: the CA key then lives in exactly one
Secret, in a namespace only the operator reads; a VM's namespace receives
only its leaf key and the CA's public certificate. Agents check the URI
name as well as the chain, so a certificate of another VM is refused just
as a per-VM CA would refuse it, and the operator needs one client
certificate instead of one per VM. A per-VM CA would put a CA key in every
VM namespace (or many CA keys in the operator's), for no gain in isolation.

Leaf certificates are short-lived and renewed when a third of their life
is left; the agents read the mounted files again at every pairing. The
trust that every directory carries (`ca.crt`) is a bundle: during a CA
rotation it holds the old and the new CA, so certificates of either
verify while they are replaced (`pki`, docs/security.md).
Keys are ECDSA P-256: cheap handshakes, and the bulk cipher (AES-GCM) is
what the stream pays for, not the signature.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=30)
# Renew when less than this fraction of a certificate's life is left.
RENEW_FRACTION = 1 / 3
# Clocks of nodes differ a little; a certificate is valid from slightly before its issue.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_ca(now: dt.datetime, common_name: str = "colo-operator CA") -> KeyPair:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _pem(key))


def issue(ca: KeyPair, uri: str, now: dt.datetime, lifetime: dt.timedelta = LEAF_LIFETIME) -> KeyPair:
    """A leaf certificate naming `uri`, good as TLS client and server."""
    ca_cert = ca.cert
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an ECDSA key")
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uri.rsplit("/", 1)[-1][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _pem(key))


def bundle(*pems: bytes) -> bytes:
    """One PEM bundle of every distinct certificate in `pems`, in order of first appearance.

    During a CA rotation the trust bundle holds the old and the new CA; the
    order is kept so that the bundle of an unchanged set is byte for byte the same.
    """
    seen: set[bytes] = set()
    out: list[bytes] = []
    for pem in pems:
        for cert in x509.load_pem_x509_certificates(pem) if pem.strip() else ():
            der = cert.public_bytes(serialization.Encoding.DER)
            if der not in seen:
                seen.add(der)
                out.append(cert.public_bytes(serialization.Encoding.PEM))
    return b"".join(out)


def renewal_time(cert_pem: bytes) -> dt.datetime:
    """When a third of the certificate's life is left (`needs_renewal` turns true)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return end - (end - start) * RENEW_FRACTION


def uri_of(cert_pem: bytes) -> str | None:
    """The URI name of a certificate, or None."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def needs_renewal(cert_pem: bytes, now: dt.datetime, ca: KeyPair | None = None) -> bool:
    """True when the certificate is unreadable, past two thirds of its life,
    or (given `ca`) not signed by that CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return True
    if now >= renewal_time(cert_pem):
        return True
    if ca is None:
        return False
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return True
    return False


def client_context(directory: Path) -> ssl.SSLContext:
    """The operator's TLS 1.3 client context for the agents' control API: its own
    certificate from `directory` (tls.crt, tls.key, ca.crt), the CA bundle as the only trust.
    Agents are reached by pod address, so the name in their certificate is checked
    by the client (`agent_client`), not against a host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(directory / "tls.crt", directory / "tls.key")
    ctx.load_verify_locations(cafile=str(directory / "ca.crt"))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def write_dir(directory: Path, ca: KeyPair, leaf: KeyPair) -> Path:
    """A certificate directory in the layout of a kubernetes.io/tls Secret."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(leaf.cert_pem)
    key = directory / "tls.key"
    key.touch(mode=0o600)
    key.write_bytes(leaf.key_pem)
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    return directory
