"""The backend seam: what the replication engine needs from a guest.

A backend runs one guest (the micro-VM in `colo_agent.microvm`, QEMU, ...).
The engine never imports a backend: `colo_agent.backends.create_guest` picks
one by name (`colo-agent run --backend`, env `COLO_BACKEND`, which the
operator fills from `spec.guest.backend`) and hands the engine a `Guest`.

To write a backend:

1. Implement `Guest`: start/stop, pause/resume, and the few figures the
   agent reports (`accelerator`, `ram_size`, `running`).
2. Say how the guest is replicated, by returning non-`None` from exactly one
   of these two:
   - `page_log()` -> `PageLog`: the backend hands out the pages written
     since the last collection, a byte view of RAM, and its device state.
     The engine does the rest: pauses, stages the dirty pages, streams them
     to the secondary, holds output until the epoch is acknowledged. A
     page-log backend must also offer `client_nic()`, since the engine holds
     the guest's output.
   - `migration_stream()` -> `MigrationStream`: the backend replicates its
     own state (QEMU's x-colo migration, with colo-compare releasing output
     inside QEMU). The engine keeps what such a backend lacks: the agents'
     pairing and heartbeat, the Lease and its terms, the epoch floor,
     promotion, status and metrics.
3. Offer what else you can, each an optional capability:
   - `client_nic()` -> `ClientNic`: client connections multiplexed over the
     guest's NIC; the agent's `ClientBridge` serves TCP clients through it.
     A backend whose guest has its own network device (a tap in the pod)
     returns `None`.
   - `mirrored_nic()` -> `MirroredNic`: input can be tapped on the primary
     and replayed on the secondary, which lockstep mode needs.
4. Add the backend's name and module to `colo_agent.backends.BACKENDS`; the
   module has `create_guest(options: GuestOptions) -> Guest`.

The engine asks for the capabilities once, at start (`Capabilities.of`), and
refuses a mode the backend cannot serve there, not halfway through a run.

Threads: `pause`, `resume`, `collect_dirty` and the device-state calls come
from the event loop thread; the output callback is called from whichever
thread the guest's NIC drains output in (the vCPU thread, for the micro-VM),
at the moment it drains it, which is what lets the engine tag every chunk
with the epoch open at that instant.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from colo_agent.constants import PAGE_SIZE as PAGE_SIZE

# on_output(conn_id, data, closed): bytes the guest sent on a connection;
# `closed` is True when the guest closed it (data is then empty).
OutputCallback = Callable[[int, bytes, bool], None]
# An RX tap: (ring position, bytes) of every batch of input the NIC takes in.
InputTap = Callable[[int, bytes], None]


class Guest(Protocol):
    """Every backend."""

    @property
    def accelerator(self) -> str:
        """How the guest runs (`kvm`, `tcg`, ...), for status."""

    @property
    def ram_size(self) -> int: ...

    @property
    def running(self) -> bool:
        """Started, not stopped and not paused."""

    def start(self) -> None:
        """Boot the guest (or, after `PageLog.load_device_state`, continue from that state)."""

    def stop(self) -> None:
        """Stop the guest for good and release what it holds."""

    def pause(self) -> None:
        """Return once the guest executes no more instructions until `resume`."""

    def resume(self) -> None: ...

    def page_log(self) -> PageLog | None:
        """This guest, if the engine replicates it page by page; else None."""

    def migration_stream(self) -> MigrationStream | None:
        """This guest, if it replicates itself; else None."""

    def client_nic(self) -> ClientNic | None:
        """The NIC the agent bridges client connections to, if any."""

    def mirrored_nic(self) -> MirroredNic | None:
        """The NIC's lockstep taps, if the backend has them."""


class PageLog(Protocol):
    """Dirty-page collection and device state: the engine replicates the guest."""

    @property
    def ram(self) -> memoryview:
        """Writable view of guest RAM (page-aligned, `page_count * PAGE_SIZE` bytes)."""

    @property
    def page_count(self) -> int: ...

    def collect_dirty(self) -> npt.NDArray[np.int64]:
        """Sorted, unique indices of pages written since the previous call."""

    def save_device_state(self) -> bytes:
        """Everything outside RAM the guest needs to continue (paused only)."""

    def load_device_state(self, data: bytes, *, keep_connections: bool = False) -> None:
        """Adopt a state saved by `save_device_state` (paused only).

        Connections open in the saved state are closed towards the guest,
        unless `keep_connections` (a lockstep secondary keeps them: it is fed
        the same clients' input)."""


