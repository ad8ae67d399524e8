"""asyncio transport of the replication stream: the only module here doing I/O.

A pairing is one control connection, `channels` data connections and one
heartbeat connection, each authenticated on connect (`handshake`). The
sessions decide; this module moves bytes and reads the clock:

- Sends go out with `socket.sendmsg` of the frame header and a memoryview of
  the staged pages, never concatenated.
- Page data is received straight into the destination the session picked (a
  cache slot or guest RAM) with `recv_into`; only headers pass through a
  small buffer, read no further than `FrameDecoder.wanted()`.
- Raw non-blocking sockets on the event loop (`sock_recv_into`, a writer
  callback around `sendmsg`): asyncio streams would copy every byte again.
- Yank: when a session gives up on its peer (heartbeat timeout, epoch not
  acknowledged, connection lost) every socket of the pairing is shut down
  and its tasks cancelled, so nothing stays blocked on a stopped peer.

`CheckpointSender` is the primary's end, `CheckpointReceiver` the
secondary's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from colo_agent.constants import HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS
from colo_agent.replication.cache import ColoCache, PageArray
from colo_agent.replication.handshake import AuthRefused, ClientHandshake, Policy, ServerHandshake
from colo_agent.replication.protocol import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    AuthOk,
    ChannelKind,
    Event,
    FrameDecoder,
    FrameEncoder,
    Hello,
    LocalProtocolError,
    Message,
    MessageType,
    NeedData,
    Pages,
    PagesHeader,
    Refused,
    RefuseReason,
    RemoteProtocolError,
    Role,
    is_message,
)
from colo_agent.replication.session import (
    CONTROL,
    HEARTBEAT,
    Action,
    Channel,
    Closed,
    CommitEpoch,
    EpochRejected,
    PeerLost,
    PrimarySession,
    Promoted,
    ReleaseOutput,
    SecondarySession,
    Send,
    SendLivePages,
    SyncComplete,
    Yank,
    data_channel,
)
from colo_agent.replication.stream import StreamSession, TargetKnown
from colo_agent.tls import PeerTls, wait_ready
from colo_agent.tls_stream import TlsStream, secure

log = logging.getLogger(__name__)

MIRROR = Channel(ChannelKind.MIRROR)

Clock = Callable[[], float]
HANDSHAKE_TIMEOUT = 5.0
_SCRATCH = 1 << 16
# Ciphertext is read from the socket this much at a time.
_CIPHERTEXT_READ = 1 << 18
_IOV_MAX = 1024
_YIELD_EVERY = 1 << 20


class PeerLostError(ConnectionError):
    """The pairing is over: the peer stopped answering, refused, or went away."""


# -- one connection -------------------------------------------------------------------


class Connection:
    """A non-blocking TCP socket with framed sends and in-place receives.

    Over TLS (a `TlsStream`) the socket stays the same plain one and
    carries ciphertext in large reads and writes; sends encrypt from the
    caller's buffers and receives decrypt into the destination, on the
    loop's thread: ciphering on a thread of the connection was measured
    slower and dearer, each 16 KiB record handing the GIL back and forth
    with the loop.
    """

    def __init__(self, sock: socket.socket, name: str, tls: TlsStream | None = None) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.name = name
        # Over TLS every record's AEAD tag authenticates the page data: no second hash.
        self.encoder = FrameEncoder(cover_page_data=tls is None)
        self.decoder = FrameDecoder(cover_page_data=tls is None)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._scratch = bytearray(_SCRATCH)
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._tls = tls
        self._ciphertext = memoryview(bytearray(_CIPHERTEXT_READ)) if tls is not None else None
        self._unyielded = 0

    @property
    def tls(self) -> bool:
        return self._tls is not None

    async def send(self, msg: Message) -> None:
        await self.sendmsg(self._frames([msg]))

    async def send_pages(self, msg: Pages) -> None:
        await self.sendmsg(self._frames([msg]))

    async def sendmsg(self, buffers: list[bytes | memoryview]) -> None:
        """Send every buffer, in order, without joining them (over TLS: their records)."""
        await self.send_wire(self._on_wire(buffers))

    def _frames(self, msgs: Sequence[Message]) -> list[bytes | memoryview]:
        """The frames of `msgs`, numbered in order (PAGES: header and page data apart)."""
        buffers: list[bytes | memoryview] = []
        for msg in msgs:
            if isinstance(msg, Pages):
                buffers += self.encoder.encode_pages(msg)[0]
            else:
                buffers.append(self.encoder.encode(msg))
        return buffers

    def _on_wire(self, buffers: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """What goes on the wire for `buffers`: themselves, or over TLS their records."""
        return buffers if self._tls is None else [*self._tls.encrypt(buffers)]

    def encrypt(self, data: bytes) -> bytes:
        """What goes on the wire for `data` (itself in clear); any thread, in
        the order the wire will carry it (see `ThreadSafeLink`)."""
        return data if self._tls is None else b"".join(self._tls.encrypt([data]))

    async def send_wire(self, buffers: list[bytes | memoryview]) -> None:
        """Send bytes as they are (ciphertext already, over TLS), in order."""
        views = [memoryview(b).cast("B") for b in buffers]
        while views:
            try:
                self._sendmsg(views)
            except (BlockingIOError, InterruptedError):
                await self._writable()

    def send_now(self, msgs: Sequence[Message]) -> list[memoryview]:
        """Encode `msgs` and hand what the socket takes of them to the kernel at once,
        in one call, without waiting; returns the wire bytes still to send
        (`send_wire`), in order. A failing socket is left to `send_wire`, which
        meets the error again and raises it where a writer reports it."""
        views = [memoryview(b).cast("B") for b in self._on_wire(self._frames(msgs))]
        with contextlib.suppress(OSError):
            self._sendmsg(views)
        return views

    def _sendmsg(self, views: list[memoryview]) -> None:
        """One sendmsg; drops from `views` what it sent."""
        # At most IOV_MAX buffers a call (EMSGSIZE beyond): a busy
        # mirror link's outbox holds thousands of small frames.
        n = self.sock.sendmsg(views[:_IOV_MAX] if len(views) > _IOV_MAX else views)
        self.bytes_sent += n
        while n:
            first = views[0]
            if n >= len(first):
                n -= len(first)
                views.pop(0)
            else:
                views[0] = first[n:]
                n = 0

    async def _writable(self) -> None:
        await wait_ready(self.sock, write=True)

    async def _recv_into(self, buf: memoryview) -> int:
        if self._tls is not None:
            return await self._tls_recv_into(self._tls, buf)
        n = await self._loop.sock_recv_into(self.sock, buf)
        self.bytes_received += n
        return n

    async def _tls_recv_into(self, tls: TlsStream, buf: memoryview) -> int:
        # Decrypt first: ciphertext may be waiting in the stream while the
        # socket itself has nothing to read.
        raw = self._ciphertext
        assert raw is not None
        while True:
            n = tls.decrypt_into(buf)
            if n is not None:
                break
            got = await self._loop.sock_recv_into(self.sock, raw)
            if got:
                tls.feed(raw[:got])
            else:
                tls.feed_eof()
        self.bytes_received += n
        self._unyielded += n
        if self._unyielded >= _YIELD_EVERY:
            # Ciphertext already read never makes the loop wait: a stream that
            # never runs dry would never suspend this task. Let the heartbeat
            # and the other channels run.
            self._unyielded = 0
            await asyncio.sleep(0)
        return n

    async def next_event(
        self, on_pages: Callable[[PagesHeader], memoryview | None] | None = None
    ) -> Event | None:
        """The next decoded event, or None at a clean end of stream.

        Page data is received into the destination `on_pages` returns for
        its header (None: read and discard); the call then returns the
        `PagesComplete`, or raises the (resumable) checksum error.
        """
        dec = self.decoder
        while True:
            ev = dec.next_event()
            if isinstance(ev, PagesHeader):
                if on_pages is None:
                    raise RemoteProtocolError(f"{self.name}: page data where none is expected")
                dec.begin_payload(on_pages(ev))
                continue
            if not isinstance(ev, NeedData):
                return ev
            if dec.expecting_payload:
                n = await self._recv_into(dec.payload_buffer())
                if n == 0:
                    dec.eof()
                dec.payload_written(n)
            else:
                view = memoryview(self._scratch)[: min(max(dec.wanted(), 1), _SCRATCH)]
                n = await self._recv_into(view)
                if n == 0:
                    dec.eof()
                    return None
                dec.receive(view[:n])

    def yank(self) -> None:
        """Shut the socket down so that any task blocked on it wakes up."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.yank()
            if (fd := self.sock.fileno()) >= 0:
                # Drop the waiters' registrations before the descriptor goes:
                # a new connection may get its number at once, and a stale
                # registration would make the loop fail on it (ENOENT).
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
            self.sock.close()


