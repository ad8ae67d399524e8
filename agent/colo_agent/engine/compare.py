"""Lockstep output comparison on the primary (pure: no I/O, time is an argument).

Both guests run on the same input. Per connection, the primary's output is
a byte stream; both sides report it with absolute offsets, counted by the
primary's role from its first byte (the offsets its marks carry), so a
comparator made for a later pairing lines up with them too. Bytes the two agree on leave at once ("released on
match"). Anything else waits for a checkpoint: output produced before the
pause that closed epoch e is safe once e is acknowledged ("released on
ack"), whatever the secondary said.

Generations: when the secondary commits epoch e its guest is reset to the
primary's state at that pause, so its stream restarts at the offsets the
primary had reached then (`Mark.offsets`). The secondary tags what it sends
with the epoch it last committed; the comparator only compares output of
the generation it knows to be current (the last acknowledged epoch) and
keeps output of a later one until that acknowledgement arrives.

A mismatch, or primary output left unmatched for longer than the compare
timeout, or more unmatched bytes than the queue allows, asks for a
checkpoint (`Verdict.checkpoint`).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class Cause(enum.StrEnum):
    MISMATCH = "mismatch"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Release:
    conn: int
    data: bytes
    closed: bool
    on_match: bool  # False: released because its epoch was acknowledged


@dataclass
class Verdict:
    releases: list[Release] = field(default_factory=list)
    checkpoint: Cause | None = None

    def extend(self, other: Verdict) -> None:
        self.releases += other.releases
        if self.checkpoint is None:
            self.checkpoint = other.checkpoint


@dataclass(frozen=True)
class Mark:
    """The primary's output position at the pause that closed `epoch`: per
    connection, bytes produced so far and whether it had closed."""

    epoch: int
    offsets: dict[int, tuple[int, bool]]


@dataclass
class _Stream:
    base: int = 0  # absolute offset of pending[0]
    pending: bytearray = field(default_factory=bytearray)
    closed: bool = False  # the primary closed it after `pending`
    # (end offset, time produced) of chunks still pending, for the timeout.
    times: deque[tuple[int, float]] = field(default_factory=deque)
    sec_off: int = 0  # absolute offset of sec[0]
    sec: bytearray = field(default_factory=bytearray)
    sec_closed: bool = False
    diverged: bool = False  # mismatch in the current generation: wait for the next one

    @property
    def produced(self) -> int:
        return self.base + len(self.pending)


class OutputComparator:
    def __init__(self, compare_timeout: float, max_queue: int) -> None:
        self.compare_timeout = compare_timeout
        self.max_queue = max_queue
        self.generation = 0  # the last acknowledged epoch: the secondary's current base
        self._streams: dict[int, _Stream] = {}
        self._later: list[tuple[int, int, int, bytes, bool]] = []  # secondary output of a later generation
        self.released_on_match = 0
        self.released_on_ack = 0

    # ------------------------------------------------------------------ inputs

    def primary_output(self, conn: int, data: bytes, closed: bool, now: float, *, offset: int) -> Verdict:
        """The primary's output of `conn` starting at absolute `offset` (the primary's own count,
        the one its marks carry). A stream this comparator has not seen yet starts there: output
        before it went out another way (before this pairing, or through the output gate)."""
        s = self._streams.get(conn)
        if s is None:
            s = self._streams[conn] = _Stream(base=offset, sec_off=offset)
        if s.closed:
            return Verdict()
        if offset != s.produced:
            if s.pending or offset < s.produced:
                raise ValueError(f"output of connection {conn} at offset {offset}, but "
                                 f"{s.produced} bytes were produced so far")
            s.base = offset  # nothing pending: what came between went out another way
        s.pending += data
        s.closed = closed
        if data:
            s.times.append((s.produced, now))
        v = self._match(conn, s)
        v.extend(self._pressure())
        return v

    def secondary_output(self, generation: int, conn: int, offset: int, data: bytes, closed: bool) -> Verdict:
        if generation < self.generation:
            return Verdict()  # produced before a reset the primary already knows of
        if generation > self.generation:
            self._later.append((generation, conn, offset, data, closed))
            return Verdict()
        s = self._streams.setdefault(conn, _Stream())
        if s.diverged:
            return Verdict()
        if offset != s.sec_off + len(s.sec):
            s.diverged = True  # a hole or an overlap: the streams cannot be lined up
            return Verdict(checkpoint=Cause.MISMATCH)
        s.sec += data
        s.sec_closed = s.sec_closed or closed
        return self._match(conn, s)

    def acknowledged(self, mark: Mark) -> Verdict:
        """Epoch `mark.epoch` is safe on the secondary, which restarts from `mark`."""
        v = Verdict()
        for conn, (offset, closed) in mark.offsets.items():
            s = self._streams.get(conn)
            if s is None:
                if not closed:  # its output after the pause starts there, on both sides
                    self._streams[conn] = _Stream(base=offset, sec_off=offset)
                continue
            # Only pending bytes below the mark: those after it were produced after the pause.
            n = min(offset - s.base, len(s.pending))
            whole = n == len(s.pending) and offset >= s.produced
            if n > 0:
                v.releases.append(Release(conn, bytes(s.pending[:n]), closed and whole, False))
                self._drop(s, n)
                self.released_on_ack += n
                if closed and whole:
                    s.closed = True
            elif closed and s.closed and not s.pending:
                v.releases.append(Release(conn, b"", True, False))
            if not s.pending and s.base < offset:
                s.base = offset  # bytes below the mark went out another way
        self.generation = mark.epoch
        for conn, s in list(self._streams.items()):
            offset, closed = mark.offsets.get(conn, (0, False))
            if s.closed and not s.pending and closed:
                del self._streams[conn]
                continue
            s.sec_off, s.sec, s.sec_closed, s.diverged = offset, bytearray(), False, False
        later, self._later = self._later, []
        for gen, conn, offset, data, closed in later:
            v.extend(self.secondary_output(gen, conn, offset, data, closed))
        return v

    def release_all(self) -> list[Release]:
        """No secondary any more: everything pending may go (the lease still decides)."""
        out = [Release(c, bytes(s.pending), s.closed, False) for c, s in self._streams.items()
               if s.pending or s.closed]
        self._streams.clear()
        self._later.clear()
        return out

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        oldest = [s.times[0][1] for s in self._streams.values() if s.times and not s.diverged]
        return min(oldest) + self.compare_timeout if oldest else None

    def handle_timer(self, now: float) -> Verdict:
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            return Verdict(checkpoint=Cause.TIMEOUT)
        return Verdict()

    @property
    def pending_bytes(self) -> int:
        return sum(len(s.pending) for s in self._streams.values())

    # ------------------------------------------------------------------ internals

    def _match(self, conn: int, s: _Stream) -> Verdict:
        if s.diverged:
            return Verdict()
        # Secondary bytes below `base` repeat output already released (on ack): skip them.
        skip = min(max(0, s.base - s.sec_off), len(s.sec))
        if skip:
            del s.sec[:skip]
            s.sec_off += skip
        if s.sec_off != s.base:
            return Verdict()  # the secondary has not caught up with what was released yet
        n = min(len(s.pending), len(s.sec))
        if s.pending[:n] != s.sec[:n]:
            s.diverged = True
            return Verdict(checkpoint=Cause.MISMATCH)
        close = s.closed and s.sec_closed and n == len(s.pending) == len(s.sec)
        if (s.sec_closed and len(s.sec) == n and len(s.pending) > n) or (
            s.closed and len(s.pending) == n and len(s.sec) > n
        ):
            s.diverged = True  # one side closed where the other went on
            return Verdict(checkpoint=Cause.MISMATCH)
        if not n and not close:
            return Verdict()
        data = bytes(s.pending[:n])
        self._drop(s, n)
        del s.sec[:n]
        s.sec_off += n
        self.released_on_match += n
        if close:
            del self._streams[conn]
        return Verdict([Release(conn, data, close, True)])

    def _drop(self, s: _Stream, n: int) -> None:
        del s.pending[:n]
        s.base += n
        while s.times and s.times[0][0] <= s.base:
            s.times.popleft()

    def _pressure(self) -> Verdict:
        if self.pending_bytes > self.max_queue:
            return Verdict(checkpoint=Cause.TIMEOUT)
        return Verdict()
