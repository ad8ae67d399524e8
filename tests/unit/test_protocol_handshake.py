"""The authentication handshake, over the real codec."""

from __future__ import annotations

import dataclasses

import pytest

from colo_agent.replication import protocol as p
from colo_agent.replication.handshake import AuthRefused, ClientHandshake, ServerHandshake

SECRET = b"s3cret-of-this-vm-0123456789"


def client(secret: bytes = SECRET, **kw: object) -> ClientHandshake:
    args: dict[str, object] = dict(
        vm="default/db", kind=p.ChannelKind.DATA, index=1, channels=2, session=77, term=5, page_count=1024
    )
    args.update(kw)
    return ClientHandshake(secret=secret, **args)  # type: ignore[arg-type]


def server(secret: bytes = SECRET, **kw: object) -> ServerHandshake:
    args: dict[str, object] = dict(vm="default/db", term=5, page_count=1024, cache_pages=200)
    args.update(kw)
    return ServerHandshake(secret=secret, **args)  # type: ignore[arg-type]


def wire(msg: p.Message) -> p.Message:
    """Through encoder and decoder, as on a connection."""
    dec = p.FrameDecoder()
    dec.receive(p.FrameEncoder().encode(msg))
    (out,) = p.drain(dec)
    return out


def run(c: ClientHandshake, s: ServerHandshake) -> None:
    reply = s.receive(wire(c.start()))
    while True:
        nxt = c.receive(wire(reply))
        if nxt is None:
            return
        reply = s.receive(wire(nxt))


def test_matching_secrets_authenticate_both_ways() -> None:
    c, s = client(), server()
    run(c, s)
    assert c.done and s.done
    assert c.accepted is not None and c.accepted.cache_pages == 200
    assert s.hello is not None and s.hello.index == 1 and s.hello.session == 77


def test_wrong_secret_is_refused_with_the_reason() -> None:
    c, s = client(secret=b"another-secret-entirely"), server()
    with pytest.raises(AuthRefused, match="wrong secret") as err:
        run(c, s)
    assert err.value.reason is p.RefuseReason.BAD_AUTH
    assert s.refused is not None and not s.done


def test_server_that_does_not_know_the_secret_is_detected() -> None:
    c, s = client(), server(secret=b"an-impostor-secondary!!")
    reply = s.receive(wire(c.start()))
    resp = c.receive(wire(reply))
    assert resp is not None
    forged = s.receive(wire(resp))  # the impostor refuses, but suppose it replied AUTH_OK
    assert isinstance(forged, p.Refused)
    with pytest.raises(AuthRefused, match="could not prove"):
        c.receive(p.AuthOk(b"\0" * 32, 5, 1024, 200))


def test_other_protocol_version_is_refused_before_any_challenge() -> None:
    c, s = client(version=2), server()
    reply = s.receive(wire(c.start()))
    assert isinstance(reply, p.Refused) and reply.reason is p.RefuseReason.BAD_VERSION
    assert "version 2" in reply.text


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"vm": "default/other"}, p.RefuseReason.UNKNOWN_VM),
        ({"term": 4}, p.RefuseReason.STALE_TERM),
        ({"index": 2}, p.RefuseReason.BAD_CHANNEL),
        ({"page_count": 4096}, p.RefuseReason.PROTOCOL),
    ],
)
def test_policy_refusals_after_authentication(kw: dict[str, object], reason: p.RefuseReason) -> None:
    with pytest.raises(AuthRefused) as err:
        run(client(**kw), server())
    assert err.value.reason is reason


def test_a_replayed_response_fails_on_a_new_connection() -> None:
    c1, s1 = client(nonce=b"a" * 16), server(nonce=b"b" * 16)
    reply = s1.receive(c1.start())
    response = c1.receive(reply)
    assert response is not None
    s2 = server(nonce=b"c" * 16)  # a fresh server nonce
    s2.receive(client(nonce=b"a" * 16).start())
    refused = s2.receive(response)
    assert isinstance(refused, p.Refused) and refused.reason is p.RefuseReason.BAD_AUTH


def test_out_of_order_messages_are_remote_errors() -> None:
    with pytest.raises(p.RemoteProtocolError):
        server().receive(p.AuthResponse(b"\0" * 32))
    c = client()
    c.start()
    with pytest.raises(p.RemoteProtocolError):
        c.receive(p.AuthOk(b"\0" * 32, 1, 1, 1))


def test_short_secrets_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        client(secret=b"short")


def test_a_tampered_auth_ok_is_detected() -> None:
    c, s = client(), server()
    response = c.receive(s.receive(c.start()))
    assert response is not None
    ok = s.receive(response)
    assert isinstance(ok, p.AuthOk)
    with pytest.raises(AuthRefused, match="could not prove"):
        c.receive(dataclasses.replace(ok, cache_pages=10**9))
