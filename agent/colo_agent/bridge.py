"""Client TCP connections <-> the guest's NIC.

Each accepted client becomes a connection of the guest's `ClientNic`: its
bytes go to the guest as RX frames, and what the guest writes on that
connection goes back to it.

Guest output passes through an *output sink* on its way to the socket. The
default sink releases at once; the replication engine installs one that
holds output until the epoch that produced it is acknowledged (or matched by
the secondary) and then hands it to `ClientBridge.deliver`. The sink is
called in the vCPU thread, at the moment the NIC drains the output, which is
what lets the engine tag each chunk with the epoch open at that instant.

Threads: the event loop accepts clients and reads their input. Output is
written straight from the thread that delivers it (the vCPU thread, for the
default sink) with a non-blocking send; only what the socket does not take
at once is left for the loop to write when the socket drains. Handing every
reply to the loop instead costs a thread wake-up and a GIL hand-off per
request, which measured as half the throughput.

Backpressure: a client that sends faster than the guest consumes stops being
read once the NIC says its queued input is full (`input_full`); a client
that does not read its replies stops being read once its unsent
output passes OUTPUT_HIGH_WATER, so the guest gets no new requests to answer
for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Callable

from colo_agent.guest import ClientNic, OutputCallback

log = logging.getLogger(__name__)

OUTPUT_HIGH_WATER = 1 << 20
OUTPUT_LOW_WATER = 256 << 10
READ_SIZE = 256 << 10
ACCEPT_BACKLOG = 512



class _Client:
    """One client socket. `lock` orders sends from any thread against close."""

    __slots__ = (
        "close_when_flushed",
        "closed",
        "conn_id",
        "guest_closed",
        "held",
        "lock",
        "outbuf",
        "reading",
        "sock",
        "writer_armed",
    )

    def __init__(self, sock: socket.socket, conn_id: int) -> None:
        self.sock = sock
        self.conn_id = conn_id
        self.lock = threading.Lock()
        self.outbuf = bytearray()
        self.closed = False
        self.close_when_flushed = False
        self.guest_closed = False
        self.writer_armed = False
        self.reading = False
        # Reasons not to read from this client: "input" (the guest has not
        # consumed what we queued) and "output" (the client does not read).
        self.held: set[str] = set()


class ClientBridge:
    """A TCP listener whose connections are the guest's NIC connections."""

    def __init__(self, guest: ClientNic, *, output_sink: OutputCallback | None = None) -> None:
        self.guest = guest
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._clients_lock = threading.Lock()
        self.accepted = 0  # clients ever accepted
        self._sink: OutputCallback = output_sink or self.deliver
        guest.set_output_callback(self._sink)
        guest.set_input_drained_callback(self._input_drained)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=ACCEPT_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._loop.add_reader(listener.fileno(), self._accept)

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the bridge is not listening")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        return len(self._clients)

    async def close(self) -> None:
        """Stop listening and drop every client (their connections close in the guest too)."""
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        with self._clients_lock:
            clients = list(self._clients.values())
        for client in clients:
            self._close(client)

    def deliver(self, conn_id: int, data: bytes, closed: bool) -> None:
        """Write guest output to its client now, from any thread; `closed` closes it after the data."""
        client = self._clients.get(conn_id)
        if client is None:
            return  # the client went away; the guest hears of it through CLOSE
        schedule: Callable[[_Client], None] | None = None
        with client.lock:
            if client.closed:
                return
            if closed:
                client.guest_closed = True
                client.close_when_flushed = True
            if data:
                if client.outbuf:
                    client.outbuf += data
                else:
                    try:
                        sent = client.sock.send(data)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError as exc:
                        # Reset by the peer, say: the loop sees it too and closes.
                        log.debug("client %d: send failed: %s", conn_id, exc)
                        sent = len(data)
                        client.close_when_flushed = True
                    if sent < len(data):
                        client.outbuf += memoryview(data)[sent:]
            if client.outbuf:
                if not client.writer_armed:
                    client.writer_armed = True
                    schedule = self._arm_writer
            elif client.close_when_flushed:
                schedule = self._close
            over = len(client.outbuf) > OUTPUT_HIGH_WATER and "output" not in client.held
        if over:
            self._call_in_loop(self._hold, client, "output")
        if schedule is not None:
            self._call_in_loop(schedule, client)

    # ---- loop thread ----------------------------------------------------------------------------

    def _call_in_loop(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        # A closed loop means the agent is shutting down and the clients are gone.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _accept(self) -> None:
        listener = self._listener
        loop = self._loop
        if listener is None or loop is None:
            return
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: refuse this one, keep listening.
                log.warning("accepting a client failed: %s", exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.accepted += 1
            client = _Client(sock, self.guest.open_connection())
            with self._clients_lock:
                self._clients[client.conn_id] = client
            client.reading = True
            loop.add_reader(sock.fileno(), self._readable, client)

    def _readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("client %d: receive failed: %s", client.conn_id, exc)
            data = b""
        if not data:
            # EOF or reset. The NIC has no half-close, so a client that shuts
            # down its sending side is gone, as for Redis: replies still being
            # computed for it are dropped.
            self._close(client)
            return
        self.guest.send_input(client.conn_id, data)
        if self.guest.input_full(client.conn_id):
            self._hold(client, "input")

    def _writable(self, client: _Client) -> None:
        close = False
        with client.lock:
            if client.closed:
                return
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("client %d: send failed: %s", client.conn_id, exc)
                client.outbuf.clear()
                close = True
            else:
                del client.outbuf[:sent]
            pending = len(client.outbuf)
            if not pending:
                client.writer_armed = False
                close = close or client.close_when_flushed
        if not pending and self._loop is not None:
            self._loop.remove_writer(client.sock.fileno())
        if close:
            self._close(client)
        elif pending <= OUTPUT_LOW_WATER:
            self._release(client, "output")

    def _arm_writer(self, client: _Client) -> None:
        if self._loop is not None and not client.closed:
            self._loop.add_writer(client.sock.fileno(), self._writable, client)

    def _hold(self, client: _Client, reason: str) -> None:
        client.held.add(reason)
        if client.reading and self._loop is not None and not client.closed:
            client.reading = False
            self._loop.remove_reader(client.sock.fileno())

    def _release(self, client: _Client, reason: str) -> None:
        if reason not in client.held:
            return
        client.held.discard(reason)
        if not client.held and not client.reading and self._loop is not None and not client.closed:
            client.reading = True
            self._loop.add_reader(client.sock.fileno(), self._readable, client)

    def _close(self, client: _Client) -> None:
        loop = self._loop
        with client.lock:
            if client.closed:
                return
            client.closed = True
            fd = client.sock.fileno()
            if loop is not None and fd >= 0:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
            client.sock.close()
            client.outbuf.clear()
        with self._clients_lock:
            if self._clients.get(client.conn_id) is client:
                del self._clients[client.conn_id]
        if not client.guest_closed:
            self.guest.close_connection(client.conn_id)

    def _input_drained(self, conn_id: int) -> None:
        client = self._clients.get(conn_id)
        if client is not None:
            self._call_in_loop(self._release, client, "input")
