"""The replication transport over real loopback sockets (and one real process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from support.transport import PAGE, PAGES, SECRET, VM, Guest, pair

from colo_agent.replication import protocol as p
from colo_agent.replication.cache import ColoCache, image_digest
from colo_agent.replication.handshake import AuthRefused, ClientHandshake
from colo_agent.replication.transport import (
    CheckpointReceiver,
    CheckpointSender,
    Connection,
    Listener,
    PeerLostError,
)


def receiver(capacity: int = 512, **kw: object) -> tuple[CheckpointReceiver, bytearray]:
    mem = bytearray(PAGES * PAGE)
    rx = CheckpointReceiver(ColoCache(mem, capacity=capacity), secret=SECRET, vm=VM, term=1, **kw)  # type: ignore[arg-type]
    return rx, mem


async def paired(rx: CheckpointReceiver, guest: Guest, channels: int = 2, **kw: object) -> CheckpointSender:
    sender = await pair(rx, channels=channels, **kw)
    await sender.sync(guest.ram, guest.collect_dirty)
    return sender


@pytest.mark.parametrize("channels", [1, 2, 4])
async def test_every_acknowledged_epoch_equals_the_primary_at_its_pause(channels: int) -> None:
    guest = Guest()
    rx, mem = receiver()
    sender = await paired(rx, guest, channels, batch_pages=64)
    try:
        epoch, digest = await guest.checkpoint(sender, sender.take_sync_remainder())
        assert image_digest(mem) == digest and rx.committed_epoch == epoch
        assert rx.cache.device_state == f"device-state-{epoch}".encode()
        for k in (1, 50, 400):
            guest.write(k)
            epoch, digest = await guest.checkpoint(sender)
            assert image_digest(mem) == digest, f"epoch {epoch} differs"
        assert rx.synced.is_set()
    finally:
        await sender.close()
        await rx.close()


async def test_sync_while_the_guest_keeps_writing_converges() -> None:
    guest = Guest(1)
    rx, mem = receiver()
    sender = await pair(rx)

    async def busy_guest() -> None:
        while True:
            guest.write(20)
            await asyncio.sleep(0)

    writer = asyncio.create_task(busy_guest())
    try:
        rounds = await sender.sync(guest.ram, guest.collect_dirty, max_rounds=4, converged_pages=0)
        assert rounds >= 2
    finally:
        writer.cancel()
    _epoch, digest = await guest.checkpoint(sender, sender.take_sync_remainder())
    assert image_digest(mem) == digest
    await sender.close()
    await rx.close()


async def test_wrong_secret_is_refused_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    rx, _ = receiver()
    listener = Listener("127.0.0.1", 0)
    accepting = asyncio.create_task(CheckpointSender.accept(
        listener, secret=b"not-the-secret-of-this-vm", vm=VM, term=1, page_count=PAGES
    ))  # fmt: skip
    try:
        with pytest.raises(AuthRefused, match="wrong secret") as err:
            await rx.dial("127.0.0.1", listener.port)
        assert err.value.reason is p.RefuseReason.BAD_AUTH
        assert [r.reason for r in rx.refusals] == [p.RefuseReason.BAD_AUTH]
        await asyncio.sleep(0.05)
        assert "handshake failed" in caplog.text and "wrong secret" in caplog.text  # the primary's word
        assert not accepting.done()  # the primary waits for the rightful secondary
        assert rx.session is None  # nothing was paired
    finally:
        accepting.cancel()
        listener.close()
        await rx.close()


async def test_other_protocol_version_is_refused_with_the_reason() -> None:
    rx, _ = receiver()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    loop = asyncio.get_running_loop()
    dialing = asyncio.create_task(rx.dial("127.0.0.1", server.getsockname()[1]))
    sock, _ = await loop.sock_accept(server)
    conn = Connection(sock, "test")
    hs = ClientHandshake(
        secret=SECRET, vm=VM, kind=p.ChannelKind.CONTROL, index=0, channels=1, session=1, term=1,
        page_count=PAGES, version=7,
    )  # fmt: skip
    await conn.send(hs.start())
    reply = await conn.next_event()
    assert isinstance(reply, p.Refused) and reply.reason is p.RefuseReason.BAD_VERSION
    assert "version 7" in reply.text
    assert await conn.next_event() is None  # and the connection is closed
    with pytest.raises(AuthRefused, match="version 7"):
        await dialing
    conn.close()
    server.close()
    await rx.close()


# -- a man in the middle that corrupts or stalls --------------------------------------------------


class Proxy:
    """Forwards a secondary's connections to its primary's port; can corrupt PAGES frames
    (primary -> secondary) or freeze."""

    def __init__(self) -> None:
        self.target = 0
        self.corrupt = 0  # PAGES frames still to corrupt
        self.corrupted = 0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self, target: int) -> int:
        """Forward to `target`; returns the port to dial instead."""
        self.target = target
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.server is not None:
            self.server.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection("127.0.0.1", self.target)
        for coro in (self._frames(tr, w), self._raw(r, tw)):
            task = asyncio.create_task(coro)
            self.tasks.add(task)

    async def _frames(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with_errors = (asyncio.IncompleteReadError, ConnectionError)
        try:
            while True:
                await self.flowing.wait()
                head = await r.readexactly(p.HEADER_SIZE)
                length = struct.unpack_from("<I", head, 8)[0]
                body = bytearray(await r.readexactly(length))
                if head[5] == p.MessageType.PAGES and self.corrupt > 0:
                    count = (length - p.PAGES_META.size) // (8 + PAGE)
                    body[p.PAGES_META.size + 8 * count + 1234] ^= 0x04
                    self.corrupt -= 1
                    self.corrupted += 1
                await self.flowing.wait()
                w.write(head + body)
                await w.drain()
        except with_errors:
            w.close()

    async def _raw(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                await self.flowing.wait()
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        w.close()


async def test_corrupted_data_frame_is_rejected_resent_and_never_half_applied() -> None:
    guest = Guest(2)
    rx, mem = receiver()
    proxy = Proxy()
    sender = await paired(rx, guest, channels=2, batch_pages=32, through=proxy.start)
    try:
        await guest.checkpoint(sender, sender.take_sync_remainder())
        committed = image_digest(mem)
        seen: list[str] = []
        original_commit = rx.cache.commit

        def watch(*args: object, **kw: object) -> object:
            seen.append(image_digest(mem))  # the image right before every commit
            return original_commit(*args, **kw)  # type: ignore[arg-type]

        rx.cache.commit = watch  # type: ignore[method-assign]
        guest.write(300)
        proxy.corrupt = 1
        epoch, digest = await guest.checkpoint(sender)
        assert proxy.corrupted == 1
        assert [r.reason for r in sender.rejections] == [p.NackReason.CORRUPT_FRAME]
        assert seen == [committed], "the rejected attempt touched the committed image"
        assert image_digest(mem) == digest and rx.committed_epoch == epoch
    finally:
        await sender.close()
        await rx.close()
        await proxy.close()


async def test_a_peer_that_stops_reading_is_yanked_within_the_timeout() -> None:
    guest = Guest(3)
    # The secondary waits longer than the primary, so that it is the primary's own
    # deadline that ends the pairing, not the secondary hanging up first.
    rx, _ = receiver(capacity=PAGES, heartbeat_timeout=5.0)
    proxy = Proxy()
    sender = await paired(rx, guest, heartbeat_interval=0.05, heartbeat_timeout=0.4, through=proxy.start)
    try:
        await guest.checkpoint(sender, sender.take_sync_remainder())
        proxy.flowing.clear()  # nothing moves any more, in either direction
        guest.write(2000)  # more than the socket buffers hold
        start = time.monotonic()
        with pytest.raises(PeerLostError, match="no word from the secondary"):
            await asyncio.wait_for(guest.checkpoint(sender), 30)
        assert time.monotonic() - start < 10  # generous: the point is that it does not hang
        assert sender.lost is not None
    finally:
        proxy.flowing.set()
        await sender.close()
        await rx.close()
        await proxy.close()


RECEIVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from colo_agent.replication.cache import ColoCache
    from colo_agent.replication.transport import CheckpointReceiver

    async def main():
        rx = CheckpointReceiver(ColoCache(bytearray({pages} * 4096), capacity={pages}),
                                secret={secret!r}, vm={vm!r}, term=1)
        await rx.dial("127.0.0.1", {port})
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_sigstopped_secondary_process_is_yanked_and_the_primary_goes_on() -> None:
    listener = Listener("127.0.0.1", 0)
    script = RECEIVER_SCRIPT.format(pages=PAGES, secret=SECRET, vm=VM, port=listener.port)
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    try:
        guest = Guest(4)
        sender = await asyncio.wait_for(CheckpointSender.accept(
            listener, secret=SECRET, vm=VM, term=1, page_count=PAGES, heartbeat_interval=0.05,
            heartbeat_timeout=0.5,
        ), 30)  # fmt: skip
        listener.close()
        await sender.sync(guest.ram, guest.collect_dirty)
        await guest.checkpoint(sender, sender.take_sync_remainder())
        os.kill(proc.pid, signal.SIGSTOP)
        guest.write(1500)
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(guest.checkpoint(sender), 30)
        # The primary goes on: its loop is free and a new secondary can pair.
        rx, mem = receiver()
        sender2 = await paired(rx, guest)
        _epoch, digest = await guest.checkpoint(sender2, sender2.take_sync_remainder())
        assert image_digest(mem) == digest
        await sender2.close()
        await rx.close()
    finally:
        listener.close()
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


async def test_secondary_detects_a_dead_primary_and_promotes_from_the_last_complete_epoch() -> None:
    guest = Guest(5)
    lost: list[str] = []
    rx, mem = receiver(on_peer_lost=lost.append, heartbeat_timeout=0.3, heartbeat_interval=0.05)
    proxy = Proxy()
    sender = await paired(rx, guest, through=proxy.start)
    epoch, digest = await guest.checkpoint(sender, sender.take_sync_remainder())
    guest.write(200)
    proxy.flowing.clear()  # the primary "dies" mid-epoch: nothing more reaches the secondary
    pending = asyncio.create_task(guest.checkpoint(sender))
    await asyncio.wait_for(rx.wait_lost(), 10)
    assert lost and "no word from the primary" in lost[0]
    promoted = rx.promote()
    assert (promoted.epoch, promoted.device_state) == (epoch, f"device-state-{epoch}".encode())
    assert image_digest(mem) == digest
    with pytest.raises(PeerLostError):
        await asyncio.wait_for(pending, 10)
    await sender.close()
    await rx.close()
    await proxy.close()


async def test_a_secondary_dials_a_listening_primary() -> None:
    guest = Guest(6)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    mem = bytearray(PAGES * PAGE)
    rx = CheckpointReceiver(ColoCache(mem, capacity=512), secret=SECRET, vm=VM, term=1)
    accepting = asyncio.create_task(
        CheckpointSender.accept(listener, secret=SECRET, vm=VM, term=1, page_count=PAGES, channels=3)
    )
    await rx.dial("127.0.0.1", listener.getsockname()[1])
    sender = await accepting
    try:
        await sender.sync(guest.ram, guest.collect_dirty)
        epoch, digest = await guest.checkpoint(sender, sender.take_sync_remainder())
        guest.write(100)
        epoch, digest = await guest.checkpoint(sender)
        assert image_digest(mem) == digest and rx.committed_epoch == epoch
    finally:
        await sender.close()
        await rx.close()
        listener.close()


async def test_an_intruder_dialling_alongside_does_not_keep_the_rightful_secondary_out() -> None:
    guest = Guest(7)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    accepting = asyncio.create_task(
        CheckpointSender.accept(listener, secret=SECRET, vm=VM, term=1, page_count=PAGES, channels=2)
    )
    refusals: list[str] = []

    async def intruder() -> None:
        while True:
            cache = ColoCache(bytearray(PAGES * PAGE), capacity=64)
            rx = CheckpointReceiver(cache, secret=b"some-other-secret-entirely", vm=VM, term=1)
            with contextlib.suppress(AuthRefused, OSError, p.RemoteProtocolError, TimeoutError):
                await rx.dial("127.0.0.1", port)
            refusals.extend(r.text for r in rx.refusals)
            await rx.close()
            await asyncio.sleep(0.01)

    pest = asyncio.create_task(intruder())
    mem = bytearray(PAGES * PAGE)
    rx = CheckpointReceiver(ColoCache(mem, capacity=512), secret=SECRET, vm=VM, term=1)
    try:
        for _ in range(20):  # a dial may itself meet a channel of the intruder's attempt
            with contextlib.suppress(AuthRefused, p.RemoteProtocolError, TimeoutError):
                await rx.dial("127.0.0.1", port)
                break
            rx = CheckpointReceiver(ColoCache(mem, capacity=512), secret=SECRET, vm=VM, term=1)
        sender = await asyncio.wait_for(accepting, 30)
        pest.cancel()
        await sender.sync(guest.ram, guest.collect_dirty)
        _, digest = await guest.checkpoint(sender, sender.take_sync_remainder())
        assert image_digest(mem) == digest
        assert any("wrong secret" in r for r in refusals)
        await sender.close()
    finally:
        pest.cancel()
        accepting.cancel()
        await rx.close()
        listener.close()


async def test_a_half_open_pairing_the_secondary_gave_up_on_does_not_keep_it_out() -> None:
    """A secondary whose first dial stops after the control connection (it timed the
    half-open pairing out on a loaded machine) dials again and again: the primary must
    give the stale pairing up within its join timeout rather than take every new
    connection as one of its channels (once, the pair never paired again)."""
    guest = Guest(8)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def accept_until_paired() -> CheckpointSender:
        while True:
            with contextlib.suppress(AuthRefused, OSError, p.RemoteProtocolError, TimeoutError):
                return await CheckpointSender.accept(
                    listener, join_timeout=1.0, secret=SECRET, vm=VM, term=1, page_count=PAGES, channels=2
                )

    accepting = asyncio.create_task(accept_until_paired())
    # The control connection of a pairing, whose dialer then goes away.
    stale = CheckpointReceiver(ColoCache(bytearray(PAGES * PAGE), capacity=64), secret=SECRET, vm=VM, term=1)
    loop = asyncio.get_running_loop()
    sock = await loop.run_in_executor(None, socket.create_connection, ("127.0.0.1", port))
    await stale._handshake(sock, "stale")
    await stale.close()
    mem = bytearray(PAGES * PAGE)
    rx = CheckpointReceiver(ColoCache(mem, capacity=512), secret=SECRET, vm=VM, term=1)
    deadline = time.monotonic() + 15
    while not accepting.done():
        assert time.monotonic() < deadline, "the secondary never paired again"
        with contextlib.suppress(AuthRefused, OSError, p.RemoteProtocolError, TimeoutError):
            await asyncio.wait_for(rx.dial("127.0.0.1", port), 3)
        await asyncio.sleep(0.2)
    sender = await accepting
    try:
        await sender.sync(guest.ram, guest.collect_dirty)
        epoch, digest = await guest.checkpoint(sender, sender.take_sync_remainder())
        assert image_digest(mem) == digest and rx.committed_epoch == epoch
    finally:
        await sender.close()
        await rx.close()
        listener.close()


async def _decode_all(conn: Connection, count: int) -> list[object]:
    out: list[object] = []
    while len(out) < count:
        ev = await asyncio.wait_for(conn.next_event(lambda header: None), 10)
        assert ev is not None
        out.append(ev)
    return out


async def test_a_frame_for_an_idle_channel_reaches_the_kernel_before_the_call_returns() -> None:
    from colo_agent.replication.session import CONTROL, Send
    from colo_agent.replication.transport import _Pairing

    a, b = socket.socketpair()
    pairing = _Pairing(time.monotonic, "test")
    pairing.add(CONTROL, Connection(a, "sender"))
    peer = Connection(b, "peer")
    try:
        pairing.enqueue(Send(CONTROL, p.Heartbeat(1, 7, 3)))
        # No await in between: the writer task never ran, the bytes are in the socket already.
        assert b.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        assert await _decode_all(peer, 1) == [p.Heartbeat(1, 7, 3)]
    finally:
        pairing.yank("done")
        peer.close()


async def test_what_the_socket_does_not_take_at_once_still_leaves_first_and_in_order() -> None:
    import numpy as np

    from colo_agent.replication.session import CONTROL, Send
    from colo_agent.replication.transport import _Pairing

    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pairing = _Pairing(time.monotonic, "test")
    pairing.add(CONTROL, Connection(a, "sender"))
    peer = Connection(b, "peer")
    try:
        data = np.full((64, PAGE), 7, dtype=np.uint8)  # 256 KiB: far more than the send buffer
        pages = p.Pages(p.MessageType.PAGES, 1, 5, 0, 0, np.arange(64, dtype=np.int64), data)
        pairing.enqueue(Send(CONTROL, pages))
        pairing.enqueue(Send(CONTROL, p.Heartbeat(1, 1, 0)))  # must queue behind the rest
        pairing.enqueue(Send(CONTROL, p.Heartbeat(1, 2, 0)))
        got = await _decode_all(peer, 3)
        assert isinstance(got[0], p.PagesComplete) and got[0].count == 64
        assert got[1:] == [p.Heartbeat(1, 1, 0), p.Heartbeat(1, 2, 0)]
        await asyncio.wait_for(pairing.drained(), 10)
    finally:
        pairing.yank("done")
        peer.close()


async def test_frames_sent_in_a_batch_leave_together_when_it_ends_in_order_per_connection() -> None:
    from colo_agent.replication.session import CONTROL, Send, data_channel
    from colo_agent.replication.transport import _Pairing

    pairing = _Pairing(time.monotonic, "test")
    peers = {}
    for ch in (CONTROL, data_channel(0)):
        a, b = socket.socketpair()
        pairing.add(ch, Connection(a, f"sender {ch}"))
        peers[ch] = (b, Connection(b, f"peer {ch}"))
    try:
        with pairing.batched():
            pairing.enqueue(Send(CONTROL, p.Heartbeat(1, 1, 0)))
            pairing.enqueue(Send(data_channel(0), p.Heartbeat(1, 2, 0)))
            pairing.enqueue(Send(CONTROL, p.Heartbeat(1, 3, 0)))
            for raw, _ in peers.values():
                with pytest.raises(BlockingIOError):
                    raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        for raw, _ in peers.values():  # at the kernel now, before any await
            assert raw.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        assert await _decode_all(peers[CONTROL][1], 2) == [p.Heartbeat(1, 1, 0), p.Heartbeat(1, 3, 0)]
        assert await _decode_all(peers[data_channel(0)][1], 1) == [p.Heartbeat(1, 2, 0)]
    finally:
        pairing.yank("done")
        for _, conn in peers.values():
            conn.close()
