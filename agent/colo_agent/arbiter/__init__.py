"""Fencing arbiters: the lock a primary must hold to release output (see `base`).

`from_spec` builds one from the agent's `--arbiter` flag:
`lease:NAMESPACE/NAME` (a Kubernetes Lease) or `file:PATH` (one host, no cluster).
"""

from __future__ import annotations

from colo_agent.arbiter.base import Arbiter, ArbiterError, TermTooLow

__all__ = ["Arbiter", "ArbiterError", "TermTooLow", "from_spec", "parse_spec"]


def parse_spec(spec: str) -> tuple[str, str, str]:
    """`lease:NS/NAME` -> ("lease", NS, NAME); `file:PATH` -> ("file", PATH, "").

    Raises ValueError naming what is wrong, so a bad flag is refused before anything starts.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"--arbiter {spec!r}: expected lease:NAMESPACE/NAME or file:PATH")
    if kind == "file":
        return kind, rest, ""
    if kind == "lease":
        namespace, slash, name = rest.partition("/")
        if not slash or not namespace or not name or "/" in name:
            raise ValueError(f"--arbiter {spec!r}: a Lease is named lease:NAMESPACE/NAME")
        return kind, namespace, name
    raise ValueError(f"--arbiter {spec!r}: unknown kind {kind!r}; expected lease:NAMESPACE/NAME or file:PATH")


def from_spec(spec: str, identity: str, lease_duration: float) -> Arbiter:
    """The arbiter named by `spec`; raises ValueError naming what is wrong with it."""
    kind, first, second = parse_spec(spec)
    if kind == "file":
        from colo_agent.arbiter.local import FileArbiter

        return FileArbiter(first, identity, lease_duration)
    # pykube is imported only when a cluster is used.
    from colo_agent.arbiter.lease import KubeLeaseArbiter

    return KubeLeaseArbiter(first, second, identity, lease_duration)
