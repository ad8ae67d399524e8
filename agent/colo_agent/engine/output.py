"""Output held back until the state that produced it is safe.

The primary's guest writes replies at any time; the guest's NIC hands them
over in the vCPU thread. Each chunk is tagged with the epoch that is open at
that moment: the engine closes an epoch (`seal`) while the guest is paused,
so a chunk drained before that pause can never be tagged with a later epoch
than the one whose checkpoint contains the state that produced it. A chunk
is released only once its epoch is acknowledged (`release_through`), in the
order the guest produced it.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutputChunk:
    epoch: int
    conn: int
    data: bytes
    closed: bool


class OutputGate:
    """Thread-safe FIFO of guest output, released epoch by epoch."""

    def __init__(self, first_epoch: int = 1) -> None:
        self._lock = threading.Lock()
        self._open_epoch = first_epoch
        self._held: deque[OutputChunk] = deque()
        self._held_bytes = 0
        self._open_has_output = False

    @property
    def open_epoch(self) -> int:
        """The epoch that output produced now belongs to."""
        return self._open_epoch

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def hold(self, conn_id: int, data: bytes, closed: bool) -> bool:
        """Called by the guest's NIC (any thread) for every chunk of output.
        True for the first chunk of the open epoch: from now on output waits for a seal."""
        with self._lock:
            self._held.append(OutputChunk(self._open_epoch, conn_id, data, closed))
            self._held_bytes += len(data)
            first, self._open_has_output = not self._open_has_output, True
            return first

    def seal(self) -> int:
        """Close the open epoch (the guest is paused) and return its number."""
        with self._lock:
            sealed = self._open_epoch
            self._open_epoch += 1
            self._open_has_output = False
            return sealed

    def release_through(self, epoch: int) -> list[OutputChunk]:
        """Remove and return, in order, every chunk of an epoch <= `epoch`."""
        out: list[OutputChunk] = []
        with self._lock:
            while self._held and self._held[0].epoch <= epoch:
                chunk = self._held.popleft()
                self._held_bytes -= len(chunk.data)
                out.append(chunk)
        return out

    def release_all(self) -> list[OutputChunk]:
        """Everything held: the guest runs unprotected, or its epochs no longer matter."""
        return self.release_through(self._open_epoch)

    def drop_connection(self, conn_id: int) -> None:
        """The client went away: its held output has nobody to go to."""
        with self._lock:
            kept = deque(c for c in self._held if c.conn != conn_id)
            self._held_bytes = sum(len(c.data) for c in kept)
            self._held = kept
