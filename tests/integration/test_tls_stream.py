"""TLS on a replication connection over real sockets: large and small sends, any thread, a cut peer."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from support.tls_certs import now, vm_dir
from support.transport import VM

from colo_agent.replication.protocol import (
    PAGE_SIZE,
    MessageType,
    MirrorInput,
    Pages,
    PagesComplete,
    PagesHeader,
)
from colo_agent.replication.transport import Connection, ThreadSafeLink
from colo_agent.tls import PeerTls, TlsFiles
from colo_agent.tls_stream import secure
from colo_operator import certs


async def tls_pair(tmp_path: Path) -> tuple[Connection, Connection, socket.socket]:
    """Two connected `Connection`s over TLS; the server's raw socket too."""
    tls = PeerTls.for_vm(TlsFiles(vm_dir(tmp_path / "vm", certs.new_ca(now()), VM)), VM)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    client, server = await asyncio.gather(secure(tls, a, server_side=False), secure(tls, b, server_side=True))
    return Connection(a, "client", client), Connection(b, "server", server), b


async def test_large_page_frames_and_small_frames_arrive_in_order(tmp_path: Path) -> None:
    tx, rx, _ = await tls_pair(tmp_path)
    rng = np.random.default_rng(5)
    # 3 MiB (many ciphertext reads) down to 4 KiB (part of one record).
    batches = [rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8) for n in (768, 16, 1)]
    small = [MirrorInput(1, i, bytes([i]) * (10 + 1000 * i)) for i in range(3)]
    dest = np.zeros((800, PAGE_SIZE), dtype=np.uint8)
    try:

        async def send_all() -> None:
            for pages, msg in zip(batches, small, strict=True):
                idx = np.arange(len(pages), dtype=np.int64)
                await tx.send_pages(Pages(MessageType.PAGES, 1, 1, 0, 0, idx, pages))
                await tx.send(msg)

        async def receive_all() -> list[object]:
            got: list[object] = []

            def into(header: PagesHeader) -> memoryview:
                return memoryview(dest[: header.count]).cast("B")

            for _ in range(len(batches)):
                ev = await asyncio.wait_for(rx.next_event(into), 10)
                assert isinstance(ev, PagesComplete) and not ev.discarded
                got.append(dest[: ev.count].copy())
                got.append(await asyncio.wait_for(rx.next_event(), 10))
            return got

        _, got = await asyncio.gather(send_all(), receive_all())
        for i, (pages, msg) in enumerate(zip(batches, small, strict=True)):
            assert np.array_equal(got[2 * i], pages)  # type: ignore[arg-type]
            assert got[2 * i + 1] == msg
        plain = sum(p.nbytes for p in batches)
        assert tx.bytes_sent > plain, "the wire carries records: more than the plaintext"
        assert rx.bytes_received > plain
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("encrypted", [True, False])
async def test_a_thread_safe_link_sends_from_another_thread_in_call_order(
    tmp_path: Path, encrypted: bool
) -> None:
    if encrypted:
        tx, rx, _ = await tls_pair(tmp_path)
    else:
        a, b = socket.socketpair()
        tx, rx = Connection(a, "client"), Connection(b, "server")
    sender, receiver = ThreadSafeLink(tx, "sender"), ThreadSafeLink(rx, "receiver")
    messages = [MirrorInput(1, i, i.to_bytes(4, "little") * (1 + i % 700)) for i in range(3000)]

    def produce() -> None:  # as the vCPU thread does
        for m in messages:
            sender.send_threadsafe(m)

    try:
        # The loop is held while the thread sends: what the socket does not
        # take piles up in the outbox, thousands of frames for one sendmsg.
        thread = threading.Thread(target=produce)
        thread.start()
        thread.join()
        got = [await asyncio.wait_for(receiver.next_message(), 10) for _ in messages]
        assert got == messages
        assert sender.failed is None
    finally:
        sender.close()
        receiver.close()
        tx.close()
        rx.close()


@pytest.mark.parametrize("cut", ["mid-record", "after a record"])
async def test_a_peer_that_hangs_up_ends_the_stream_without_a_hang(tmp_path: Path, cut: str) -> None:
    tx, rx, server_sock = await tls_pair(tmp_path)
    link = ThreadSafeLink(rx, "receiver")
    try:
        first = MirrorInput(1, 0, b"complete record")
        wire = tx.encrypt(tx.encoder.encode(first))
        lost = tx.encrypt(tx.encoder.encode(MirrorInput(1, 1, b"lost")))
        tx.sock.sendall(wire + (lost[: len(lost) // 2] if cut == "mid-record" else b""))
        tx.sock.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(link.next_message(), 10) == first
        # A record cut short yields nothing (never part of a frame): a clean end.
        assert await asyncio.wait_for(link.next_message(), 10) is None
    finally:
        link.close()
        tx.close()
        rx.close()
        assert server_sock.fileno() == -1


async def test_a_batch_is_encrypted_in_pieces_that_decrypt_to_it_in_order(tmp_path: Path) -> None:
    a, b, _ = await tls_pair(tmp_path)
    assert a._tls is not None and b._tls is not None
    head = b"header" * 7
    pages = np.random.default_rng(9).integers(0, 256, (300, PAGE_SIZE), dtype=np.uint8)  # 1.2 MiB
    try:
        pieces = a._tls.encrypt([head, memoryview(pages).cast("B"), b"", b"tail"])
        # The memory BIO is emptied every 256 KiB of plaintext: it never holds a whole batch.
        assert len(pieces) >= 4 and max(map(len, pieces)) < (1 << 18) + (1 << 15)
        for piece in pieces:
            b._tls.feed(piece)
        want = len(head) + pages.nbytes + 4
        out = bytearray(want)
        got = 0
        while got < want:
            n = b._tls.decrypt_into(memoryview(out)[got:])
            assert n
            got += n
        assert out == head + pages.tobytes() + b"tail"
    finally:
        a.close()
        b.close()
