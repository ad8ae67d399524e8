"""Only `replication/transport.py` does replication I/O.

The protocol and sessions are sans-IO, the engine (lockstep included) sends
and receives through the transport's API; a module that reached for a
replication socket itself would bypass its ordering, yanking and TLS.
"""

from __future__ import annotations

import ast
from pathlib import Path

import colo_agent

ROOT = Path(colo_agent.__file__).resolve().parent
OWNER = ROOT / "replication" / "transport.py"
# Sockets that are not replication sockets: the guest's clients, and the TLS
# hooks the transport calls to secure its own sockets.
OTHER_SOCKETS = {ROOT / "bridge.py", ROOT / "tls.py", ROOT / "tls_stream.py"}
# Where no socket may appear at all, not even an import.
NO_SOCKETS = [ROOT / "replication", ROOT / "engine"]
_LOOP_SOCKET_CALLS = {"sock_recv", "sock_recv_into", "sock_sendall", "sock_sendto", "sock_accept",
                      "sock_connect", "sock_sendfile"}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    strict = any(path.is_relative_to(d) for d in NO_SOCKETS)
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and (node.attr == "sock" or node.attr in _LOOP_SOCKET_CALLS):
            found.append(f"{where}: .{node.attr}")
        if strict and isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n in ("socket", "ssl") for n in names if n):
                found.append(f"{where}: imports {names}")
    return found


def test_no_module_but_the_transport_touches_a_replication_socket() -> None:
    modules = [p for p in ROOT.rglob("*.py") if p != OWNER and p not in OTHER_SOCKETS]
    assert len(modules) > 20
    assert [v for p in sorted(modules) for v in _violations(p)] == []


def test_the_check_sees_a_socket_where_there_is_one() -> None:
    bad = ROOT / "engine" / "lockstep.py"
    assert _violations(bad) == []
    assert _violations(OWNER), "the transport itself uses sockets: the check must see them"
