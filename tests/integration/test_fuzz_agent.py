"""Hostile input on every port of a live agent: a seeded, counted random campaign.

The control API gets malformed requests (methods, paths, headers, bodies,
huge and truncated requests); the replication port gets malformed
handshakes and frames, in clear and inside a TLS session that a holder of
the VM's certificate could open. After each batch the agent must still
answer, say the same role, term and epoch, and refuse with a clear error
(4xx, or a closed connection) rather than crash; at the end a rightful
secondary still pairs. The counts are printed (`pytest -rP` shows them).
"""

from __future__ import annotations

import os
import random
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import AgentGroup, AgentProcess, wait_protected
from support.tls_certs import now, operator_dir, vm_dir

from colo_agent.replication import protocol as p
from colo_agent.tls import TlsFiles
from colo_operator import certs

VM = "test/colo-vm"
# Bounded for CI; raise COLO_FUZZ_INPUTS for a longer campaign.
INPUTS = int(os.environ.get("COLO_FUZZ_INPUTS", "200"))
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "BREW", "",
           "G\x00T"]
PATHS = ["/v1/status", "/v1/promote", "/v1/demote", "/v1/checkpoint", "/healthz", "/readyz", "/metrics",
         "/", "/v1/", "/v1/promote/../status", "/%00", "/" + "a" * 5000, "*",
         "http://x/v1/status"]  # fmt: skip


@pytest.fixture
def group(tmp_path: Path) -> Iterator[AgentGroup]:
    g = AgentGroup(tmp_path, vm=VM)
    try:
        yield g
    finally:
        g.close()


def _http_input(rng: random.Random, secret: str) -> bytes:
    method = rng.choice(METHODS)
    path = rng.choice(PATHS)
    headers = ["Host: agent", "Connection: close"]
    kind = rng.randrange(8)
    body = b""
    if kind == 0:
        body = rng.randbytes(rng.randrange(0, 4096))
    elif kind == 1:
        body = b'{"term": ' + str(rng.choice([-1, 0, 2**64, "null", '"x"', 1e308])).encode() + b"}"
    elif kind == 2:
        body = b"{" * rng.randrange(1, 20000)  # deep or huge JSON
    elif kind == 3:
        body = rng.randbytes(70_000)  # above the 16 KiB limit
    if rng.random() < 0.5:
        auth = rng.choice(["Bearer " + secret, "Bearer x", "Basic Zm9v", "Bearer", ""])
        headers.append(f"Authorization: {auth}")
    if rng.random() < 0.3:
        headers.append(f"Content-Length: {rng.choice([len(body) + 10, -1, 2**63, 'abc', len(body)])}")
    else:
        headers.append(f"Content-Length: {len(body)}")
    if rng.random() < 0.2:
        headers.append("Transfer-Encoding: chunked")
    if rng.random() < 0.2:
        headers.append("X-" + "h" * rng.randrange(1, 20000) + ": v")
    if rng.random() < 0.1:
        headers.append("Bad Header Without Colon")
    request = f"{method} {path} HTTP/1.1\r\n".encode() + "\r\n".join(headers).encode(errors="replace")
    request += b"\r\n\r\n" + body
    if rng.random() < 0.2:
        request = request[: rng.randrange(1, len(request))]  # truncated
    if rng.random() < 0.1:
        request = rng.randbytes(rng.randrange(1, 2000))  # not HTTP at all
    return request


def _send(host: str, port: int, data: bytes, ctx: ssl.SSLContext | None = None) -> bytes:
    """Send `data`, return what came back (b"" if the agent just closed)."""
    with socket.create_connection((host, port), timeout=5) as raw:
        sock: socket.socket = ctx.wrap_socket(raw) if ctx is not None else raw
        try:
            sock.sendall(data)
            out = b""
            # A truncated request leaves the agent waiting for the rest: stop listening then.
            sock.settimeout(0.5)
            try:
                while chunk := sock.recv(65536):
                    out += chunk
                    if len(out) > 1 << 20:
                        break
            except TimeoutError:
                pass
            return out
        except (OSError, ssl.SSLError):
            return b""
        finally:
            sock.close()


def _snapshot(agent: AgentProcess) -> tuple[str, int, bool]:
    st = agent.status()
    assert st is not None, f"{agent.name} stopped answering:\n{agent.tail()}"
    assert agent.proc.poll() is None, agent.tail()
    return st.role.value, st.term, st.synced


