"""Client TCP connections <-> the guest's NIC.

Each accepted client becomes a NIC connection: its bytes go to the guest as
RX frames, and what the guest writes on that connection goes back to it.

Guest output passes through an *output sink* on its way to the socket. The
default sink releases at once; the replication engine installs one that
holds output until the epoch that produced it is acknowledged (or matched by
the secondary) and then hands it to `ClientBridge.deliver`. The sink is
called in the vCPU thread, at the moment the NIC drains the output, which is
what lets the engine tag each chunk with the epoch open at that instant.

Backpressure: a client that sends faster than the guest consumes stops being
read once its queued input passes the device model's high-water mark; a
client that does not read its replies stops being read once its socket's
write buffer is full, so the guest gets no new requests to answer for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol

from colo_agent.guest import OutputCallback
from colo_agent.microvm.devices import INPUT_HIGH_WATER

log = logging.getLogger(__name__)


class BridgedGuest(Protocol):
    """What the bridge needs from a guest: the Guest NIC methods plus input backpressure."""

    def open_connection(self) -> int: ...

    def send_input(self, conn_id: int, data: bytes) -> None: ...

    def close_connection(self, conn_id: int) -> None: ...

    def set_output_callback(self, callback: OutputCallback) -> None: ...

    def input_backlog(self, conn_id: int) -> int: ...

    def set_input_drained_callback(self, callback: Callable[[int], None] | None) -> None: ...


class _Client(asyncio.Protocol):
    def __init__(self, bridge: ClientBridge) -> None:
        self._bridge = bridge
        self.transport: asyncio.Transport | None = None
        self.conn_id = 0
        self.guest_closed = False
        # Reasons reading from this client is paused: "input" (the guest has
        # not consumed what we queued) and "output" (the client does not read).
        self._held: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn_id = self._bridge._attach(self)

    def data_received(self, data: bytes) -> None:
        guest = self._bridge.guest
        guest.send_input(self.conn_id, data)
        if guest.input_backlog(self.conn_id) > INPUT_HIGH_WATER:
            self.hold("input")

    def eof_received(self) -> bool:
        # The NIC has no half-close, so a client that shuts down its sending
        # side is treated as gone, as Redis does: replies still being computed
        # for it are dropped.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._bridge._detach(self)

    def pause_writing(self) -> None:
        self.hold("output")

    def resume_writing(self) -> None:
        self.release("output")

    def hold(self, reason: str) -> None:
        if not self._held and self.transport is not None:
            self.transport.pause_reading()
        self._held.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self._held:
            return
        self._held.discard(reason)
        if not self._held and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class ClientBridge:
    """An asyncio TCP listener whose connections are the guest's NIC connections."""

    def __init__(self, guest: BridgedGuest, *, output_sink: OutputCallback | None = None) -> None:
        self.guest = guest
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._clients: dict[int, _Client] = {}
        # Output handed over by other threads, flushed by one loop callback
        # per burst rather than one per chunk.
        self._outbox: list[tuple[int, bytes, bool]] = []
        self._outbox_lock = threading.Lock()
        self._flush_scheduled = False
        self._sink: OutputCallback = output_sink or self.deliver
        guest.set_output_callback(self._sink)
        guest.set_input_drained_callback(self._input_drained)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Client(self), host, port)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the bridge is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        return len(self._clients)

    async def close(self) -> None:
        """Stop listening and drop every client (their connections close in the guest too)."""
        if self._server is not None:
            self._server.close()
        for client in list(self._clients.values()):
            if client.transport is not None:
                client.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        # connection_lost callbacks of the aborted transports run on the next iterations.
        await asyncio.sleep(0)

    def deliver(self, conn_id: int, data: bytes, closed: bool) -> None:
        """Write guest output to its client now (any thread); `closed` closes it after the data."""
        loop = self._loop
        if loop is None:
            return
        with self._outbox_lock:
            self._outbox.append((conn_id, data, closed))
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        # A closed loop means the agent is shutting down and the clients are gone.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._flush)

    # ---- loop thread ----------------------------------------------------------------------------

    def _attach(self, client: _Client) -> int:
        conn = self.guest.open_connection()
        self._clients[conn] = client
        return conn

    def _detach(self, client: _Client) -> None:
        if self._clients.get(client.conn_id) is client:
            del self._clients[client.conn_id]
        if not client.guest_closed:
            self.guest.close_connection(client.conn_id)

    def _flush(self) -> None:
        with self._outbox_lock:
            batch, self._outbox = self._outbox, []
            self._flush_scheduled = False
        # Coalesce per connection: one write (one send) per client per burst.
        pending: dict[int, list[bytes]] = {}
        closing: list[int] = []
        for conn, data, closed in batch:
            if data:
                pending.setdefault(conn, []).append(data)
            if closed:
                closing.append(conn)
                pending.setdefault(conn, [])
        for conn, chunks in pending.items():
            client = self._clients.get(conn)
            if client is None or client.transport is None or client.transport.is_closing():
                continue  # the client went away; the guest hears of it through CLOSE
            if chunks:
                client.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        for conn in closing:
            client = self._clients.get(conn)
            if client is not None and client.transport is not None:
                client.guest_closed = True
                client.transport.close()  # after the buffered replies are sent

    def _input_drained(self, conn_id: int) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._resume_input, conn_id)

    def _resume_input(self, conn_id: int) -> None:
        client = self._clients.get(conn_id)
        if client is not None:
            client.release("input")
