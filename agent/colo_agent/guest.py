"""The interface the replication engine needs from a guest backend.

A backend runs one guest. The engine pauses it between runs of the vCPU (so
the state is consistent), takes the pages written since the last collection,
saves device state, and resumes it. Output leaves through `on_output`, tagged
by the caller with the epoch during which it was drained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

PAGE_SIZE = 4096

# on_output(conn_id, data, closed): bytes the guest sent on a connection;
# `closed` is True when the guest closed it (data is then empty).
OutputCallback = Callable[[int, bytes, bool], None]


class Guest(Protocol):
    @property
    def ram(self) -> memoryview:
        """Writable view of guest RAM (page-aligned, `page_count * PAGE_SIZE` bytes)."""

    @property
    def page_count(self) -> int: ...

    def start(self) -> None:
        """Boot the firmware (or, after `load_device_state`, continue from it)."""

    def stop(self) -> None:
        """Stop the vCPU for good and release the accelerator."""

    def pause(self) -> None:
        """Return once the vCPU is outside the guest and will not re-enter it."""

    def resume(self) -> None: ...

    def collect_dirty(self) -> npt.NDArray[np.int64]:
        """Sorted, unique indices of pages written since the previous call."""

    def save_device_state(self) -> bytes:
        """Everything outside RAM the guest needs to continue (paused only)."""

    def load_device_state(self, data: bytes) -> None:
        """Adopt a state saved by `save_device_state`, any accelerator (paused only)."""

    # The guest's network device: many client connections over one NIC.
    def open_connection(self) -> int: ...

    def send_input(self, conn_id: int, data: bytes) -> None: ...

    def close_connection(self, conn_id: int) -> None: ...

    def set_output_callback(self, callback: OutputCallback) -> None: ...