def test_the_control_api_survives_hostile_requests_unchanged(group: AgentGroup) -> None:
    rng = random.Random(14)
    primary = group.spawn("agent-a", "primary")
    before = primary.wait_for("serving as primary", lambda s: s.role == "primary")
    statuses: dict[int, int] = {}
    for i in range(INPUTS):
        reply = _send(primary.host, primary.control_port, _http_input(rng, "not-the-secret-" + "x" * 16))
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, f"input {i} got {reply[:300]!r}"
        if i % 50 == 49:
            assert _snapshot(primary) == (before.role.value, before.term, before.synced)
    assert _snapshot(primary) == (before.role.value, before.term, before.synced)
    print(f"control API: {INPUTS} hostile requests, answers by status {dict(sorted(statuses.items()))}")
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > INPUTS // 4  # mostly named refusals


def _frame_input(rng: random.Random) -> bytes:
    enc = p.FrameEncoder()
    valid = [
        enc.encode(p.AuthChallenge(rng.randbytes(p.NONCE_SIZE))),
        enc.encode(p.AuthResponse(rng.randbytes(32))),
        p.HEADER.pack(p.MAGIC, p.WIRE_VERSION, rng.randrange(256), 0, rng.randrange(1 << 32), 0),
    ]
    frame = bytearray(rng.choice(valid))
    kind = rng.randrange(5)
    if kind == 0:  # flip bytes
        for _ in range(rng.randrange(1, 8)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
    elif kind == 1:  # truncate
        frame = frame[: rng.randrange(1, len(frame))]
    elif kind == 2:  # random bytes
        frame = bytearray(rng.randbytes(rng.randrange(1, 4096)))
    elif kind == 3:  # a valid frame followed by junk
        frame += rng.randbytes(rng.randrange(1, 512))
    return bytes(frame)


def test_the_replication_port_survives_hostile_handshakes_and_frames(
    group: AgentGroup, tmp_path: Path
) -> None:
    """In clear (what reaches the decoder unauthenticated) and inside TLS with this VM's own
    certificate (an attacker holding the VM's Secret but not its per-VM key)."""
    rng = random.Random(41)
    ca = certs.new_ca(now())
    op = TlsFiles(operator_dir(tmp_path / "op", ca)).client_context()
    clear = group.spawn("agent-a", "primary")
    # Its own group: each protected VM has its own arbiter.
    (tmp_path / "tls-vm").mkdir()
    tls_group = AgentGroup(tmp_path / "tls-vm", vm=VM)
    try:
        _replication_campaign(rng, group, tls_group, clear, tmp_path, ca, op)
    finally:
        tls_group.close()


def _replication_campaign(
    rng: random.Random, group: AgentGroup, tls_group: AgentGroup, clear: AgentProcess, tmp_path: Path,
    ca: certs.KeyPair, op: ssl.SSLContext,
) -> None:
    tls = tls_group.spawn("agent-t", "primary", tls_dir=vm_dir(tmp_path / "t", ca, VM), tls_client=op)
    for agent in (clear, tls):
        agent.wait_for("serving as primary", lambda s: s.role == "primary")
    inside = TlsFiles(vm_dir(tmp_path / "attacker", ca, VM)).client_context()
    before = {a.name: _snapshot(a) for a in (clear, tls)}
    tried = 0
    for i in range(INPUTS // 2):
        _send(clear.host, clear.replication_port, _frame_input(rng))
        _send(tls.host, tls.replication_port, _frame_input(rng), inside)
        tried += 2
        if i % 50 == 49:
            assert {a.name: _snapshot(a) for a in (clear, tls)} == before
    assert {a.name: _snapshot(a) for a in (clear, tls)} == before
    print(f"replication port: {tried} hostile handshakes and frames, half in clear, half inside TLS")
    # Refusals cost the primaries nothing: their rightful secondaries still pair.
    s1 = group.spawn("agent-b", "secondary", peer=clear)
    s2 = tls_group.spawn("agent-u", "secondary", peer=tls, tls_dir=vm_dir(tmp_path / "u", ca, VM),
                         tls_client=op)
    wait_protected(clear, s1)
    wait_protected(tls, s2)
    assert "Traceback" not in clear.log() and "Traceback" not in tls.log()