class ThreadSafeLink:
    """Messages to and from one connection, sent from any thread.

    For a peer that must not wait on the event loop (lockstep's mirror: the
    vCPU thread sends mirrored input and the secondary's output as it
    produces them). A send goes out at once with a non-blocking send: a hop
    through the loop would add two thread wake-ups to every request. Only
    what the socket does not take waits in the outbox for the loop's writer;
    nothing is sent directly while the outbox is not empty or the writer is
    sending, so sends never reorder. Frames are numbered under the same lock,
    in the order they go out; over TLS the calling thread encrypts them
    there too, so records go out in the order they were made. Receiving
    happens on the loop.
    """

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._outbox: list[bytes | memoryview] = []
        self._writing = False
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._writer_task = asyncio.ensure_future(self._writer())
        self._writer_task.set_name(f"{name} writer")

    def send_threadsafe(self, msg: Message) -> None:
        """Send `msg` after everything sent before, from any thread.

        Raises `LocalProtocolError` for a message the codec refuses.
        """
        with self._lock:
            if self.failed is not None:
                return
            out: bytes | memoryview = self.conn.encrypt(self.conn.encoder.encode(msg))
            if not self._outbox and not self._writing:
                try:
                    sent = self.conn.sock.send(out)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self.failed = f"send failed: {exc}"
                    return
                if sent == len(out):
                    return
                out = memoryview(out)[sent:]
            self._outbox.append(out)
        with contextlib.suppress(RuntimeError):  # loop closed: shutting down
            self._loop.call_soon_threadsafe(self._wake.set)

    async def next_message(self) -> Message | None:
        """Loop only: the next message, or None at a clean end of the stream.

        Raises `RemoteProtocolError` for anything malformed (page data included).
        """
        ev = await self.conn.next_event()
        if ev is not None and not is_message(ev):
            raise RemoteProtocolError(f"{self.conn.name}: page data where none is expected")
        return ev

    async def _writer(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while True:
                    with self._lock:
                        batch, self._outbox = self._outbox, []
                        self._writing = bool(batch)
                    if not batch:
                        break
                    await self.conn.send_wire(batch)
        except OSError as exc:
            self.failed = f"send failed: {exc}"
        finally:
            with self._lock:
                self._writing = False

    def close(self) -> None:
        """Stop sending; the connection stays its pairing's to close."""
        with self._lock:
            self.failed = self.failed or "closed"
        self._writer_task.cancel()

    def abort(self, reason: str) -> None:
        """The peer misbehaved: stop, and shut the connection down."""
        with self._lock:
            self.failed = self.failed or reason
        self._writer_task.cancel()
        self.conn.close()


class Listener:
    """The primary's replication port (for `CheckpointSender.accept`)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port), backlog=64, reuse_port=False)
        self.sock.setblocking(False)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


async def _open(host: str, port: int, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"cannot resolve {host}:{port}")
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            return sock
        except TimeoutError:
            sock.close()
            last = OSError(errno.ETIMEDOUT, f"connecting to {host}:{port} timed out")
        except OSError as exc:
            sock.close()
            last = exc
    raise last


def _address(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


# -- shared machinery of a pairing ---------------------------------------------------------


@dataclass(frozen=True)
class _WireRest:
    """What the socket did not take of a frame sent at once (`_Pairing.enqueue`)."""

    channel: Channel
    views: list[memoryview]


@dataclass
class _Outbox:
    queue: asyncio.Queue[Send | SendLivePages | _WireRest] = field(default_factory=asyncio.Queue)
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class _Pairing:
    """Connections, writer queues, reader tasks and the timer of one pairing."""

    def __init__(self, clock: Clock, name: str) -> None:
        self.clock = clock
        self.name = name
        self.conns: dict[Channel, Connection] = {}
        self.outboxes: dict[Channel, _Outbox] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.poke = asyncio.Event()
        self.lost: str | None = None
        self.closed = asyncio.Event()
        # Told when a send fails; set by the owner.
        self.on_failure: Callable[[Channel, str], None] = lambda channel, reason: None
        self._bounce: dict[Channel, PageArray] = {}
        # While `batched()`: messages for idle channels, sent when it ends.
        self._held: dict[Channel, list[Message]] | None = None

    def add(self, channel: Channel, conn: Connection) -> None:
        self.conns[channel] = conn
        box = self.outboxes[channel] = _Outbox()
        box.idle.set()
        self.spawn(self._writer(channel, conn, box), f"{self.name} {channel} writer")

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))

    def enqueue(self, action: Send | SendLivePages) -> None:
        """Send in order on the action's channel.

        A message for an idle channel (its writer holds nothing and nothing
        is queued) goes to the kernel at once, in this call: a checkpoint
        frame or an ACK then leaves without waiting for the writer task's
        turn in the loop, which on a loaded machine was the larger part of
        an epoch's send. Only what the socket does not take waits for the
        writer, ahead of anything queued later."""
        box = self.outboxes.get(action.channel)
        if box is None:
            raise PeerLostError(f"{self.name}: no {action.channel} connection")
        held = self._held
        if held is not None and action.channel in held:
            if isinstance(action, Send):
                held[action.channel].append(action.message)
                return
            self._send_now(action.channel, box, held.pop(action.channel))
        if isinstance(action, Send) and box.idle.is_set() and box.queue.empty():
            if held is not None:
                held[action.channel] = [action.message]
                return
            self._send_now(action.channel, box, [action.message])
            return
        box.idle.clear()
        box.queue.put_nowait(action)

    def _send_now(self, channel: Channel, box: _Outbox, msgs: list[Message]) -> None:
        rest = self.conns[channel].send_now(msgs)
        if rest:
            box.idle.clear()
            box.queue.put_nowait(_WireRest(channel, rest))

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Messages sent meanwhile to idle channels leave together when the block ends,
        each channel's in one call, page data before control: an epoch's
        frames then wake the peer once per connection, not once per frame,
        and its control frames find the pages they announce already there.
        Only the order within a connection is ever kept, batched or not."""
        if self._held is not None:
            yield
            return
        held = self._held = {}
        try:
            yield
        finally:
            self._held = None
            for channel in sorted(held, key=lambda ch: (ch.kind is not ChannelKind.DATA, ch.index)):
                box = self.outboxes.get(channel)
                if box is not None and self.lost is None:
                    self._send_now(channel, box, held[channel])

    async def drained(self) -> None:
        """Every queued frame has been handed to the kernel."""
        for box in list(self.outboxes.values()):
            await box.idle.wait()

    async def _writer(self, channel: Channel, conn: Connection, box: _Outbox) -> None:
        try:
            while True:
                if box.queue.empty():
                    box.idle.set()
                action = await box.queue.get()
                if isinstance(action, _WireRest):
                    await conn.send_wire(action.views)  # type: ignore[arg-type]
                elif isinstance(action, SendLivePages):
                    await conn.send_pages(self._live_pages(action))
                elif isinstance(action.message, Pages):
                    await conn.send_pages(action.message)
                else:
                    await conn.send(action.message)
        except OSError as exc:
            self.on_failure(channel, f"send failed: {exc}")
        except Exception as exc:  # a bug: fail the pairing loudly rather than hang it
            log.exception("%s: %s writer failed", self.name, channel)
            self.on_failure(channel, f"internal error while sending: {exc!r}")
        finally:
            box.idle.set()

    def _live_pages(self, a: SendLivePages) -> Pages:
        # Copy first: the guest keeps writing the RAM we read, and the
        # checksum must cover exactly the bytes that go out.
        buf = self._bounce.get(a.channel)
        if buf is None:
            buf = self._bounce[a.channel] = np.empty((MAX_BATCH_PAGES, PAGE_SIZE), dtype=np.uint8)
        out = buf[: len(a.indices)]
        np.take(a.source, a.indices, axis=0, out=out, mode="clip")  # the session checked the range
        return Pages(MessageType.SYNC_PAGES, a.term, a.sync_round, 0, a.channel.index, a.indices, out)

    def yank(self, reason: str) -> None:
        """Shut down every socket and cancel every task of the pairing
        (the caller's own task too, at its next await)."""
        if self.lost is None:
            self.lost = reason
        for conn in self.conns.values():
            conn.close()
        for task in self.tasks:
            task.cancel()
        self.closed.set()

    async def run_timer(self, deadline: Callable[[], float | None], fire: Callable[[float], None]) -> None:
        while self.lost is None:
            self.poke.clear()
            due = deadline()
            if due is None:
                await self.poke.wait()
                continue
            delay = due - self.clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.poke.wait(), delay)
                continue
            fire(self.clock())


