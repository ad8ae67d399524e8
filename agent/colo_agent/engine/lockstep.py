"""Lockstep mode: both guests run on the same input; matching output leaves at once.

`PrimaryMirror` runs on the primary while a secondary is paired: it sends
every RX batch of the guest over the mirror connection, reads the
secondary's output, and feeds both streams to the `OutputComparator`.
`SecondaryMirror` runs on the secondary: it feeds mirrored batches into its
guest's RX ring and sends the guest's output back, tagged with the epoch it
last committed (the generation) and the stream offsets the commit restarted
it from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import Final

from colo_agent.engine.compare import Cause, Mark, OutputComparator, Release, Verdict
from colo_agent.guest import ClientNic, MirroredNic
from colo_agent.replication.protocol import Message, MirrorInput, MirrorOutput, RemoteProtocolError
from colo_agent.replication.transport import Connection, ThreadSafeLink

log = logging.getLogger(__name__)


class OutputOffsets:
    """Bytes of output per connection so far, counted in the vCPU thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offsets: dict[int, tuple[int, bool]] = {}

    def advance(self, conn: int, n: int, closed: bool) -> int:
        """Count `n` more bytes of `conn`; returns the offset they start at."""
        with self._lock:
            offset, was_closed = self._offsets.get(conn, (0, False))
            self._offsets[conn] = (offset + n, was_closed or closed)
            return offset

    def snapshot(self) -> dict[int, tuple[int, bool]]:
        with self._lock:
            return dict(self._offsets)

    def reset(self, offsets: dict[int, tuple[int, bool]]) -> None:
        with self._lock:
            self._offsets = dict(offsets)


class _Link:
    """Mirror messages to and from one mirror connection.

    Sends go through the transport's `ThreadSafeLink` straight from the
    thread that produced them (the vCPU thread, for mirrored input and the
    secondary's output); this class only encodes, decodes and dispatches.
    """

    def __init__(self, conn: Connection, on_message: Callable[[Message], None], name: str) -> None:
        self._io = ThreadSafeLink(conn, name)
        self._on_message = on_message
        self._failed: str | None = None
        self._tasks = [asyncio.ensure_future(self._reader())]
        for t in self._tasks:
            t.set_name(name)
            t.add_done_callback(self._finished)

    @property
    def failed(self) -> str | None:
        if self._failed is not None:
            return self._failed
        return f"mirror {self._io.failed}" if self._io.failed is not None else None

    def _finished(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._failed = f"mirror link failed: {exc!r}"
            log.error("%s", self._failed, exc_info=exc)

    def send_threadsafe(self, msg: MirrorInput | MirrorOutput) -> None:
        """Send from any thread, in the order of the calls."""
        self._io.send_threadsafe(msg)

    async def _reader(self) -> None:
        try:
            while (msg := await self._io.next_message()) is not None:
                self._on_message(msg)
            self._failed = "mirror connection closed by the peer"
        except RemoteProtocolError as exc:
            self._failed = f"mirror protocol error: {exc.reason}"
            log.error("%s; dropping the mirror link", self._failed)
            self._io.abort(self._failed)
        except OSError as exc:
            self._failed = f"mirror receive failed: {exc}"

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._io.close()


class PrimaryMirror:
    """The primary's half of lockstep for one pairing."""

    def __init__(
        self,
        nic: MirroredNic,
        conn: Connection,
        term: int,
        comparator: OutputComparator,
        deliver: Callable[[list[Release]], None],
        request_checkpoint: Callable[[Cause], None],
    ) -> None:
        self.nic = nic
        self.term = term
        self.comparator = comparator
        self._deliver = deliver
        self._request_checkpoint = request_checkpoint
        self._link = _Link(conn, self._on_message, "lockstep mirror (primary)")
        self._timer_wake = asyncio.Event()
        self._timer = asyncio.ensure_future(self._run_timer())
        self._timer.add_done_callback(self._link._finished)
        nic.set_rx_tap(self._on_rx_batch)

    def _on_rx_batch(self, position: int, data: bytes) -> None:
        """vCPU thread, under the device lock: forward as is."""
        self._link.send_threadsafe(MirrorInput(self.term, position, data))

    def primary_output(self, conn: int, offset: int, data: bytes, closed: bool) -> None:
        """Loop thread: the guest's output (from absolute `offset`), in the order it produced it."""
        self._apply(self.comparator.primary_output(conn, data, closed, time.monotonic(), offset=offset))

    def acknowledged(self, mark: Mark) -> None:
        self._apply(self.comparator.acknowledged(mark))

    def _on_message(self, msg: Message) -> None:
        if not isinstance(msg, MirrorOutput):
            raise RemoteProtocolError(f"the secondary sent {type(msg).__name__} on the mirror connection")
        c = self.comparator
        log.debug("secondary output of conn %d: %d bytes at offset %d (generation %d, ours %d)",
                  msg.conn, len(msg.data), msg.offset, msg.generation, c.generation)
        self._apply(c.secondary_output(msg.generation, msg.conn, msg.offset, msg.data, msg.closed))

    def _apply(self, verdict: Verdict) -> None:
        if verdict.releases:
            self._deliver(verdict.releases)
        if verdict.checkpoint is not None:
            self._request_checkpoint(verdict.checkpoint)
        self._timer_wake.set()

    async def _run_timer(self) -> None:
        while True:
            deadline = self.comparator.next_deadline()
            self._timer_wake.clear()
            if deadline is None:
                await self._timer_wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), max(0.0, deadline - time.monotonic()))
            self._apply_timer()

    def _apply_timer(self) -> None:
        verdict = self.comparator.handle_timer(time.monotonic())
        if verdict.checkpoint is not None:
            self._request_checkpoint(verdict.checkpoint)

    @property
    def failed(self) -> str | None:
        return self._link.failed

    async def close(self) -> list[Release]:
        """Stop mirroring; everything still held is returned (the caller decides about it)."""
        self.nic.set_rx_tap(None)
        self._timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._timer
        await self._link.close()
        return self.comparator.release_all()


