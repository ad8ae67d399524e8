"""Fencing arbiters: the lock a primary must hold to release output (see `base`).

`from_spec` builds one from the agent's `--arbiter` flag:
`lease:NAMESPACE/NAME` (a Kubernetes Lease) or `file:PATH` (one host, no cluster).
"""

from __future__ import annotations

from colo_agent.arbiter.base import Arbiter, ArbiterError, TermTooLow

__all__ = ["Arbiter", "ArbiterError", "TermTooLow", "from_spec"]


def from_spec(spec: str, identity: str, lease_duration: float) -> Arbiter:
    """The arbiter named by `spec`; raises ValueError naming what is wrong with it."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"--arbiter {spec!r}: expected lease:NAMESPACE/NAME or file:PATH")
    if kind == "file":
        from colo_agent.arbiter.local import FileArbiter

        return FileArbiter(rest, identity, lease_duration)
    if kind == "lease":
        namespace, slash, name = rest.partition("/")
        if not slash or not namespace or not name or "/" in name:
            raise ValueError(f"--arbiter {spec!r}: a Lease is named lease:NAMESPACE/NAME")
        # pykube is imported only when a cluster is used.
        from colo_agent.arbiter.lease import KubeLeaseArbiter

        return KubeLeaseArbiter(namespace, name, identity, lease_duration)
    raise ValueError(f"--arbiter {spec!r}: unknown kind {kind!r}; expected lease:NAMESPACE/NAME or file:PATH")
