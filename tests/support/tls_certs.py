"""Certificate directories for tests, issued the way the operator issues them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from colo_agent.api.identity import CA_FILE, CERT_FILE, KEY_FILE, OPERATOR_IDENTITY, vm_identity
from colo_operator import certs


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_dir(directory: Path, ca: certs.KeyPair, leaf: certs.KeyPair) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CERT_FILE).write_bytes(leaf.cert_pem)
    (directory / KEY_FILE).write_bytes(leaf.key_pem)
    (directory / CA_FILE).write_bytes(ca.cert_pem)
    return directory


def vm_dir(directory: Path, ca: certs.KeyPair, vm: str) -> Path:
    """A certificate directory for the agents of `vm` ("NAMESPACE/NAME")."""
    ns, _, name = vm.partition("/")
    return write_dir(directory, ca, certs.issue(ca, vm_identity(ns, name), now()))


def operator_dir(directory: Path, ca: certs.KeyPair) -> Path:
    return write_dir(directory, ca, certs.issue(ca, OPERATOR_IDENTITY, now()))


class SecretVolume:
    """A certificate directory laid out and updated the way the kubelet updates a Secret volume.

    The files are symlinks into `..data`, itself a symlink to a timestamped
    directory; an update writes a new timestamped directory and renames a
    new `..data` over the old one, so a reader sees the old set or the new
    set, never half of each (the kubelet's AtomicWriter).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.generation = 0
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, files: dict[str, bytes]) -> Path:
        self.generation += 1
        version = self.directory / f"..{self.generation:04d}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        staged = self.directory / "..data_tmp"
        staged.symlink_to(version.name)
        staged.rename(self.directory / "..data")
        for name in files:
            link = self.directory / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        return self.directory

    def issue(self, signer: certs.KeyPair, vm: str | None, trust: bytes | None = None) -> Path:
        """A certificate for `vm` ("NAMESPACE/NAME", None: the operator) from `signer`,
        trusting `trust` (a PEM bundle; the signer alone by default)."""
        uri = OPERATOR_IDENTITY if vm is None else vm_identity(*vm.split("/", 1))
        leaf = certs.issue(signer, uri, now())
        files = {CERT_FILE: leaf.cert_pem, KEY_FILE: leaf.key_pem, CA_FILE: trust or signer.cert_pem}
        return self.write(files)

    def trust(self, bundle: bytes) -> Path:
        """The same certificate and key, another CA bundle."""
        files = {name: (self.directory / name).read_bytes() for name in (CERT_FILE, KEY_FILE)}
        return self.write({**files, CA_FILE: bundle})
