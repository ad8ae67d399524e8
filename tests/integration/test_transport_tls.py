"""Mutual TLS on the replication stream over real sockets: pairing, refusal, rotation, no clear bytes."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import numpy as np
import pytest
from support.tls_certs import now, operator_dir, vm_dir
from support.transport import PAGE, PAGES, SECRET, VM, Guest, pair

from colo_agent.replication.cache import ColoCache, image_digest
from colo_agent.replication.handshake import AuthRefused
from colo_agent.replication.transport import CheckpointReceiver, CheckpointSender, Listener, PeerLostError
from colo_agent.tls import PeerTls, TlsFiles
from colo_operator import certs


@pytest.fixture
def ca() -> certs.KeyPair:
    return certs.new_ca(now())


def tls_for(directory: Path, vm: str = VM) -> PeerTls:
    return PeerTls.for_vm(TlsFiles(directory), vm)


def new_receiver(tls: PeerTls | None) -> tuple[CheckpointReceiver, bytearray]:
    mem = bytearray(PAGES * PAGE)
    return CheckpointReceiver(ColoCache(mem, capacity=512), secret=SECRET, vm=VM, term=1, tls=tls), mem


async def refused_both_ways(rx_tls: PeerTls | None, tx_tls: PeerTls | None) -> None:
    """A secondary with `rx_tls` dials a primary with `tx_tls`: both refuse the pairing."""
    rx, mem = new_receiver(rx_tls)
    listener = Listener("127.0.0.1", 0)
    accepting = asyncio.create_task(CheckpointSender.accept(
        listener, secret=SECRET, vm=VM, term=1, page_count=PAGES, channels=1, tls=tx_tls
    ))  # fmt: skip
    try:
        with pytest.raises((AuthRefused, ssl.SSLError, ConnectionError, OSError)):
            await rx.dial("127.0.0.1", listener.port)
        await asyncio.sleep(0.1)
        assert not accepting.done()  # the primary still waits for its own secondary
        assert rx.session is None and not any(mem)  # nothing paired, nothing written
    finally:
        accepting.cancel()
        listener.close()
        await rx.close()


class Tap:
    """A TCP relay that records every byte the primary sends."""

    def __init__(self) -> None:
        self.target = 0
        self.seen = bytearray()

    async def start(self, target: int) -> int:
        """Relay to `target`; returns the port to dial instead."""
        self.target = target
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.server = server
        return int(server.sockets[0].getsockname()[1])

    async def _relay(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if record:
                        self.seen += data
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(ur, w, True), pipe(r, uw, False))


class CorruptingTap(Tap):
    """A relay that, once armed, flips one bit of the next large piece the primary sends."""

    armed = False

    async def _relay(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_primary: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if from_primary and self.armed and len(data) >= 4096:  # page data, not a heartbeat
                        self.armed = False
                        data = bytearray(data)
                        data[len(data) // 2] ^= 0x10
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(ur, w, True), pipe(r, uw, False))


async def test_over_tls_epochs_commit_whole_and_a_flipped_bit_never_reaches_ram(
    tmp_path: Path, ca: certs.KeyPair
) -> None:
    """Page data is outside the frame checksums over TLS (the records' AEAD tags cover
    it): epochs over 3 channels still commit exactly the primary's pages, and a bit
    flipped on the wire ends the pairing instead of landing in the committed image."""
    tls = tls_for(vm_dir(tmp_path / "vm", ca, VM))
    rx, mem = new_receiver(tls)
    tap = CorruptingTap()
    guest = Guest(seed=4)
    sender = await pair(rx, tls=tls, through=tap.start, channels=3, batch_pages=16)
    await sender.sync(guest.ram, guest.collect_dirty)
    for _ in range(3):
        guest.write(400)
        epoch, digest = await guest.checkpoint(sender)
        assert rx.committed_epoch == epoch
        assert image_digest(mem) == digest
    committed = image_digest(mem)
    guest.write(400)
    tap.armed = True
    with pytest.raises(PeerLostError):
        await asyncio.wait_for(guest.checkpoint(sender), 30)
    assert not tap.armed  # the flip happened
    assert rx.committed_epoch == epoch and image_digest(mem) == committed
    await sender.close()
    await rx.close()


MARKER = b"guest-secret-" * 315  # most of one page, easy to find in a capture


@pytest.mark.parametrize("encrypted", [True, False])
async def test_guest_memory_crosses_the_wire_only_encrypted(
    tmp_path: Path, ca: certs.KeyPair, encrypted: bool
) -> None:
    tls = tls_for(vm_dir(tmp_path / "vm", ca, VM)) if encrypted else None
    rx, mem = new_receiver(tls)
    tap = Tap()
    guest = Guest()
    guest.ram[7, : len(MARKER)] = np.frombuffer(MARKER, dtype=np.uint8)
    sender = await pair(rx, tls=tls, through=tap.start)
    await sender.sync(guest.ram, guest.collect_dirty)
    guest.ram[9, : len(MARKER)] = np.frombuffer(MARKER, dtype=np.uint8)
    guest.dirty[9] = True
    epoch, digest = await guest.checkpoint(sender)
    assert rx.committed_epoch == epoch  # the ACK send_epoch waited for follows the commit
    assert image_digest(mem) == digest
    assert (MARKER in tap.seen) is not encrypted
    await sender.close()
    await rx.close()


async def test_a_certificate_of_another_vm_is_refused_both_ways(tmp_path: Path, ca: certs.KeyPair) -> None:
    own = tls_for(vm_dir(tmp_path / "a", ca, VM))
    other = tls_for(vm_dir(tmp_path / "b", ca, "tests/other-vm"), VM)
    await refused_both_ways(own, other)  # a primary of another VM
    await refused_both_ways(other, own)  # a secondary of another VM


async def test_a_certificate_of_another_ca_or_none_is_refused(tmp_path: Path, ca: certs.KeyPair) -> None:
    own = tls_for(vm_dir(tmp_path / "a", ca, VM))
    foreign = tls_for(vm_dir(tmp_path / "f", certs.new_ca(now()), VM))
    await refused_both_ways(own, foreign)
    await refused_both_ways(foreign, own)
    await refused_both_ways(own, None)  # clear text to a TLS peer
    await refused_both_ways(None, own)
    # The operator's own certificate is no agent of this VM either.
    await refused_both_ways(own, tls_for(operator_dir(tmp_path / "op", ca)))


def _presented_serial(port: int, client_dir: Path) -> int:
    from cryptography import x509

    ctx = TlsFiles(client_dir).client_context()
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


async def test_a_renewed_certificate_is_used_from_the_next_pairing(tmp_path: Path, ca: certs.KeyPair) -> None:
    rx_dir = vm_dir(tmp_path / "rx", ca, VM)
    tx_dir = vm_dir(tmp_path / "tx", ca, VM)
    rx, mem = new_receiver(tls_for(rx_dir))
    tx_tls = tls_for(tx_dir)
    listener = Listener("127.0.0.1", 0)
    guest = Guest()

    async def next_pairing() -> tuple[CheckpointSender, int]:
        """A pairing, and the certificate the primary's port presented while it waited."""
        accepting = asyncio.create_task(CheckpointSender.accept(
            listener, secret=SECRET, vm=VM, term=1, page_count=PAGES, channels=2, tls=tx_tls
        ))  # fmt: skip
        # A probe that leaves after the TLS handshake: its channel goes to the next dialer.
        presented = await asyncio.to_thread(_presented_serial, listener.port, rx_dir)
        await rx.dial("127.0.0.1", listener.port)
        return await asyncio.wait_for(accepting, 30), presented

    try:
        first_serial = certs.KeyPair((tx_dir / "tls.crt").read_bytes(), b"").cert.serial_number
        sender, presented = await next_pairing()
        assert presented == first_serial
        await sender.sync(guest.ram, guest.collect_dirty)

        vm_dir(tx_dir, ca, VM)  # the Secret is renewed: new key, new certificate, same name
        renewed = certs.KeyPair((tx_dir / "tls.crt").read_bytes(), b"").cert.serial_number
        assert renewed != first_serial
        guest.write(50)
        epoch, digest = await guest.checkpoint(sender)  # the open pairing keeps streaming, encrypted
        assert rx.committed_epoch == epoch  # the ACK send_epoch waited for follows the commit
        assert image_digest(mem) == digest
        await sender.close()

        sender, presented = await next_pairing()  # the next pairing runs on the renewed certificate
        assert presented == renewed
        await sender.sync(guest.ram, guest.collect_dirty)
        epoch, digest = await guest.checkpoint(sender)
        assert rx.committed_epoch == epoch  # the ACK send_epoch waited for follows the commit
        assert image_digest(mem) == digest
        await sender.close()
    finally:
        listener.close()
        await rx.close()