# -- primary -------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochResult:
    term: int
    epoch: int
    pages: int
    nbytes: int  # on the wire, every attempt included
    attempts: int
    seconds: float  # from begin_epoch to ACK


class CheckpointSender:
    """The primary's end: accepts its secondary, authenticates, syncs and streams epochs.

    Typical use by the engine::

        sender = await CheckpointSender.accept(listener, secret=..., vm=..., term=..., page_count=...)
        await sender.sync(ram_pages, guest.collect_dirty)        # guest running
        guest.pause()
        dirty = np.union1d(sender.take_sync_remainder(), guest.collect_dirty())
        staged = staging.stage(ram_pages, dirty)
        state = guest.save_device_state()
        guest.resume()
        result = await sender.send_epoch(dirty, staged, state)   # returns on ACK
        # now release output produced before that pause

    Losing the peer raises `PeerLostError` from the pending call.
    """

    def __init__(self, session: PrimarySession, pairing: _Pairing, cache_pages: int) -> None:
        self.session = session
        self._pairing = pairing
        self.cache_pages = cache_pages
        self.mirror: Connection | None = None
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self.rejections: list[EpochRejected] = []
        self.on_peer_lost: Callable[[str], None] | None = None
        self._sync_remainder = np.empty(0, dtype=np.int64)

    @classmethod
    async def accept(
        cls, listener: Listener | socket.socket, *, join_timeout: float = 5.0, **options: Any
    ) -> CheckpointSender:
        """Wait on `listener` for a secondary to dial in (`CheckpointReceiver.dial`) and pair.

        The first connection may take any time (a secondary joins when it
        likes); the rest of the pairing must follow within `join_timeout` of it.
        Channels are assigned in the order connections arrive; the HELLO
        tells the secondary which is which. A connection whose handshake
        fails (a wrong secret, another secondary refusing a channel of a
        pairing it did not start) is dropped and its channel offered to the
        next one, so an intruder cannot keep the rightful secondary out.
        `options` are those of `_pair`; raises OSError (the listener failed)
        or TimeoutError (the pairing did not complete in time).
        """
        loop = asyncio.get_running_loop()
        peer = "secondary"
        server = listener.sock if isinstance(listener, Listener) else listener
        # One deadline for the whole pairing, not one per connection: a
        # secondary that gave up on a half-open pairing dials again, and its
        # new connections must not keep the stale one alive forever.
        deadline = 0.0

        async def opener(channel: Channel) -> socket.socket:
            nonlocal peer, deadline
            if channel == CONTROL:
                sock, addr = await loop.sock_accept(server)
                peer = _address(addr)
                deadline = loop.time() + join_timeout
            else:
                sock, _ = await asyncio.wait_for(loop.sock_accept(server), max(0.0, deadline - loop.time()))
            return sock

        return await cls._pair(opener, lambda: peer, **options)

    @classmethod
    async def _pair(
        cls,
        opener: Callable[[Channel], Awaitable[socket.socket]],
        peer_name: Callable[[], str],
        *,
        secret: bytes,
        vm: str,
        term: int,
        page_count: int,
        channels: int = 2,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_MS / 1000,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_MS / 1000,
        ack_timeout: float | None = 5.0,
        batch_pages: int = 256,
        first_epoch: int = 1,
        mirror: bool = False,
        tls: PeerTls | None = None,
        clock: Clock = time.monotonic,
    ) -> CheckpointSender:
        """Open (with `opener`) and authenticate every connection of a new pairing.

        `mirror` (lockstep) adds a last connection for mirrored input and the
        secondary's output (`CheckpointSender.mirror`); the sessions never see it.
        `tls` wraps every connection in mutual TLS before the HELLO; the
        certificate files are read afresh for each pairing.
        """
        session_id = secrets.randbits(64)
        plan = [CONTROL, HEARTBEAT, *(data_channel(i) for i in range(channels))]
        if mirror:
            plan.append(MIRROR)

        def hello(ch: Channel) -> ClientHandshake:
            return ClientHandshake(
                secret=secret, vm=vm, kind=ch.kind, index=ch.index, channels=channels,
                session=session_id, term=term, page_count=page_count,
            )  # fmt: skip

        conns, accepted = await _open_pairing(plan, opener, peer_name, hello, tls)
        session = PrimarySession(
            term=term, channels=channels, page_count=page_count, cache_pages=accepted.cache_pages,
            now=clock(), heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
            ack_timeout=ack_timeout, batch_pages=batch_pages, first_epoch=first_epoch,
            cover_page_data=tls is None,
        )  # fmt: skip
        name = peer_name()
        pairing = _Pairing(clock, f"primary->{name}")
        self = cls(session, pairing, accepted.cache_pages)
        pairing.on_failure = self._connection_failed
        for ch, conn in conns.items():
            pairing.add(ch, conn)
        self.mirror = conns.get(MIRROR)
        for ch in (CONTROL, HEARTBEAT):
            pairing.spawn(self._reader(ch, conns[ch]), f"primary {ch} reader")
        pairing.spawn(pairing.run_timer(session.next_deadline, self._timer), "primary timer")
        log.info("paired with %s, %d data channels, cache of %d pages", name, channels,
                 accepted.cache_pages)  # fmt: skip
        return self

    # -- API --------------------------------------------------------------------------

    @property
    def term(self) -> int:
        return self.session.term

    @property
    def next_epoch(self) -> int:
        return self.session.next_epoch

    @property
    def lost(self) -> str | None:
        """Why the pairing ended, or None while it is alive."""
        return self._pairing.lost

    def bytes_sent(self) -> int:
        return sum(c.bytes_sent for c in self._pairing.conns.values())

    async def sync(
        self,
        ram: PageArray,
        collect_dirty: Callable[[], npt.NDArray[np.int64]],
        *,
        max_rounds: int = 8,
        converged_pages: int | None = None,
    ) -> int:
        """First sync by iterative pre-copy while the guest runs; returns rounds.

        Round 1 sends all of RAM, later rounds what the guest dirtied
        meanwhile, until a round is small (`converged_pages`, default half
        the secondary's cache) or `max_rounds`. The caller then pauses the
        guest and sends the first epoch: `take_sync_remainder()` plus what
        `collect_dirty` returns at the pause.
        """
        self._check()
        threshold = self.cache_pages // 2 if converged_pages is None else converged_pages
        collect_dirty()  # round 1 covers everything written before this point
        self._run(self.session.start_sync(self._pairing.clock()))
        indices = np.arange(len(ram), dtype=np.int64)
        rounds = 0
        while True:
            rounds += 1
            self._run(self.session.sync_round(self._pairing.clock(), indices, ram))
            await self._drained()
            indices = collect_dirty()
            if len(indices) <= threshold or rounds >= max_rounds:
                break
        self._run(self.session.end_sync(self._pairing.clock()))
        self._sync_remainder = indices
        return rounds

    def take_sync_remainder(self) -> npt.NDArray[np.int64]:
        """Pages dirtied during the last sync round, not sent yet."""
        out, self._sync_remainder = self._sync_remainder, np.empty(0, dtype=np.int64)
        return out

    async def send_epoch(
        self, indices: npt.NDArray[np.int64], staged: PageArray, device_state: bytes
    ) -> EpochResult:
        """Stream one epoch (pages staged at its pause) and wait for its ACK.

        `staged` must stay unchanged until this returns: a NACK re-sends it.
        """
        self._check()
        start = self._pairing.clock()
        epoch = self.session.next_epoch
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[epoch] = fut
        before = self.bytes_sent()
        rejected_before = len(self.rejections)
        try:
            self._run(self.session.begin_epoch(start, indices, staged, device_state))
            await fut
        finally:
            self._waiters.pop(epoch, None)
        return EpochResult(
            self.term, epoch, len(indices), self.bytes_sent() - before,
            1 + len(self.rejections) - rejected_before, self._pairing.clock() - start,
        )  # fmt: skip

    async def close(self, reason: str = "shutting down") -> None:
        """Say GOODBYE (if the peer is still there) and end the pairing."""
        if self._pairing.lost is None:
            for a in self.session.close(self._pairing.clock(), reason):
                if isinstance(a, Send):
                    self._pairing.enqueue(a)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pairing.drained(), 1.0)
        self._end(reason, lost=False)

    async def wait_lost(self) -> str:
        await self._pairing.closed.wait()
        return self._pairing.lost or "closed"

    # -- internals ----------------------------------------------------------------------

    def _check(self) -> None:
        if self._pairing.lost is not None:
            raise PeerLostError(self._pairing.lost)

    async def _drained(self) -> None:
        waiter = asyncio.ensure_future(self._pairing.drained())
        lost = asyncio.ensure_future(self._pairing.closed.wait())
        try:
            await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            lost.cancel()
        self._check()

    def _run(self, actions: list[Action]) -> None:
        with self._pairing.batched():
            self._act(actions)
        self._pairing.poke.set()

    def _act(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send | SendLivePages):
                if self._pairing.lost is None:
                    self._pairing.enqueue(a)
            elif isinstance(a, ReleaseOutput):
                fut = self._waiters.get(a.epoch)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif isinstance(a, EpochRejected):
                log.warning("epoch %d attempt %d rejected (%s): %s; re-sending",
                            a.epoch, a.attempt, a.reason.name.lower(), a.text)  # fmt: skip
                self.rejections.append(a)
            elif isinstance(a, Yank | PeerLost | Closed):
                self._end(a.reason)

    def _end(self, reason: str, *, lost: bool = True) -> None:
        """End the pairing; `lost` is False when we close it ourselves."""
        if self._pairing.closed.is_set():
            return
        (log.warning if lost else log.info)("pairing with the secondary ended: %s", reason)
        self._pairing.lost = self._pairing.lost or reason
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(PeerLostError(reason))
        if lost and self.on_peer_lost is not None:
            self.on_peer_lost(reason)
        self._pairing.yank(reason)

    def _timer(self, now: float) -> None:
        self._run(self.session.handle_timer(now))

    def _connection_failed(self, channel: Channel, reason: str) -> None:
        if self._pairing.lost is None:
            self._run(self.session.channel_lost(channel, reason, self._pairing.clock()))

    async def _reader(self, channel: Channel, conn: Connection) -> None:
        try:
            while True:
                ev = await conn.next_event()
                if ev is None:
                    self._connection_failed(channel, "closed by the secondary")
                    return
                self._run(self.session.receive(channel, ev, self._pairing.clock()))
        except RemoteProtocolError as exc:
            log.error("%s: protocol error from the secondary: %s", conn.name, exc.reason)
            self._connection_failed(channel, f"protocol error: {exc.reason}")
        except OSError as exc:
            self._connection_failed(channel, str(exc))
        except LocalProtocolError as exc:
            log.exception("%s: internal protocol error", conn.name)
            self._connection_failed(channel, f"internal error: {exc.reason}")


