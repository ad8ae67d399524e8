"""The micro-VM's device model: console, paravirtual NIC, virtual clock, wait port.

The accelerator calls `io_out`/`io_in` in the vCPU thread on every port
access (docs/guest-abi.md). Every write this model makes into guest RAM
happens in that thread while the vCPU is outside the guest: client input is
queued by the host threads and copied into the RX ring only at a WAIT or
TX_DOORBELL exit. So a paused machine (vCPU parked between runs) is also a
machine whose devices do not touch RAM, and the ring never changes under the
guest's feet.

Pages the model writes are recorded in its own bitmap, because neither
accelerator sees host writes; `collect_dirty` hands them to the monitor,
which merges them with the accelerator's log.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from colo_agent.guest import OutputCallback
from colo_agent.microvm import abi

log = logging.getLogger(__name__)
guest_log = logging.getLogger("colo_agent.guest")

_U32 = 0xFFFFFFFF
_CAP = abi.RING_CAPACITY
_MASK = _CAP - 1
_HEADER = struct.Struct("<IHH")
_U32_AT = struct.Struct("<I")

# Per-connection input the host may queue before the bridge stops reading
# from that client, and the level at which it may read again. A client that
# uploads faster than the guest consumes is held back in its own TCP window
# instead of in the agent's memory.
INPUT_HIGH_WATER = 1 << 20
INPUT_LOW_WATER = 256 << 10

# A guest that never ends a line must not grow the agent's memory.
CONSOLE_LINE_MAX = 1024


def _frame_size(payload: int) -> int:
    return abi.FRAME_HEADER_SIZE + ((payload + abi.FRAME_ALIGN - 1) & ~(abi.FRAME_ALIGN - 1))


@dataclass(frozen=True)
class NicHostState:
    """The NIC's bookkeeping that does not live in guest RAM."""

    rx_head: int  # the producer index the host last published
    tx_tail: int  # the consumer index the host last published
    next_conn_id: int
    open_connections: tuple[int, ...]