class SecondaryMirror:
    """The secondary's half: mirrored input in, its guest's output out."""

    def __init__(self, nic: MirroredNic, clients: ClientNic, conn: Connection) -> None:
        self.nic = nic
        self.offsets = OutputOffsets()
        self.generation = 0
        nic.enable_rx_mirror()
        clients.set_output_callback(self._on_output)
        self._link = _Link(conn, self._on_message, "lockstep mirror (secondary)")

    def _on_message(self, msg: Message) -> None:
        if not isinstance(msg, MirrorInput):
            raise RemoteProtocolError(f"the primary sent {type(msg).__name__} on the mirror connection")
        log.debug("mirrored input: %d bytes at ring position %#x", len(msg.data), msg.position)
        self.nic.mirror_rx(msg.position, msg.data)

    def _on_output(self, conn: int, data: bytes, closed: bool) -> None:
        """vCPU thread: our guest's output goes to the primary's comparator."""
        offset = self.offsets.advance(conn, len(data), closed)
        log.debug("output of conn %d: %d bytes at offset %d (generation %d)", conn, len(data), offset,
                  self.generation)
        self._link.send_threadsafe(MirrorOutput(self.generation, conn, offset, data, closed))

    def committed(self, epoch: int, offsets: dict[int, tuple[int, bool]]) -> None:
        """The guest (paused) was reset to the primary's state at `epoch`'s pause."""
        self.generation = epoch
        self.offsets.reset(offsets)

    @property
    def failed(self) -> str | None:
        return self._link.failed

    async def close(self) -> None:
        await self._link.close()


# -- device state of a lockstep checkpoint ---------------------------------------------------

_STATE = struct.Struct("<4sI")  # magic, machine state length
_STATE_MAGIC: Final = b"CLSS"
_OFFSET = struct.Struct("<IQB")  # conn, offset, closed


def pack_state(machine_state: bytes, offsets: dict[int, tuple[int, bool]]) -> bytes:
    """Lockstep device state: the machine's, plus the primary's output offsets at the pause,
    from which the secondary's output streams restart after the commit."""
    parts = [_STATE.pack(_STATE_MAGIC, len(machine_state)), machine_state, struct.pack("<I", len(offsets))]
    parts += [_OFFSET.pack(c, o, int(closed)) for c, (o, closed) in sorted(offsets.items())]
    return b"".join(parts)


def unpack_state(data: bytes) -> tuple[bytes, dict[int, tuple[int, bool]]]:
    """Inverse of `pack_state`; raises ValueError for anything else."""
    try:
        magic, n = _STATE.unpack_from(data)
        if magic != _STATE_MAGIC:
            raise ValueError("not a lockstep device state (is the primary in checkpoint mode?)")
        machine = data[_STATE.size : _STATE.size + n]
        pos = _STATE.size + n
        (count,) = struct.unpack_from("<I", data, pos)
        pos += 4
        offsets: dict[int, tuple[int, bool]] = {}
        for _ in range(count):
            conn, off, closed = _OFFSET.unpack_from(data, pos)
            offsets[conn] = (off, bool(closed))
            pos += _OFFSET.size
    except struct.error as exc:
        raise ValueError(f"truncated lockstep device state: {exc}") from exc
    if len(machine) != n or pos != len(data):
        raise ValueError("lockstep device state has the wrong length")
    return machine, offsets