async def _open_pairing(
    plan: list[Channel],
    opener: Callable[[Channel], Awaitable[socket.socket]],
    peer_name: Callable[[], str],
    hello: Callable[[Channel], ClientHandshake],
    tls: PeerTls | None,
) -> tuple[dict[Channel, Connection], AuthOk]:
    """One authenticated connection per channel of `plan`, in order.

    A connection whose handshake fails is dropped and its channel goes to
    the next one `opener` brings; anything else closes what is open and raises.
    """
    conns: dict[Channel, Connection] = {}
    accepted: AuthOk | None = None
    try:
        for ch in plan:
            while ch not in conns:
                sock = await opener(ch)
                name = peer_name()
                try:
                    conn, accepted = await _secure_and_authenticate(sock, f"{ch}->{name}", hello(ch), tls)
                except (AuthRefused, RemoteProtocolError, OSError, TimeoutError) as exc:
                    log.warning("%s->%s: handshake failed, the channel goes to the next dialer: %s",
                                ch, name, exc)  # fmt: skip
                    continue
                conns[ch] = conn
    except BaseException:
        for conn in conns.values():
            conn.close()
        raise
    assert accepted is not None
    return conns, accepted


async def _secure_and_authenticate(
    sock: socket.socket, name: str, hs: ClientHandshake, tls: PeerTls | None
) -> tuple[Connection, AuthOk]:
    """TLS (the primary is the server side) then the HELLO; closes the socket on failure."""
    conn: Connection | None = None
    try:
        stream = None
        if tls is not None:
            stream = await asyncio.wait_for(secure(tls, sock, server_side=True), HANDSHAKE_TIMEOUT)
        conn = Connection(sock, name, stream)
        return conn, await asyncio.wait_for(_client_handshake(conn, hs), HANDSHAKE_TIMEOUT)
    except BaseException:
        if conn is not None:
            conn.close()
        else:
            sock.close()
        raise


