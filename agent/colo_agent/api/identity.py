"""Who is who on the agents' ports: the names carried in TLS certificates.

Every certificate the operator (or cert-manager) issues for colo-operator
carries exactly one URI subject alternative name:

- the agents of one ColoVM share `spiffe://colo.dev/ns/<namespace>/colovm/<name>`;
- the operator is `spiffe://colo.dev/operator`.

An agent's replication port admits only its own VM's name, its control
port only the operator's (plus, for the reading routes, callers without a
certificate: the kubelet's probes). The CA that signs them is the trust
anchor; the name is what keeps one VM's agents from talking to another's.

The files follow the layout of a `kubernetes.io/tls` Secret, which is also
what cert-manager writes: `tls.crt`, `tls.key` and `ca.crt`.
"""

from __future__ import annotations

import ssl
from typing import Final

TRUST_DOMAIN: Final = "colo.dev"
OPERATOR_IDENTITY: Final = f"spiffe://{TRUST_DOMAIN}/operator"

CERT_FILE: Final = "tls.crt"
KEY_FILE: Final = "tls.key"
CA_FILE: Final = "ca.crt"


def vm_identity(namespace: str, name: str) -> str:
    """The URI name every agent of ColoVM `namespace/name` presents."""
    for part, what in ((namespace, "namespace"), (name, "name")):
        if not part or "/" in part:
            raise ValueError(f"a ColoVM {what} cannot be empty or contain '/': {part!r}")
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/colovm/{name}"


def uri_names(peer: ssl.SSLSocket | ssl.SSLObject) -> tuple[str, ...]:
    """The URI names in the peer's verified certificate (empty without one).

    Both ends use it: an agent to admit a caller, the operator to check that
    the agent it dialled is the VM it meant (a pod address alone proves nothing).
    """
    cert = peer.getpeercert()
    if not cert:
        return ()
    names = cert.get("subjectAltName", ())
    return tuple(str(entry[1]) for entry in names if entry[0] == "URI")
