"""The client bridge over real sockets, against the real device model.

The guest here is a Python thread playing the firmware's side of the NIC
(an echo service), so the bridge's own behaviour -- connection lifecycle,
output sinks, backpressure both ways -- can be driven precisely. The
firmware itself is exercised through the bridge in test_vm_redis.py.
"""

from __future__ import annotations

import asyncio
import mmap
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from support.ring_guest import RingGuest

from colo_agent.bridge import ClientBridge
from colo_agent.guest import OutputCallback
from colo_agent.microvm import abi
from colo_agent.microvm.devices import INPUT_HIGH_WATER, DeviceModel


@dataclass
class EchoGuest:
    """Echoes every DATA frame; closes a connection that sends b'QUIT'."""

    dev: DeviceModel
    ring: RingGuest
    consuming: threading.Event = field(default_factory=threading.Event)
    stopping: bool = False
    thread: threading.Thread | None = None

    def open_connection(self) -> int:
        return self.dev.open_connection()

    def send_input(self, conn_id: int, data: bytes) -> None:
        self.dev.send_input(conn_id, data)

    def close_connection(self, conn_id: int) -> None:
        self.dev.close_connection(conn_id)

    def set_output_callback(self, callback: OutputCallback) -> None:
        self.dev.set_output_callback(callback)

    def input_full(self, conn_id: int) -> bool:
        return self.dev.input_backlog(conn_id) > INPUT_HIGH_WATER

    def set_input_drained_callback(self, callback: Callable[[int], None] | None) -> None:
        self.dev.set_input_drained_callback(callback)

    def run(self) -> None:
        while not self.stopping:
            self.consuming.wait()
            self.dev.io_out(abi.Port.WAIT, 4, 20_000)
            for conn, kind, payload in self.ring.receive():
                if kind != abi.FrameType.DATA:
                    continue
                if payload == b"QUIT":
                    self.ring.send(conn, abi.FrameType.DATA, b"BYE")
                    self.ring.send(conn, abi.FrameType.CLOSE)
                else:
                    self.ring.send(conn, abi.FrameType.DATA, payload)
                # Replies are small; ring the doorbell before the TX ring can fill.
                self.dev.io_out(abi.Port.TX_DOORBELL, 4, 0)
            self.dev.io_out(abi.Port.TX_DOORBELL, 4, 0)


@pytest.fixture
async def echo() -> AsyncIterator[EchoGuest]:
    ram = memoryview(mmap.mmap(-1, abi.MIN_RAM))
    dev = DeviceModel(ram, on_panic=lambda code: None)
    guest = EchoGuest(dev, RingGuest(ram))
    guest.consuming.set()
    guest.thread = threading.Thread(target=guest.run, daemon=True)
    guest.thread.start()
    yield guest
    guest.stopping = True
    guest.consuming.set()
    dev.interrupt_waits()
    guest.thread.join()


async def _start(guest: EchoGuest, sink: OutputCallback | None = None) -> ClientBridge:
    bridge = ClientBridge(guest, output_sink=sink)
    await bridge.start("127.0.0.1", 0)
    return bridge


async def test_clients_talk_to_the_guest_independently(echo: EchoGuest) -> None:
    bridge = await _start(echo)
    try:
        pairs = [await asyncio.open_connection("127.0.0.1", bridge.port) for _ in range(5)]
        for i, (_, writer) in enumerate(pairs):
            writer.write(f"hello {i}".encode())
        for i, (reader, _) in enumerate(pairs):
            assert await asyncio.wait_for(reader.readexactly(7), 10) == f"hello {i}".encode()
        for _, writer in pairs:
            writer.close()
    finally:
        await bridge.close()


async def test_guest_close_closes_the_client_after_its_data(echo: EchoGuest) -> None:
    bridge = await _start(echo)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"QUIT")
        assert await asyncio.wait_for(reader.read(), 10) == b"BYE"  # read() returns at EOF
        writer.close()
        other_reader, other_writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        other_writer.write(b"still here")
        assert await asyncio.wait_for(other_reader.readexactly(10), 10) == b"still here"
        other_writer.close()
    finally:
        await bridge.close()


async def test_abrupt_client_disconnect_closes_the_guest_connection(echo: EchoGuest) -> None:
    bridge = await _start(echo)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"x")
        await asyncio.wait_for(reader.readexactly(1), 10)
        assert len(echo.dev.open_connections) == 1
        writer.transport.abort()
        for _ in range(200):
            if not echo.dev.open_connections and bridge.connections == 0:
                break
            await asyncio.sleep(0.01)
        assert echo.dev.open_connections == frozenset()
        assert bridge.connections == 0
    finally:
        await bridge.close()


async def test_output_sink_holds_output_until_delivered(echo: EchoGuest) -> None:
    held: list[tuple[int, bytes, bool]] = []
    got_some = threading.Event()

    def hold(conn: int, data: bytes, closed: bool) -> None:
        held.append((conn, data, closed))
        got_some.set()

    bridge = await _start(echo, sink=hold)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"held reply")
        await asyncio.get_running_loop().run_in_executor(None, got_some.wait, 10)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.2)
        for conn, data, closed in held:
            bridge.deliver(conn, data, closed)
        assert await asyncio.wait_for(reader.readexactly(10), 10) == b"held reply"
        writer.close()
    finally:
        await bridge.close()


async def test_a_client_flooding_a_stalled_guest_is_not_read_without_bound(echo: EchoGuest) -> None:
    echo.consuming.clear()  # the guest stops taking input
    echo.dev.interrupt_waits()
    bridge = await _start(echo)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        await asyncio.sleep(0.05)
        conn = next(iter(echo.dev.open_connections))
        writer.transport.set_write_buffer_limits(high=64 << 20)
        blob = b"f" * (8 * INPUT_HIGH_WATER)
        writer.write(blob)
        for _ in range(600):
            if echo.dev.input_backlog(conn) > INPUT_HIGH_WATER:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        # The bridge stopped reading: the rest waits in TCP buffers and ours.
        backlog = echo.dev.input_backlog(conn)
        assert INPUT_HIGH_WATER < backlog < len(blob)
        echo.dev.allow_waits()
        echo.consuming.set()
        echoed = await asyncio.wait_for(reader.readexactly(len(blob)), 60)
        assert echoed == blob
        writer.close()
    finally:
        await bridge.close()


async def test_a_client_that_does_not_read_stops_being_read(echo: EchoGuest) -> None:
    bridge = await _start(echo)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port, limit=1 << 16)
        # Never read replies; keep writing. The echo fills our receive window,
        # the bridge's write buffer, then the bridge must stop reading us.
        writer.transport.set_write_buffer_limits(high=256 << 20)
        writer.write(b"e" * (64 << 20))
        await asyncio.sleep(2.0)
        conn = next(iter(echo.dev.open_connections))
        unsent = writer.transport.get_write_buffer_size()
        assert unsent > 0, "the bridge kept reading although the client never reads"
        assert echo.dev.input_backlog(conn) <= INPUT_HIGH_WATER + (1 << 16)
        # What the guest wrote for us waits in a bounded buffer, not in all of the 64 MiB echoed.
        assert len(bridge._clients[conn].outbuf) < 4 << 20
        writer.transport.abort()
    finally:
        await bridge.close()
