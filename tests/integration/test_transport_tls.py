"""Mutual TLS on the replication stream over real sockets: pairing, refusal, rotation, no clear bytes."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import numpy as np
import pytest
from support.tls_certs import now, operator_dir, vm_dir
from support.transport import PAGE, PAGES, SECRET, VM, Guest

from colo_agent.replication.cache import ColoCache, image_digest
from colo_agent.replication.handshake import AuthRefused
from colo_agent.replication.transport import CheckpointReceiver, CheckpointSender
from colo_agent.tls import PeerTls, TlsFiles
from colo_operator import certs


@pytest.fixture
def ca() -> certs.KeyPair:
    return certs.new_ca(now())


def tls_for(directory: Path, vm: str = VM) -> PeerTls:
    return PeerTls.for_vm(TlsFiles(directory), vm)


async def start_receiver(tls: PeerTls | None) -> tuple[CheckpointReceiver, int, bytearray]:
    mem = bytearray(PAGES * PAGE)
    rx = CheckpointReceiver(ColoCache(mem, capacity=512), secret=SECRET, vm=VM, term=1, tls=tls)
    return rx, await rx.start(), mem


async def connect(port: int, tls: PeerTls | None, **kw: object) -> CheckpointSender:
    return await CheckpointSender.connect(
        "127.0.0.1", port, secret=SECRET, vm=VM, term=1, page_count=PAGES, channels=2, tls=tls, **kw  # type: ignore[arg-type]
    )


class Tap:
    """A TCP relay that records every byte the primary sends."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.seen = bytearray()

    async def start(self) -> int:
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

        await asyncio.gather(pipe(r, uw, True), pipe(ur, w, False))


MARKER = b"guest-secret-" * 315  # most of one page, easy to find in a capture


@pytest.mark.parametrize("encrypted", [True, False])
async def test_guest_memory_crosses_the_wire_only_encrypted(
    tmp_path: Path, ca: certs.KeyPair, encrypted: bool
) -> None:
    tls = tls_for(vm_dir(tmp_path / "vm", ca, VM)) if encrypted else None
    rx, port, mem = await start_receiver(tls)
    tap = Tap(port)
    guest = Guest()
    guest.ram[7, : len(MARKER)] = np.frombuffer(MARKER, dtype=np.uint8)
    sender = await connect(await tap.start(), tls)
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
    rx, port, mem = await start_receiver(tls_for(vm_dir(tmp_path / "a", ca, VM)))
    other = tls_for(vm_dir(tmp_path / "b", ca, "tests/other-vm"), VM)
    with pytest.raises((AuthRefused, ssl.SSLError, ConnectionError)):
        await connect(port, other)
    await asyncio.sleep(0.1)
    assert rx.session is None and not any(mem)  # nothing paired, nothing written

    # The primary refuses a secondary of another VM just as well.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    own = tls_for(vm_dir(tmp_path / "c", ca, VM))
    accepting = asyncio.create_task(
        CheckpointSender.accept(
            listener, secret=SECRET, vm=VM, term=1, page_count=PAGES, channels=1, tls=own, join_timeout=1.0
        )
    )
    intruder_rx = CheckpointReceiver(ColoCache(bytearray(PAGES * PAGE), capacity=64), secret=SECRET,
                                     vm=VM, term=1, tls=other)  # fmt: skip
    with pytest.raises((AuthRefused, ssl.SSLError, ConnectionError)):
        await intruder_rx.dial("127.0.0.1", listener.getsockname()[1])
    assert not accepting.done()  # still waiting for its own secondary
    accepting.cancel()
    listener.close()
    await rx.close()


async def test_a_certificate_of_another_ca_or_none_is_refused(tmp_path: Path, ca: certs.KeyPair) -> None:
    rx, port, _ = await start_receiver(tls_for(vm_dir(tmp_path / "a", ca, VM)))
    foreign = tls_for(vm_dir(tmp_path / "f", certs.new_ca(now()), VM))
    with pytest.raises((AuthRefused, ssl.SSLError, ConnectionError)):
        await connect(port, foreign)
    with pytest.raises((AuthRefused, ConnectionError, OSError)):
        await connect(port, None)  # clear text to a TLS port
    # The operator's own certificate is no agent of this VM either.
    with pytest.raises((AuthRefused, ssl.SSLError, ConnectionError)):
        await connect(port, tls_for(operator_dir(tmp_path / "op", ca)))
    assert rx.session is None
    await rx.close()


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
    rx, port, mem = await start_receiver(tls_for(rx_dir))
    first_serial = certs.KeyPair((rx_dir / "tls.crt").read_bytes(), b"").cert.serial_number
    guest = Guest()
    tx_tls = tls_for(tx_dir)
    sender = await connect(port, tx_tls)
    await sender.sync(guest.ram, guest.collect_dirty)
    assert await asyncio.to_thread(_presented_serial, port, tx_dir) == first_serial

    vm_dir(rx_dir, ca, VM)  # the Secret is renewed: new key, new certificate, same name
    renewed = certs.KeyPair((rx_dir / "tls.crt").read_bytes(), b"").cert.serial_number
    assert renewed != first_serial
    guest.write(50)
    epoch, digest = await guest.checkpoint(sender)  # the open pairing keeps streaming, encrypted
    assert rx.committed_epoch == epoch  # the ACK send_epoch waited for follows the commit
    assert image_digest(mem) == digest
    await sender.close()

    assert await asyncio.to_thread(_presented_serial, port, tx_dir) == renewed
    sender = await connect(port, tx_tls)  # the next pairing runs on the renewed certificate
    await sender.sync(guest.ram, guest.collect_dirty)
    epoch, digest = await guest.checkpoint(sender)
    assert rx.committed_epoch == epoch  # the ACK send_epoch waited for follows the commit
    assert image_digest(mem) == digest
    await sender.close()
    await rx.close()
