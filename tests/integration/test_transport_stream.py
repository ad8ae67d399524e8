"""The stream pairing over real sockets, clear and mutual TLS: target, heartbeats, loss, refusal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.tls_certs import now, vm_dir
from support.transport import SECRET, VM

from colo_agent.replication.handshake import AuthRefused
from colo_agent.replication.transport import Listener, PeerLostError, StreamLink
from colo_agent.tls import PeerTls, TlsFiles
from colo_operator import certs

HB = dict(heartbeat_interval=0.05, heartbeat_timeout=0.5)


@pytest.fixture(params=["clear", "tls"])
def tls(request: pytest.FixtureRequest, tmp_path: Path) -> PeerTls | None:
    if request.param == "clear":
        return None
    return PeerTls.for_vm(TlsFiles(vm_dir(tmp_path / "certs", certs.new_ca(now()), VM)), VM)


async def paired(listener: Listener, tls: PeerTls | None, **kw: object) -> tuple[StreamLink, StreamLink]:
    accepting = asyncio.ensure_future(
        StreamLink.accept(listener, secret=SECRET, vm=VM, term=2, tls=tls, **HB))
    secondary = await StreamLink.dial("127.0.0.1", listener.port, address="127.0.0.1:7713:7714",
                                      secret=SECRET, vm=VM, term=1, tls=tls, **HB, **kw)  # type: ignore[arg-type]
    return await accepting, secondary


async def test_target_and_checkpoints_cross_and_a_killed_peer_is_lost(tls: PeerTls | None) -> None:
    listener = Listener("127.0.0.1", 0)
    try:
        primary, secondary = await paired(listener, tls)
        assert await asyncio.wait_for(primary.target(), 5) == "127.0.0.1:7713:7714"
        assert secondary.term == 2  # the primary's term, from its HELLO
        primary.report(17)
        for _ in range(100):
            if secondary.checkpoints == 17:
                break
            await asyncio.sleep(0.02)
        assert secondary.checkpoints == 17
        await asyncio.sleep(0.6)  # longer than the timeout: heartbeats keep both alive
        assert primary.lost is None and secondary.lost is None

        # The primary vanishes without a word: the secondary's heartbeat timeout notices.
        primary._pairing.yank("killed")
        reason = await asyncio.wait_for(secondary.wait_lost(), 5)
        assert "closed by the peer" in reason or "no word" in reason or "connection" in reason
    finally:
        listener.close()


async def test_an_orderly_close_says_goodbye(tls: PeerTls | None) -> None:
    listener = Listener("127.0.0.1", 0)
    try:
        primary, secondary = await paired(listener, tls)
        await primary.target()
        await secondary.close("promoted")
        reason = await asyncio.wait_for(primary.wait_lost(), 5)
        assert reason == "secondary said goodbye (shutdown): promoted"
    finally:
        listener.close()


async def test_a_secondary_lost_before_its_target_fails_the_wait() -> None:
    listener = Listener("127.0.0.1", 0)
    try:
        accepting = asyncio.ensure_future(StreamLink.accept(listener, secret=SECRET, vm=VM, term=2, **HB))
        # Authenticated, then gone before its STREAM_TARGET reached the primary.
        secondary = await StreamLink.dial("127.0.0.1", listener.port, address="x:1:2", secret=SECRET, vm=VM,
                                          term=1, **HB)
        primary = await accepting
        primary.session.target = None
        primary._target.cancel()
        primary._target = asyncio.get_running_loop().create_future()
        secondary._pairing.yank("dead")
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(primary.target(), 5)
    finally:
        listener.close()


async def test_a_wrong_secret_or_a_page_log_primary_is_refused() -> None:
    listener = Listener("127.0.0.1", 0)
    try:
        accepting = asyncio.ensure_future(StreamLink.accept(listener, secret=SECRET, vm=VM, term=1, **HB))
        with pytest.raises(AuthRefused, match="wrong secret"):
            await StreamLink.dial("127.0.0.1", listener.port, address="a:1:2", secret=b"x" * 32, vm=VM,
                                  term=1, **HB)
        with pytest.raises(AuthRefused):
            await accepting
    finally:
        listener.close()
