"""The colo cache (secondary) and the staging buffer (primary).

Checkpoint mode: the paused secondary guest's RAM *is* the committed image.
The cache holds only the epoch in flight: `capacity` page slots filled in
arrival order plus the page each slot stands for. Commit copies exactly those
pages into RAM in one numpy fancy-index assignment; an epoch that fails or
stops half-way is dropped by forgetting the slots, so RAM never sees it.
Secondary memory is RAM plus the slots (about 1.1x with the default
capacity), against 2x for a full mirror.

Lockstep mode: the secondary guest runs and dirties its own RAM, so the
cache is a full mirror of the primary's RAM. Pages land in the mirror once
their frame checksum holds; commit copies the union of the incoming marks and
the pages the secondary guest dirtied itself from the mirror into RAM.

First sync writes pages straight into RAM (and the mirror, in lockstep
mode): before the first commit RAM is not an image anyone resumes from.

Page data arrives with `recv_into`: `reserve` returns the destination of one
batch. In checkpoint mode it is the next free slots, contiguous by
construction; for sync (and lockstep) a batch of consecutive pages goes
straight to its place, any other batch into a per-channel bounce buffer that
`land` scatters once the checksum held.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from colo_agent.replication.protocol import MAX_BATCH_PAGES, PAGE_SIZE, LocalProtocolError, byte_view

PageArray = npt.NDArray[np.uint8]  # shape (pages, PAGE_SIZE)
Indices = npt.NDArray[np.int64]


def page_view(mem: memoryview | bytearray | PageArray) -> PageArray:
    """`mem` as a (pages, PAGE_SIZE) uint8 array sharing its memory."""
    flat = np.frombuffer(mem, dtype=np.uint8) if not isinstance(mem, np.ndarray) else mem.reshape(-1)
    if flat.size % PAGE_SIZE:
        raise ValueError(f"memory of {flat.size} bytes is not a whole number of {PAGE_SIZE}-byte pages")
    return flat.reshape(-1, PAGE_SIZE)


def image_digest(mem: memoryview | bytearray | PageArray) -> str:
    """xxh3_128 of a whole memory image, hex: for checking two images are equal."""
    return xxhash.xxh3_128_hexdigest(byte_view(page_view(mem)))


def default_capacity(page_count: int) -> int:
    """Slots for the epoch in flight: a tenth of RAM, at least 2048 pages (8 MiB)."""
    return min(page_count, max(page_count // 10, 2048))


def validate_indices(indices: Indices, page_count: int) -> str | None:
    """Why a batch of page indices is unacceptable, or None.

    Senders batch slices of a sorted, unique dirty set, so a batch must be
    strictly increasing: that rules out duplicates with one vectorised test.
    """
    n = len(indices)
    if n == 0:
        return "empty batch"
    if n > MAX_BATCH_PAGES:
        return f"batch of {n} pages exceeds {MAX_BATCH_PAGES}"
    if indices[0] < 0 or indices[-1] >= page_count:
        return f"page index out of range 0..{page_count - 1}"
    if n > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        return "page indices are not strictly increasing"
    return None


def _touched(shape: tuple[int, int]) -> PageArray:
    """Zeroed memory with every page already faulted in: otherwise the first
    epoch pays a page fault per 4 KiB inside recv_into or the pause."""
    buf = np.empty(shape, dtype=np.uint8)
    buf.fill(0)
    return buf


class IncomingDirtyBitmap:
    """Pages received (or, in lockstep mode, dirtied locally) since the last commit."""

    def __init__(self, page_count: int) -> None:
        self._bits = np.zeros(page_count, dtype=np.bool_)

    @property
    def page_count(self) -> int:
        return len(self._bits)

    def __len__(self) -> int:
        """Number of marked pages."""
        return int(np.count_nonzero(self._bits))

    def any_marked(self, indices: Indices) -> bool:
        return bool(self._bits[indices].any())

    def mark(self, indices: Indices) -> None:
        self._bits[indices] = True

    def is_marked(self, page: int) -> bool:
        return bool(self._bits[page])

    def indices(self) -> Indices:
        return np.flatnonzero(self._bits).astype(np.int64, copy=False)

    def union(self, indices: Indices) -> Indices:
        """Marked pages together with `indices`, sorted (the bitmap is unchanged)."""
        bits = self._bits.copy()
        bits[indices] = True
        return np.flatnonzero(bits).astype(np.int64, copy=False)

    def clear(self) -> None:
        self._bits[:] = False


class CacheMode(enum.Enum):
    CHECKPOINT = "checkpoint"
    LOCKSTEP = "lockstep"


@dataclass
class _Reservation:
    indices: Indices
    sync: bool
    # Where the data went: slots [slot, slot+n) in checkpoint mode, the final
    # place when `direct`, else the channel's bounce buffer.
    slot: int
    direct: bool
    # Its epoch was aborted while the data was still arriving: the bytes are
    # garbage, but the memory must not be handed out again until they stop.
    zombie: bool = False


@dataclass(frozen=True)
class Committed:
    epoch: tuple[int, int]  # (term, epoch)
    pages: int  # pages copied into RAM


class ColoCache:
    """Receives an epoch beside the committed image and commits it whole."""

    def __init__(
        self,
        ram: memoryview | bytearray | PageArray,
        *,
        mode: CacheMode = CacheMode.CHECKPOINT,
        capacity: int | None = None,
    ) -> None:
        self._ram = page_view(ram)
        if not self._ram.flags.writeable:
            raise ValueError("guest RAM must be writable")
        self.mode = mode
        n = len(self._ram)
        self.capacity = default_capacity(n) if capacity is None else capacity
        if mode is CacheMode.LOCKSTEP:
            self.capacity = n
        if not 1 <= self.capacity <= n:
            raise ValueError(f"cache capacity must be 1..{n} pages, not {self.capacity}")
        self.incoming = IncomingDirtyBitmap(n)
        self._slots: PageArray | None = None
        self._slot_page: Indices | None = None
        self._mirror: PageArray | None = None
        if mode is CacheMode.CHECKPOINT:
            self._slots = _touched((self.capacity, PAGE_SIZE))
            self._slot_page = np.zeros(self.capacity, dtype=np.int64)
        else:
            self._mirror = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
        self._used = 0
        self._base = 0  # first slot of the epoch in flight; slots below belong to zombies
        self._pending: dict[int, _Reservation] = {}
        self._bounce: dict[int, PageArray] = {}
        self.committed: Committed | None = None
        self.device_state: bytes | None = None

    @property
    def page_count(self) -> int:
        return len(self._ram)

    @property
    def ram(self) -> PageArray:
        return self._ram

    @property
    def mirror(self) -> PageArray | None:
        """The full mirror of the primary's RAM (lockstep mode only)."""
        return self._mirror

    @property
    def free_slots(self) -> int:
        return self.capacity - self._used if self.mode is CacheMode.CHECKPOINT else self.capacity

    def outstanding(self) -> int:
        """Batches of the epoch in flight reserved but not yet landed or dropped."""
        return sum(not r.zombie for r in self._pending.values())

    # -- receiving ----------------------------------------------------------

    def reserve(self, channel: int, indices: Indices, *, sync: bool = False) -> memoryview:
        """Destination (len(indices) * PAGE_SIZE bytes) for one batch on `channel`.

        Raises ValueError for a batch the peer should not have sent (the
        caller turns it into a remote error) and LocalProtocolError when a
        channel already has a batch outstanding.
        """
        if channel in self._pending:
            raise LocalProtocolError(f"channel {channel} already has a batch outstanding")
        why = validate_indices(indices, self.page_count)
        if why is not None:
            raise ValueError(why)
        n = len(indices)
        consecutive = int(indices[-1]) - int(indices[0]) == n - 1
        first = int(indices[0])
        if sync:
            if self.committed is not None:
                raise LocalProtocolError(
                    "first-sync pages after a commit would overwrite the committed image"
                )
            if consecutive:
                self._pending[channel] = _Reservation(indices, True, 0, True)
                return byte_view(self._ram[first : first + n])
            self._pending[channel] = _Reservation(indices, True, 0, False)
            return byte_view(self._bounce_for(channel)[:n])
        if self.incoming.any_marked(indices):
            raise ValueError("a page arrived twice in one epoch")
        if self.mode is CacheMode.LOCKSTEP:
            self.incoming.mark(indices)
            self._pending[channel] = _Reservation(indices, False, 0, False)
            return byte_view(self._bounce_for(channel)[:n])
        assert self._slots is not None and self._slot_page is not None
        if self._used + n > self.capacity:
            raise ValueError(f"epoch exceeds the cache of {self.capacity} pages")
        slot = self._used
        self._used += n
        self._slot_page[slot : slot + n] = indices
        self.incoming.mark(indices)
        self._pending[channel] = _Reservation(indices, False, slot, False)
        return byte_view(self._slots[slot : slot + n])

    def land(self, channel: int) -> None:
        """The batch on `channel` arrived and its checksum holds."""
        r = self._pending.get(channel)
        if r is None or r.zombie:
            raise LocalProtocolError(f"channel {channel} has no batch of the epoch in flight outstanding")
        del self._pending[channel]
        n = len(r.indices)
        if r.sync:
            if not r.direct:
                self._ram[r.indices] = self._bounce[channel][:n]
            if self._mirror is not None:
                self._mirror[r.indices] = self._ram[r.indices]
        elif self.mode is CacheMode.LOCKSTEP:
            assert self._mirror is not None
            self._mirror[r.indices] = self._bounce[channel][:n]

    def drop(self, channel: int) -> None:
        """Release the batch on `channel`, if any, without landing it: it failed
        its checksum (the epoch must then be aborted) or belonged to an
        aborted epoch and its data has stopped arriving."""
        self._pending.pop(channel, None)
        if self._used == self._base:
            self._used = self._base = self._zombie_end()

    def abort(self) -> None:
        """Forget the epoch in flight; RAM (the committed image) is untouched.

        Batches still arriving become zombies: their memory stays reserved
        until `drop`, so a re-sent epoch never shares memory with them. In
        lockstep mode pages that already landed stay in the mirror: they are
        the primary's and the re-sent epoch rewrites them anyway.
        """
        for r in self._pending.values():
            # First-sync batches are not part of any epoch: they carry on.
            r.zombie = r.zombie or not r.sync
        self._used = self._base = self._zombie_end()
        self.incoming.clear()

    def _zombie_end(self) -> int:
        ends = [r.slot + len(r.indices) for r in self._pending.values() if r.zombie and not r.sync]
        return max(ends, default=0) if self.mode is CacheMode.CHECKPOINT else 0

    def end_pairing(self) -> None:
        """The pairing that filled the cache is over and its connections are
        shut, so none of its data can arrive any more: forget the epoch in
        flight and every reservation, first-sync batches and zombies included.

        The committed image stays as it was; the next pairing finds the cache
        as this one found it.
        """
        self.abort()
        self._pending.clear()
        self._used = self._base = 0

    def reset(self) -> None:
        """A new pairing will sync from scratch: forget the committed image."""
        self.end_pairing()
        self.committed = None
        self.device_state = None

    # -- committing ---------------------------------------------------------

    def commit(
        self, term: int, epoch: int, device_state: bytes, local_dirty: Indices | None = None
    ) -> Committed:
        """Copy the epoch into RAM and keep its device state.

        `local_dirty` (lockstep mode): pages the secondary guest wrote since
        the last commit; they are restored from the mirror as well.
        """
        if self.outstanding():
            raise LocalProtocolError(f"commit with {self.outstanding()} batches still outstanding")
        if self.mode is CacheMode.CHECKPOINT:
            if local_dirty is not None and len(local_dirty):
                raise LocalProtocolError("checkpoint mode: the secondary guest must not run between commits")
            assert self._slots is not None and self._slot_page is not None
            lo, hi = self._base, self._used
            n = hi - lo
            self._ram[self._slot_page[lo:hi]] = self._slots[lo:hi]
            # Sync is over once an epoch committed; its bounce buffers are garbage now.
            self._bounce.clear()
        else:
            assert self._mirror is not None
            pages = self.incoming.indices() if local_dirty is None else self.incoming.union(local_dirty)
            n = len(pages)
            self._ram[pages] = self._mirror[pages]
        self.device_state = bytes(device_state)
        self.committed = Committed((term, epoch), n)
        self._used = self._base = self._zombie_end()
        self.incoming.clear()
        return self.committed

    def _bounce_for(self, channel: int) -> PageArray:
        buf = self._bounce.get(channel)
        if buf is None:
            buf = self._bounce[channel] = np.empty((MAX_BATCH_PAGES, PAGE_SIZE), dtype=np.uint8)
        return buf


class StagingBuffer:
    """Primary side: the dirty pages of one pause, copied out of guest RAM.

    The pause costs one gather (`np.take` into preallocated memory); the
    guest then resumes and the stream reads from here.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("staging capacity must be at least one page")
        self._buf = _touched((capacity, PAGE_SIZE))
        self.capacity = capacity

    def stage(self, ram: PageArray, indices: Indices) -> PageArray:
        """Copy pages `indices` of `ram` into staging; returns the (n, PAGE_SIZE) view."""
        n = len(indices)
        if n > self.capacity:
            raise LocalProtocolError(f"{n} dirty pages exceed the staging capacity of {self.capacity}")
        out = self._buf[:n]
        if n and (int(indices.min()) < 0 or int(indices.max()) >= len(ram)):
            raise LocalProtocolError(f"page index out of range 0..{len(ram) - 1}")
        # mode="clip" (indices were just checked) lets numpy copy straight
        # into `out`; the default mode buffers the whole result first and
        # runs at a fifth of memory bandwidth.
        np.take(ram, indices, axis=0, out=out, mode="clip")
        return out