class VirtualClock:
    """Guest time in ns: the host's monotonic clock plus an offset.

    It starts at the host's wall-clock time, so TIME replies look familiar,
    and then only moves forward with the monotonic clock. Restoring a saved
    value re-bases the offset: the guest sees no jump across a checkpoint.
    """

    def __init__(self, now_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._now_ns = now_ns
        self._offset = time.time_ns() - now_ns()

    def read(self) -> int:
        return (self._now_ns() + self._offset) & 0xFFFFFFFFFFFFFFFF

    def restore(self, value_ns: int) -> None:
        self._offset = value_ns - self._now_ns()


class DeviceModel:
    """Port I/O handler of one micro-VM (implements accel.IoHandler)."""

    def __init__(
        self,
        ram: memoryview,
        *,
        on_panic: Callable[[int], None],
        clock: VirtualClock | None = None,
    ) -> None:
        if ram.readonly or ram.format != "B" or len(ram) % abi.PAGE_SIZE:
            raise ValueError("guest RAM must be a writable byte view of whole pages")
        if len(ram) < abi.TX_RING_ADDR + abi.RING_DATA_OFFSET + _CAP:
            raise ValueError("guest RAM is too small to hold the NIC rings")
        self._ram = ram
        self._on_panic = on_panic
        self.clock = clock or VirtualClock()
        self._clock_latch = 0
        self._console = bytearray()

        self._lock = threading.Lock()
        # Signalled when input is queued or waits are interrupted; a WAIT
        # exit parks the vCPU thread on it.
        self._wakeup = threading.Condition(self._lock)
        self._waits_interrupted = False

        self._dirty = np.zeros(len(ram) // abi.PAGE_SIZE, dtype=np.bool_)

        self._rx_head = 0
        self._tx_tail = 0
        self._next_conn_id = 1
        self._open: set[int] = set()
        # Host input not yet in the RX ring, per connection, in arrival order:
        # [frame type, payload, offset of the first byte not yet sent].
        self._pending: dict[int, deque[list[object]]] = {}
        self._pending_bytes: dict[int, int] = {}
        self._throttled: set[int] = set()
        self._rx_broken = False

        self._on_output: OutputCallback | None = None
        self._on_input_drained: Callable[[int], None] | None = None
        # Lockstep. A primary hands every batch of frames it publishes in the
        # RX ring to `_rx_tap` as (ring position, raw ring bytes); a
        # secondary's ring is fed only with those batches, at the same
        # positions, so both guests see the same input at the same ring
        # offsets and a restored RX head says exactly which batches the
        # restored state already holds.
        self._rx_tap: Callable[[int, bytes], None] | None = None
        self._mirror_rx: dict[int, bytes] | None = None  # batches by ring position
        # Batches from here on are kept even once applied: a commit may reset
        # the ring to a head before them, and then they must be applied again.
        self._mirror_floor = 0
        self.counters = {"io_exits": 0, "waits": 0, "rx_frames": 0, "tx_frames": 0, "tx_errors": 0}

    # ---- host side (any thread) -------------------------------------------------------------

    def set_output_callback(self, callback: OutputCallback | None) -> None:
        """`callback(conn_id, data, closed)` runs in the vCPU thread for every drained chunk."""
        self._on_output = callback

    def set_input_drained_callback(self, callback: Callable[[int], None] | None) -> None:
        """`callback(conn_id)`, in the vCPU thread, once a connection's backlog falls to the low water."""
        self._on_input_drained = callback

    def open_connection(self) -> int:
        with self._lock:
            conn = self._allocate_id()
            self._open.add(conn)
            self._queue(conn, abi.FrameType.OPEN, b"")
            self._wakeup.notify_all()
            return conn

    def send_input(self, conn_id: int, data: bytes) -> None:
        """Queue client bytes; dropped if the connection is closed (the guest may close first)."""
        if not data:
            return
        with self._lock:
            if conn_id not in self._open:
                return
            self._queue(conn_id, abi.FrameType.DATA, bytes(data))
            if self._pending_bytes[conn_id] > INPUT_HIGH_WATER:
                self._throttled.add(conn_id)
            self._wakeup.notify_all()

    def close_connection(self, conn_id: int) -> None:
        """The client went away: the guest gets a CLOSE after any data still queued."""
        with self._lock:
            if conn_id not in self._open:
                return
            self._open.discard(conn_id)
            self._throttled.discard(conn_id)
            self._queue(conn_id, abi.FrameType.CLOSE, b"")
            self._wakeup.notify_all()

    def set_rx_tap(self, tap: Callable[[int, bytes], None] | None) -> None:
        """`tap(position, ring_bytes)` in the vCPU thread, under the device lock, for every RX batch."""
        self._rx_tap = tap

    def enable_rx_mirror(self) -> None:
        """From now on the RX ring is fed by `mirror_rx` only (a lockstep secondary)."""
        with self._lock:
            self._mirror_rx = {}
            self._mirror_floor = self._rx_head
            self._pending.clear()
            self._pending_bytes.clear()

    def disable_rx_mirror(self) -> None:
        """Back to serving clients of its own (a promoted lockstep secondary)."""
        with self._lock:
            self._mirror_rx = None

    def mirror_rx(self, position: int, data: bytes) -> None:
        """Queue a batch the primary published at `position` of its RX ring (any thread)."""
        with self._lock:
            if self._mirror_rx is None:
                raise RuntimeError("mirror_rx() on a NIC that is not mirroring")
            self._mirror_rx[position & _U32] = data
            self._wakeup.notify_all()

    def input_backlog(self, conn_id: int) -> int:
        """Bytes of input queued on the host for `conn_id`, not yet in the RX ring."""
        with self._lock:
            return self._pending_bytes.get(conn_id, 0)

    @property
    def open_connections(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._open)

    def interrupt_waits(self) -> None:
        """End any WAIT in progress and make later ones return at once (pause, stop)."""
        with self._lock:
            self._waits_interrupted = True
            self._wakeup.notify_all()

    def allow_waits(self) -> None:
        with self._lock:
            self._waits_interrupted = False

    def collect_dirty(self) -> npt.NDArray[np.int64]:
        """Sorted indices of pages this model wrote since the previous call."""
        return np.flatnonzero(self.take_dirty_bitmap()).astype(np.int64, copy=False)

    def take_dirty_bitmap(self) -> npt.NDArray[np.bool_]:
        """One bool per page written since the previous call; the caller owns the array."""
        with self._lock:
            bitmap = self._dirty
            self._dirty = np.zeros_like(bitmap)
        return bitmap

    def mark_dirty(self, addr: int, length: int) -> None:
        """Record a host write into guest RAM (boot image, restored state...)."""
        if length <= 0:
            return
        with self._lock:
            self._mark(addr, length)

    # ---- save / restore (machine paused) ----------------------------------------------------

    def host_state(self) -> NicHostState:
        with self._lock:
            return NicHostState(
                rx_head=self._rx_head,
                tx_tail=self._tx_tail,
                next_conn_id=self._next_conn_id,
                open_connections=tuple(sorted(self._open)),
            )

    @property
    def console_pending(self) -> bytes:
        return bytes(self._console)

    @property
    def clock_latch(self) -> int:
        return self._clock_latch

    def restore(
        self,
        nic: NicHostState,
        *,
        clock_ns: int,
        clock_latch: int,
        console: bytes,
        keep_connections: bool,
    ) -> None:
        """Adopt saved device state; the RX/TX rings in RAM must be the ones saved with it.

        Saved connections have no client here unless the caller re-attaches
        them (`keep_connections`); otherwise the guest is told they closed, so
        it frees what it holds for them.
        """
        with self._lock:
            ram_rx_head = self._load_u32(abi.RX_RING_ADDR + abi.RING_HEAD_OFFSET)
            ram_tx_tail = self._load_u32(abi.TX_RING_ADDR + abi.RING_TAIL_OFFSET)
            if (ram_rx_head, ram_tx_tail) != (nic.rx_head, nic.tx_tail):
                # The saved indices are authoritative for the host's side of each ring.
                log.warning(
                    "device state: ring indices in RAM (rx head %#x, tx tail %#x) differ from the "
                    "saved ones (%#x, %#x); using the saved ones",
                    ram_rx_head, ram_tx_tail, nic.rx_head, nic.tx_tail,
                )
                self._store_u32(abi.RX_RING_ADDR + abi.RING_HEAD_OFFSET, nic.rx_head)
                self._store_u32(abi.TX_RING_ADDR + abi.RING_TAIL_OFFSET, nic.tx_tail)
            self._rx_head = nic.rx_head
            self._mirror_floor = nic.rx_head
            self._tx_tail = nic.tx_tail
            self._next_conn_id = nic.next_conn_id or 1
            self._pending.clear()
            self._pending_bytes.clear()
            self._throttled.clear()
            self._rx_broken = False
            self._open = set(nic.open_connections)
            if not keep_connections:
                for conn in nic.open_connections:
                    self._queue(conn, abi.FrameType.CLOSE, b"")
                self._open.clear()
            self._clock_latch = clock_latch
            self.clock.restore(clock_ns)
            self._console = bytearray(console[:CONSOLE_LINE_MAX])

    # ---- vCPU thread ------------------------------------------------------------------------

    def io_out(self, port: int, size: int, value: int) -> None:
        self.counters["io_exits"] += 1
        if port == abi.Port.TX_DOORBELL:
            self.drain_tx()
            # The guest is out of the guest anyway: hand it whatever input
            # arrived meanwhile, so it need not WAIT to see it.
            self.flush_rx()
        elif port == abi.Port.WAIT:
            self._wait(value & _U32)
        elif port == abi.Port.CONSOLE:
            self._console_byte(value & 0xFF)
        elif port == abi.Port.PANIC:
            self._flush_console()
            guest_log.error("guest panic: code %#x", value & _U32)
            self._on_panic(value & _U32)
        else:
            log.debug("guest wrote %#x to unknown port %#x (size %d); ignored", value, port, size)

    def io_in(self, port: int, size: int) -> int:
        self.counters["io_exits"] += 1
        if port == abi.Port.CLOCK_LO:
            self._clock_latch = self.clock.read()
            return self._clock_latch & _U32
        if port == abi.Port.CLOCK_HI:
            return (self._clock_latch >> 32) & _U32
        log.debug("guest read unknown port %#x (size %d)", port, size)
        # An unclaimed port reads as all ones, as on a PC bus.
        return (1 << (8 * size)) - 1 if size in (1, 2, 4) else _U32

    def flush_rx(self) -> None:
        """Copy queued host input into the RX ring, as much as fits."""
        with self._lock:
            drained = self._flush_rx_locked()
        self._notify_drained(drained)

    def drain_tx(self) -> None:
        """Consume every complete frame in the TX ring and hand its output over."""
        out: list[tuple[int, bytes, bool]] = []
        with self._lock:
            self._drain_tx_locked(out)
        callback = self._on_output
        if callback is None:
            return
        for conn, data, closed in out:
            callback(conn, data, closed)

    def rx_used(self) -> int:
        """Bytes in the RX ring the guest has not consumed yet."""
        tail = self._load_u32(abi.RX_RING_ADDR + abi.RING_TAIL_OFFSET)
        return (self._rx_head - tail) & _U32

    # ---- internals ----------------------------------------------------------------------------

    def _allocate_id(self) -> int:
        # Ids are never 0 and never reused while a connection with that id is
        # open; they wrap after 2^32 - 1 connections.
        while True:
            conn = self._next_conn_id
            self._next_conn_id = conn % _U32 + 1
            if conn not in self._open and conn not in self._pending:
                return conn

    def _queue(self, conn: int, kind: abi.FrameType, payload: bytes) -> None:
        queue = self._pending.get(conn)
        if queue is None:
            queue = self._pending[conn] = deque()
            self._pending_bytes[conn] = 0
        queue.append([kind, payload, 0])
        self._pending_bytes[conn] += len(payload)

    def _load_u32(self, addr: int) -> int:
        value: int = _U32_AT.unpack_from(self._ram, addr)[0]
        return value

    def _store_u32(self, addr: int, value: int) -> None:
        _U32_AT.pack_into(self._ram, addr, value & _U32)
        self._mark(addr, 4)

    def _mark(self, addr: int, length: int) -> None:
        self._dirty[addr // abi.PAGE_SIZE : (addr + length - 1) // abi.PAGE_SIZE + 1] = True

    def _mark_ring_data(self, ring: int, start: int, length: int) -> None:
        base = ring + abi.RING_DATA_OFFSET
        if length >= _CAP:
            self._mark(base, _CAP)
            return
        first = start & _MASK
        if first + length <= _CAP:
            self._mark(base + first, length)
        else:
            self._mark(base + first, _CAP - first)
            self._mark(base, first + length - _CAP)

    def _flush_rx_locked(self) -> list[int]:
        if self._mirror_rx is not None:
            self._apply_mirror_locked(self._mirror_rx)
            return []
        if not self._pending or self._rx_broken:
            return []
        tail = self._load_u32(abi.RX_RING_ADDR + abi.RING_TAIL_OFFSET)
        used = (self._rx_head - tail) & _U32
        if used > _CAP or used % abi.FRAME_ALIGN:
            # Only the guest writes the tail; a value no consumer could have
            # produced means it is corrupt. Stop producing rather than
            # overwrite data the guest may still be reading.
            log.error("NIC: guest RX tail %#x is inconsistent with head %#x; RX stopped", tail, self._rx_head)
            self._rx_broken = True
            return []
        free = _CAP - used
        start = head = self._rx_head
        ram = self._ram
        data_base = abi.RX_RING_ADDR + abi.RING_DATA_OFFSET
        frames = 0
        full = False
        # Round-robin, one frame per connection per pass, so a client that
        # uploads a lot cannot starve the others.
        while self._pending and not full:
            for conn in list(self._pending):
                queue = self._pending[conn]
                entry = queue[0]
                kind, payload, offset = entry
                assert isinstance(payload, bytes) and isinstance(offset, int)
                chunk = min(len(payload) - offset, abi.MAX_FRAME_PAYLOAD)
                size = _frame_size(chunk)
                pos = head & _MASK
                room = _CAP - pos
                need = size if size <= room else room + size
                if need > free:
                    full = True
                    break
                if size > room:
                    _HEADER.pack_into(ram, data_base + pos, 0, abi.FrameType.PAD, 0)
                    head = (head + room) & _U32
                    free -= room
                    pos = 0
                addr = data_base + pos
                _HEADER.pack_into(ram, addr, conn, kind, chunk)
                if chunk:
                    ram[addr + 8 : addr + 8 + chunk] = payload[offset : offset + chunk]
                head = (head + size) & _U32
                free -= size
                frames += 1
                self._pending_bytes[conn] -= chunk
                if offset + chunk < len(payload):
                    entry[2] = offset + chunk
                else:
                    queue.popleft()
                    if not queue:
                        del self._pending[conn]
                        del self._pending_bytes[conn]
        if frames == 0:
            return []
        self._mark_ring_data(abi.RX_RING_ADDR, start, (head - start) & _U32)
        # Frames first, then the index that publishes them.
        self._rx_head = head
        self._store_u32(abi.RX_RING_ADDR + abi.RING_HEAD_OFFSET, head)
        if self._rx_tap is not None:
            self._rx_tap(start, self._ring_bytes(start, (head - start) & _U32))
        self.counters["rx_frames"] += frames
        drained = [c for c in self._throttled if self._pending_bytes.get(c, 0) <= INPUT_LOW_WATER]
        self._throttled.difference_update(drained)
        return drained

    def _ring_bytes(self, start: int, length: int) -> bytes:
        base = abi.RX_RING_ADDR + abi.RING_DATA_OFFSET
        pos = start & _MASK
        first = min(length, _CAP - pos)
        out = bytes(self._ram[base + pos : base + pos + first])
        if first < length:
            out += bytes(self._ram[base : base + length - first])
        return out

    def _apply_mirror_locked(self, batches: dict[int, bytes]) -> None:
        """Write mirrored batches that continue the ring at its head, as far as the guest made room.

        Batches may arrive in any order. One published before the state this
        ring was last restored to is already in it and is dropped; one applied
        since is kept, because the next restore may go back before it."""
        base = abi.RX_RING_ADDR + abi.RING_DATA_OFFSET
        start = head = self._rx_head
        floor = self._mirror_floor
        for position in [p for p in batches if 0 < (floor - p) & _U32 < 1 << 31]:
            del batches[position]
        while head in batches:
            data = batches[head]
            tail = self._load_u32(abi.RX_RING_ADDR + abi.RING_TAIL_OFFSET)
            if ((head - tail) & _U32) + len(data) > _CAP:
                break  # the guest has not consumed enough yet
            pos = head & _MASK
            first = min(len(data), _CAP - pos)
            self._ram[base + pos : base + pos + first] = data[:first]
            if first < len(data):
                self._ram[base : base + len(data) - first] = data[first:]
            self._track_mirrored(head, data)
            head = (head + len(data)) & _U32
        if head != start:
            self._mark_ring_data(abi.RX_RING_ADDR, start, (head - start) & _U32)
            self._rx_head = head
            self._store_u32(abi.RX_RING_ADDR + abi.RING_HEAD_OFFSET, head)

    def _track_mirrored(self, position: int, data: bytes) -> None:
        """Follow OPEN and CLOSE in mirrored frames, so the guest's output on those
        connections is handed over like a primary's (and promotion knows what is open)."""
        pos = 0
        while pos + abi.FRAME_HEADER_SIZE <= len(data):
            conn, kind, length = _HEADER.unpack_from(data, pos)
            if kind == abi.FrameType.PAD:
                pos += _CAP - ((position + pos) & _MASK)  # padding up to the ring's end
                continue
            if kind == abi.FrameType.OPEN:
                self._open.add(conn)
            elif kind == abi.FrameType.CLOSE:
                self._open.discard(conn)
            pos += _frame_size(length)

    def _notify_drained(self, conns: list[int]) -> None:
        callback = self._on_input_drained
        if callback is not None:
            for conn in conns:
                callback(conn)

    def _drain_tx_locked(self, out: list[tuple[int, bytes, bool]]) -> None:
        head = self._load_u32(abi.TX_RING_ADDR + abi.RING_HEAD_OFFSET)
        tail = self._tx_tail
        if head == tail:
            return
        used = (head - tail) & _U32
        ram = self._ram
        data_base = abi.TX_RING_ADDR + abi.RING_DATA_OFFSET
        problem = None
        if used > _CAP or used % abi.FRAME_ALIGN:
            problem = f"head {head:#x} is inconsistent with tail {tail:#x}"
        frames = 0
        while problem is None and tail != head:
            pos = tail & _MASK
            left = (head - tail) & _U32
            conn, kind, length = _HEADER.unpack_from(ram, data_base + pos)
            if kind == abi.FrameType.PAD:
                if _CAP - pos > left:
                    problem = f"PAD at {pos:#x} runs past the head"
                    break
                tail = (tail + _CAP - pos) & _U32
                continue
            size = _frame_size(length)
            if length > abi.MAX_FRAME_PAYLOAD or size > _CAP - pos or size > left:
                problem = f"frame at {pos:#x} with length {length} overruns the ring"
                break
            frames += 1
            if kind == abi.FrameType.DATA:
                if length and conn in self._open:
                    data = bytes(ram[data_base + pos + 8 : data_base + pos + 8 + length])
                    if out and out[-1][0] == conn and not out[-1][2]:
                        # Coalesce a reply written as several frames.
                        out[-1] = (conn, out[-1][1] + data, False)
                    else:
                        out.append((conn, data, False))
            elif kind == abi.FrameType.CLOSE:
                if conn in self._open:
                    self._open.discard(conn)
                    self._throttled.discard(conn)
                    self._pending.pop(conn, None)
                    self._pending_bytes.pop(conn, None)
                    out.append((conn, b"", True))
            else:
                problem = f"frame of type {kind} at {pos:#x} is not valid on TX"
                break
            tail = (tail + size) & _U32
        if problem is not None:
            # A corrupt ring means a firmware bug. Skip what is left rather
            # than guess at frame boundaries, and keep serving.
            self.counters["tx_errors"] += 1
            log.error("NIC: malformed TX ring (%s); discarding %d bytes", problem, (head - tail) & _U32)
            tail = head
        self.counters["tx_frames"] += frames
        self._tx_tail = tail
        self._store_u32(abi.TX_RING_ADDR + abi.RING_TAIL_OFFSET, tail)

    def _wait(self, timeout_us: int) -> None:
        self.counters["waits"] += 1
        deadline = None if timeout_us == abi.WAIT_FOREVER else time.monotonic() + timeout_us / 1e6
        drained: list[int] = []
        with self._lock:
            while not self._waits_interrupted:
                drained += self._flush_rx_locked()
                if self.rx_used():
                    break
                if deadline is None:
                    self._wakeup.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wakeup.wait(remaining)
        self._notify_drained(drained)

    def _console_byte(self, byte: int) -> None:
        if byte == 0x0A:
            self._flush_console()
        elif byte != 0x0D:
            self._console.append(byte)
            if len(self._console) >= CONSOLE_LINE_MAX:
                self._flush_console()

    def _flush_console(self) -> None:
        if self._console:
            guest_log.info("%s", self._console.decode("utf-8", "replace"))
            self._console.clear()