async def _client_handshake(conn: Connection, hs: ClientHandshake) -> AuthOk:
    await conn.send(hs.start())
    while True:
        ev = await conn.next_event()
        if ev is None:
            raise ConnectionError(f"{conn.name}: closed during the handshake")
        if not is_message(ev):
            raise RemoteProtocolError(f"{conn.name}: page data during the handshake")
        reply = hs.receive(ev)  # raises AuthRefused
        if reply is not None:
            await conn.send(reply)
        if hs.accepted is not None:
            return hs.accepted


# -- secondary -------------------------------------------------------------------------


class CheckpointReceiver:
    """The secondary's end: dials the primary, authenticates, receives into the cache.

    Each epoch is committed by `on_commit` (default: `cache.commit`, right
    for checkpoint mode; a lockstep engine pauses its guest and passes its
    dirty pages) and then acknowledged. `on_peer_lost` hears when the
    primary stops answering; `promote()` ends the pairing and returns the
    state to resume from. A new pairing (a new or restarted primary)
    replaces the current one and syncs from scratch.
    """

    def __init__(
        self,
        cache: ColoCache,
        *,
        secret: bytes,
        vm: str,
        term: int,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_MS / 1000,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_MS / 1000,
        on_commit: Callable[[CommitEpoch], None] | None = None,
        on_peer_lost: Callable[[str], None] | None = None,
        tls: PeerTls | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.cache = cache
        self.tls = tls
        self.mirror: Connection | None = None
        self._secret = secret
        self.vm = vm
        self.term = term
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.on_commit = on_commit
        self.on_peer_lost = on_peer_lost
        self.clock = clock
        self.session: SecondarySession | None = None
        self._pairing: _Pairing | None = None
        self._session_id: int | None = None
        self.synced = asyncio.Event()
        self.refusals: list[Refused] = []
        self.lost_reasons: list[str] = []

    async def close(self) -> None:
        if self._pairing is not None:
            self._pairing.yank("receiver closed")

    @property
    def committed_epoch(self) -> int:
        return self.session.committed_epoch if self.session is not None else 0

    @property
    def lost(self) -> str | None:
        return self._pairing.lost if self._pairing is not None else None

    async def wait_lost(self) -> str:
        while self._pairing is None:
            await asyncio.sleep(0.01)
        await self._pairing.closed.wait()
        return self._pairing.lost or "closed"

    def promote(self) -> Promoted:
        """Stop following the primary. RAM is the committed image of the result."""
        if self.session is None:
            raise PeerLostError("never paired: nothing to promote from")
        promoted = [a for a in self.session.promote(self.clock()) if isinstance(a, Promoted)]
        if self._pairing is not None:
            self._pairing.yank("promoted")
        return promoted[0]

    # -- joining ---------------------------------------------------------------------

    async def dial(
        self, host: str, port: int, *, connect_timeout: float = 5.0, mirror: bool = False
    ) -> None:
        """Join a primary that listens (`CheckpointSender.accept`).

        The first connection's HELLO says how many data channels the primary
        uses; the rest are opened after it, plus the mirror connection in
        lockstep mode (`mirror`; both agents are configured alike). Raises
        OSError, `AuthRefused` (our refusal or the primary's) or
        `RemoteProtocolError`.
        """
        where = f"{host}:{port}"
        session: int | None = None

        def ours(hello: Hello) -> Refused | None:
            # A listening primary hands out channels in the order connections
            # arrive: refuse one of a pairing another secondary started, so
            # that it goes to the next dialer instead.
            if session is None and hello.kind is not ChannelKind.CONTROL:
                return Refused(RefuseReason.BUSY, "a pairing starts with its control connection")
            if session is not None and hello.session != session:
                return Refused(RefuseReason.BUSY, "this secondary is joining another pairing")
            return None

        hello = await self._handshake(await _open(host, port, connect_timeout), where, ours)
        session = hello.session
        for _ in range(hello.channels + 1 + int(mirror)):
            await self._handshake(await _open(host, port, connect_timeout), where, ours)

    async def _handshake(self, sock: socket.socket, where: str, policy: Policy | None = None) -> Hello:
        """Authenticate one connection (we answer the primary's HELLO) and attach it.

        The secondary dials, so it is the TLS client."""
        stream: TlsStream | None = None
        if self.tls is not None:
            try:
                stream = await asyncio.wait_for(secure(self.tls, sock, server_side=False), HANDSHAKE_TIMEOUT)
            except BaseException:
                sock.close()
                raise
        conn = Connection(sock, where, stream)
        hs = ServerHandshake(
            secret=self._secret, vm=self.vm, term=self.term, page_count=self.cache.page_count,
            cache_pages=self.cache.capacity, policy=policy,
        )  # fmt: skip
        try:
            hello = await asyncio.wait_for(_server_handshake(conn, hs), HANDSHAKE_TIMEOUT)
        except BaseException:
            conn.close()
            raise
        if hello is None:
            assert hs.refused is not None
            self.refusals.append(hs.refused)
            conn.close()
            raise AuthRefused(hs.refused.reason, hs.refused.text)
        self._attach(hello, conn)
        return hello

    def _attach(self, hello: Hello, conn: Connection) -> None:
        channel = Channel(hello.kind, hello.index)
        conn.name = f"{channel}<-{conn.name}"
        if self._session_id != hello.session:
            # A new pairing replaces the old one, whose primary restarted or
            # was replaced; it syncs from scratch, overwriting whatever image
            # an earlier primary left here.
            if self._pairing is not None:
                self._pairing.yank("replaced by a new pairing")
            self._session_id = hello.session
            self.term = max(self.term, hello.term)
            self.cache.reset()
            self.synced.clear()
            session = self.session = SecondarySession(
                term=hello.term, channels=hello.channels, cache=self.cache, now=self.clock(),
                heartbeat_interval=self.heartbeat_interval, heartbeat_timeout=self.heartbeat_timeout,
            )  # fmt: skip
            fresh = self._pairing = _Pairing(self.clock, "secondary")
            fresh.on_failure = self._connection_failed
            fresh.spawn(fresh.run_timer(session.next_deadline, self._timer), "secondary timer")
            log.info("pairing with a primary of term %d over %d data channels", hello.term, hello.channels)
        pairing = self._pairing
        assert pairing is not None
        if channel in pairing.conns or pairing.lost is not None:
            conn.close()
            return
        assert self.session is not None
        # A handshake is word from the primary: its heartbeats start only once
        # every connection is open, which may take a while on a loaded machine.
        self.session.heard(self.clock())
        pairing.add(channel, conn)
        if channel.kind is ChannelKind.MIRROR:
            self.mirror = conn  # the lockstep engine reads and writes it
            return
        pairing.spawn(self._reader(channel, conn), f"secondary {channel} reader")

    # -- running ----------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        session, pairing = self.session, self._pairing
        assert session is not None and pairing is not None
        for a in actions:
            if isinstance(a, Send):
                if pairing.lost is None and a.channel in pairing.outboxes:
                    pairing.enqueue(a)
            elif isinstance(a, CommitEpoch):
                if self.on_commit is not None:
                    self.on_commit(a)
                else:
                    self.cache.commit(a.term, a.epoch, a.device_state)
                self._run(session.commit_done(a.term, a.epoch, self.clock()))
            elif isinstance(a, SyncComplete):
                self.synced.set()
            elif isinstance(a, Yank | PeerLost | Closed):
                self._end(a.reason)
        pairing.poke.set()

    def _end(self, reason: str) -> None:
        pairing = self._pairing
        if pairing is None or pairing.closed.is_set():
            return
        log.warning("pairing with the primary ended: %s", reason)
        self.lost_reasons.append(reason)
        pairing.lost = pairing.lost or reason
        if self.on_peer_lost is not None:
            self.on_peer_lost(reason)
        pairing.yank(reason)

    def _timer(self, now: float) -> None:
        if self.session is not None:
            self._run(self.session.handle_timer(now))

    def _connection_failed(self, channel: Channel, reason: str) -> None:
        if self.session is not None and self._pairing is not None and self._pairing.lost is None:
            self._run(self.session.channel_lost(channel, reason, self.clock()))

    async def _reader(self, channel: Channel, conn: Connection) -> None:
        session = self.session
        assert session is not None

        def destination(header: PagesHeader) -> memoryview | None:
            dest, actions = session.pages_destination(channel, header, self.clock())
            self._run(actions)
            return dest

        on_pages = destination if channel.kind is ChannelKind.DATA else None
        try:
            while True:
                try:
                    ev = await conn.next_event(on_pages)
                except RemoteProtocolError as exc:
                    if not exc.resumable:
                        raise
                    log.warning("%s: %s", conn.name, exc.reason)
                    self._run(session.frame_corrupted(channel, exc, self.clock()))
                    continue
                if ev is None:
                    self._connection_failed(channel, "closed by the primary")
                    return
                self._run(session.receive(channel, ev, self.clock()))
        except RemoteProtocolError as exc:
            log.error("%s: protocol error from the primary: %s", conn.name, exc.reason)
            self._connection_failed(channel, f"protocol error: {exc.reason}")
        except OSError as exc:
            self._connection_failed(channel, str(exc))
        except LocalProtocolError as exc:
            log.exception("%s: internal protocol error", conn.name)
            self._connection_failed(channel, f"internal error: {exc.reason}")


# -- pairing of a backend that replicates itself -----------------------------------------


class StreamLink:
    """Both ends of a stream pairing (`replication.stream`): one control connection.

    The primary accepts (`accept`) and learns where to stream (`target`);
    the secondary dials (`dial`) with its backend's address. Heartbeats
    flow both ways until `wait_lost` returns; the primary's carry its
    checkpoint count (`report`), which the secondary reads (`checkpoints`).
    The primary speaks first in the handshake, as in every pairing.
    """

    def __init__(self, session: StreamSession, pairing: _Pairing) -> None:
        self.session = session
        self._pairing = pairing
        self._target: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @classmethod
    async def accept(
        cls, listener: Listener, *, secret: bytes, vm: str, term: int, heartbeat_interval: float,
        heartbeat_timeout: float, target_timeout: float | None = None, tls: PeerTls | None = None,
        clock: Clock = time.monotonic,
    ) -> StreamLink:
        """Primary: wait for a secondary to dial in and authenticate it (a failed handshake
        raises, like `CheckpointSender.accept`; the caller accepts again)."""
        loop = asyncio.get_running_loop()
        sock, addr = await loop.sock_accept(listener.sock)
        name = _address(addr)
        hs = ClientHandshake(secret=secret, vm=vm, kind=ChannelKind.CONTROL, index=0, channels=1,
                             session=secrets.randbits(64), term=term, page_count=0)
        conn = await _secured(sock, f"control->{name}", tls, server_side=True)
        try:
            await asyncio.wait_for(_client_handshake(conn, hs), HANDSHAKE_TIMEOUT)
        except BaseException:
            conn.close()
            raise
        session = StreamSession(Role.PRIMARY, term, clock(), heartbeat_interval=heartbeat_interval,
                                heartbeat_timeout=heartbeat_timeout, target_timeout=target_timeout)
        return cls._run(session, conn, f"primary->{name}", clock)

    @classmethod
    async def dial(
        cls, host: str, port: int, *, address: str, secret: bytes, vm: str, term: int,
        heartbeat_interval: float, heartbeat_timeout: float, tls: PeerTls | None = None,
        connect_timeout: float = 5.0, clock: Clock = time.monotonic,
    ) -> StreamLink:
        """Secondary: join the primary at host:port and announce `address`.
        Raises OSError, `AuthRefused` or `RemoteProtocolError`."""
        where = f"{host}:{port}"

        def control_only(hello: Hello) -> Refused | None:
            if hello.kind is not ChannelKind.CONTROL:
                return Refused(RefuseReason.BAD_CHANNEL, "a stream pairing has one control connection")
            return None

        sock = await _open(host, port, connect_timeout)
        conn = await _secured(sock, f"control<-{where}", tls, server_side=False)
        hs = ServerHandshake(secret=secret, vm=vm, term=term, page_count=0, cache_pages=0,
                             policy=control_only)
        try:
            hello = await asyncio.wait_for(_server_handshake(conn, hs), HANDSHAKE_TIMEOUT)
        except BaseException:
            conn.close()
            raise
        if hello is None:
            assert hs.refused is not None
            conn.close()
            raise AuthRefused(hs.refused.reason, hs.refused.text)
        session = StreamSession(Role.SECONDARY, hello.term, clock(), heartbeat_interval=heartbeat_interval,
                                heartbeat_timeout=heartbeat_timeout, target=address)
        link = cls._run(session, conn, f"secondary<-{where}", clock)
        link._act(session.start())
        return link

    @classmethod
    def _run(cls, session: StreamSession, conn: Connection, name: str, clock: Clock) -> StreamLink:
        pairing = _Pairing(clock, name)
        link = cls(session, pairing)
        pairing.on_failure = lambda channel, reason: link._act(session.connection_lost(reason))
        pairing.add(CONTROL, conn)
        pairing.spawn(link._reader(conn), f"{name} reader")
        timer = pairing.run_timer(session.next_deadline, lambda now: link._act(session.handle_timer(now)))
        pairing.spawn(timer, f"{name} timer")
        log.info("%s: paired (stream, term %d)", name, session.term)
        return link

    # -- API ----------------------------------------------------------------------------

    @property
    def term(self) -> int:
        return self.session.term

    @property
    def checkpoints(self) -> int:
        """Secondary: the primary's checkpoint count in this term, as last heard."""
        return self.session.checkpoints

    @property
    def last_heard(self) -> float:
        return self.session.last_heard

    @property
    def lost(self) -> str | None:
        return self._pairing.lost

    def report(self, checkpoints: int) -> None:
        """Primary: the checkpoint count the next heartbeats carry."""
        self.session.report(checkpoints)

    async def target(self) -> str:
        """Primary: the secondary's stream address; PeerLostError if the pairing ends first."""
        lost: asyncio.Future[Any] = asyncio.ensure_future(self._pairing.closed.wait())
        target: asyncio.Future[Any] = self._target
        try:
            await asyncio.wait({target, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not self._target.done():
            raise PeerLostError(self._pairing.lost or "closed")
        return self._target.result()

    async def wait_lost(self) -> str:
        await self._pairing.closed.wait()
        return self._pairing.lost or "closed"

    async def close(self, reason: str = "shutting down") -> None:
        pairing = self._pairing
        if pairing.lost is None:
            for a in self.session.close(reason):
                if isinstance(a, Send):
                    pairing.enqueue(a)  # the GOODBYE, sent before the yank
            pairing.lost = reason
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pairing.drained(), 1.0)
        pairing.yank(reason)

    # -- running ------------------------------------------------------------------------

    def _act(self, actions: list[Action | TargetKnown]) -> None:
        pairing = self._pairing
        for a in actions:
            if isinstance(a, Send):
                if pairing.lost is None:
                    pairing.enqueue(a)
            elif isinstance(a, TargetKnown):
                if not self._target.done():
                    self._target.set_result(a.address)
            elif isinstance(a, Yank | PeerLost | Closed):
                if pairing.lost is None:
                    log.warning("%s: pairing ended: %s", pairing.name, a.reason)
                pairing.yank(a.reason)
        pairing.poke.set()

    async def _reader(self, conn: Connection) -> None:
        try:
            while True:
                ev = await conn.next_event()
                if ev is None:
                    self._act(self.session.connection_lost("closed by the peer"))
                    return
                if not is_message(ev):
                    raise RemoteProtocolError("page data in a stream pairing")
                self._act(self.session.receive(ev, self._pairing.clock()))
        except RemoteProtocolError as exc:
            log.error("%s: protocol error from the peer: %s", conn.name, exc.reason)
            self._act(self.session.connection_lost(f"protocol error: {exc.reason}"))
        except OSError as exc:
            self._act(self.session.connection_lost(str(exc)))


async def _secured(sock: socket.socket, name: str, tls: PeerTls | None, *, server_side: bool) -> Connection:
    stream: TlsStream | None = None
    if tls is not None:
        try:
            stream = await asyncio.wait_for(secure(tls, sock, server_side=server_side), HANDSHAKE_TIMEOUT)
        except BaseException:
            sock.close()
            raise
    return Connection(sock, name, stream)


async def _server_handshake(conn: Connection, hs: ServerHandshake) -> Hello | None:
    while True:
        ev = await conn.next_event()
        if ev is None:
            raise ConnectionError("closed during the handshake")
        if not is_message(ev):
            raise RemoteProtocolError("page data during the handshake")
        reply = hs.receive(ev)
        await conn.send(reply)
        if isinstance(reply, Refused):
            return None
        if hs.done:
            return hs.hello


__all__ = [
    "AuthRefused",
    "CheckpointReceiver",
    "CheckpointSender",
    "Connection",
    "EpochResult",
    "Listener",
    "PeerLostError",
    "StreamLink",
    "ThreadSafeLink",
]
