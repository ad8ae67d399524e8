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
