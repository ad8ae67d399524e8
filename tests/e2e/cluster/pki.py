"""Certificates and keys of a throw-away control plane, made with openssl.

One CA signs the API server's serving certificate and every client
certificate (admin, controller-manager, scheduler, one per node); the API
server trusts that CA for client authentication. The service-account key
pair signs bound tokens. ECDSA P-256 throughout: generating it takes
milliseconds, where RSA keys would slow every cluster start.
"""

from __future__ import annotations

import ipaddress
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_DAYS = "30"


class PkiError(RuntimeError):
    """openssl failed; the message carries its diagnostics."""


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _openssl(args: Sequence[str], cwd: Path) -> None:
    try:
        done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise PkiError("openssl is not installed (Debian package openssl)") from exc
    if done.returncode != 0:
        raise PkiError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


class CertificateAuthority:
    """A CA in ``directory`` that issues leaf certificates next to itself."""

    def __init__(self, directory: Path, name: str = "colo-e2e-ca") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cert = directory / "ca.crt"
        self.key = directory / "ca.key"
        _openssl(
            [
                "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-keyout", str(self.key), "-out", str(self.cert), "-days", _DAYS, "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            ],
            directory,
        )  # fmt: skip

    def issue(
        self,
        name: str,
        common_name: str,
        organizations: Iterable[str] = (),
        *,
        server_names: Iterable[str] = (),
        client: bool = True,
    ) -> KeyPair:
        """Issue ``name.crt``/``name.key``; ``server_names`` (DNS names or IPs) make it a serving cert."""
        for part in (common_name, *organizations):
            if not part or any(c in part for c in "/=\n"):
                raise ValueError(f"certificate subject part {part!r} is empty or contains / = or newline")
        subject = "".join(f"/O={o}" for o in organizations) + f"/CN={common_name}"
        key = self.directory / f"{name}.key"
        cert = self.directory / f"{name}.crt"
        csr = self.directory / f"{name}.csr"
        sans = []
        for entry in server_names:
            try:
                ipaddress.ip_address(entry)
                sans.append(f"IP:{entry}")
            except ValueError:
                sans.append(f"DNS:{entry}")
        usages = (["serverAuth"] if sans else []) + (["clientAuth"] if client else [])
        if not usages:
            raise ValueError("a certificate needs server names, client use, or both")
        extensions = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=" + ",".join(usages),
        ]
        if sans:
            extensions.append("subjectAltName=" + ",".join(sans))
        _openssl(
            [
                "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-keyout", str(key), "-out", str(csr), "-subj", subject,
            ],
            self.directory,
        )  # fmt: skip
        with tempfile.NamedTemporaryFile("w", dir=self.directory, suffix=".ext", delete=False) as ext:
            ext.write("\n".join(extensions) + "\n")
        try:
            _openssl(
                [
                    "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                    "-CAcreateserial", "-days", _DAYS, "-out", str(cert), "-extfile", ext.name,
                ],
                self.directory,
            )  # fmt: skip
        finally:
            Path(ext.name).unlink(missing_ok=True)
            csr.unlink(missing_ok=True)
        return KeyPair(cert=cert, key=key)


def service_account_keys(directory: Path) -> KeyPair:
    """The key pair that signs service-account tokens; ``cert`` is the public key."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "sa.key"
    pub = directory / "sa.pub"
    _openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], directory)
    _openssl(["ec", "-in", str(key), "-pubout", "-out", str(pub)], directory)
    return KeyPair(cert=pub, key=key)