class StreamError(RuntimeError):
    """A `MigrationStream` could not do what was asked (its own process refused, died or hung).

    The engine treats it as the end of the pairing at hand, never as a bug."""


@dataclass(frozen=True)
class StreamCheckpoint:
    pause_ms: float  # the primary's guest was stopped this long
    cause: str  # a CheckpointCause value (`interval`, `mismatch`, ...)


@dataclass(frozen=True)
class StreamFigures:
    """What a self-replicating backend says about its replication, for status and metrics."""

    protected: bool  # primary: replicating to a secondary right now
    checkpoints: int  # since this guest became primary, every protection included
    recent: tuple[StreamCheckpoint, ...] = ()  # the last few, oldest first
    mismatches: int = 0  # checkpoints forced because the outputs differed
    state: str = ""  # the backend's own word for where replication is (QEMU: query-migrate status)
    channels: int = 1  # connections the stream uses (1: single-stream)


class MigrationStream(Protocol):
    """A backend that replicates itself (QEMU COLO): the engine drives it, never sees its pages.

    Primary side: `serve` once it holds the lease, `protect` once the agents
    are paired, `continue_alone` when the secondary is lost (after the
    engine raised the epoch floor). Secondary side: `listen` before pairing,
    `take_over` on promotion (after the engine took the Lease with the new
    term). Failures are `StreamError`s.
    """

    async def listen(self) -> str:
        """Secondary: prepare to receive; returns the address the primary streams to."""

    async def serve(self, host: str, port: int) -> None:
        """Primary: open the guest's service to clients on host:port."""

    async def protect(self, secondary: str) -> None:
        """Primary: start replicating to `secondary`; return once it holds a complete image."""

    async def continue_alone(self) -> None:
        """Primary: the secondary is gone; output leaves without comparison from now on."""

    async def take_over(self) -> None:
        """Secondary: become the running guest from the last complete checkpoint."""

    async def figures(self) -> StreamFigures:
        """Primary: the replication's figures now."""

    @property
    def checkpoints(self) -> int: ...


class ClientNic(Protocol):
    """Many client connections over the guest's NIC."""

    def open_connection(self) -> int: ...

    def send_input(self, conn_id: int, data: bytes) -> None: ...

    def close_connection(self, conn_id: int) -> None: ...

    def set_output_callback(self, callback: OutputCallback) -> None: ...

    def input_full(self, conn_id: int) -> bool:
        """More of `conn_id`'s input is queued than the guest should be sent; stop reading it."""

    def set_input_drained_callback(self, callback: Callable[[int], None] | None) -> None:
        """`callback(conn_id)` once a connection's queued input fell back below its mark."""


class MirroredNic(Protocol):
    """Lockstep: the primary's input tapped, the secondary's NIC fed the same input."""

    @property
    def open_connections(self) -> Set[int]: ...

    def set_rx_tap(self, tap: InputTap | None) -> None:
        """Primary: call `tap` with every batch of input, in ring order."""

    def enable_rx_mirror(self) -> None:
        """Secondary: input comes only through `mirror_rx` from now on."""

    def disable_rx_mirror(self) -> None:
        """A promoted secondary takes input from its own clients again."""

    def mirror_rx(self, position: int, data: bytes) -> None:
        """Secondary: a batch the primary's tap saw at `position`."""


@dataclass(frozen=True)
class Capabilities:
    """What a guest offers, asked once when the engine starts."""

    pages: PageLog | None
    stream: MigrationStream | None
    clients: ClientNic | None
    mirror: MirroredNic | None

    @classmethod
    def of(cls, guest: Guest) -> Capabilities:
        caps = cls(guest.page_log(), guest.migration_stream(), guest.client_nic(), guest.mirrored_nic())
        if (caps.pages is None) == (caps.stream is None):
            raise ValueError("a backend offers exactly one of page_log() and migration_stream()")
        if caps.pages is not None and caps.clients is None:
            raise ValueError("a page-log backend needs client_nic(): the engine holds the guest's output")
        return caps


@dataclass(frozen=True)
class GuestOptions:
    """What `colo-agent run` knows about the guest, for the backend's `create_guest`."""

    memory: int
    accel: str = "auto"
    dirty_rate: int = 0
    # A secondary's primary (the host of `--peer`), for a backend whose own connections go there.
    peer_host: str | None = None
