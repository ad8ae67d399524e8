"""The micro-VM monitor: guest RAM, one vCPU thread, the device model.

`Machine` implements `colo_agent.guest.Guest` over a kvm or tcg accelerator.
RAM is a file mapped shared (under $COLO_RAM_DIR, else /dev/shm), so the
agent and tools can look at it and the replication engine can copy pages out
of it with numpy without going through the vCPU.

The vCPU thread loops on `accel.run()`. Pausing kicks it out of the guest,
wakes a WAIT in progress, drains the TX ring (the output of the epoch that
is ending) and parks the thread; `pause()` returns once it is parked. While
paused no guest instruction runs and the device model does not write RAM,
so RAM plus `save_device_state()` is one consistent image.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from colo_agent.guest import ClientNic, Guest, MirroredNic, OutputCallback, PageLog
from colo_agent.microvm import abi, boot, state
from colo_agent.microvm.accel import Accelerator, RunResult
from colo_agent.microvm.config import choose_accelerator, parse_memory, validate_dirty_rate
from colo_agent.microvm.devices import INPUT_HIGH_WATER, DeviceModel

log = logging.getLogger(__name__)

_SHM = Path("/dev/shm")
# Where an unnamed RAM file goes instead of /dev/shm: a container's /dev/shm
# is 64 MiB unless told otherwise, so agent pods mount a memory-backed
# emptyDir sized from guest memory and point this at it.
RAM_DIR_ENV = "COLO_RAM_DIR"


class MachineError(RuntimeError):
    """The machine cannot do what was asked in its current state."""


class FirmwareImage(Protocol):
    """A flat image loaded at FIRMWARE_ADDR (firmware_build.Firmware is one)."""

    @property
    def image(self) -> bytes: ...

    @property
    def heap_start(self) -> int:
        """Page-aligned first address past the image and its bss."""


@functools.cache
def default_firmware() -> FirmwareImage:
    """The firmware of this package's sources, prebuilt or built (once per process)."""
    from colo_agent.microvm.firmware_build import default_firmware as load

    return load()


def _make_accelerator(name: str, ram: mmap.mmap, io: DeviceModel) -> Accelerator:
    if name == "kvm":
        from colo_agent.microvm.kvm import KvmAccelerator, install_kick_signal_handler

        # kick() interrupts KVM_RUN with a signal, whose handler only the main
        # thread may install; a machine created elsewhere relies on the
        # agent's main having done it (run() says so clearly otherwise).
        if threading.current_thread() is threading.main_thread():
            install_kick_signal_handler()
        return KvmAccelerator(ram, io)
    from colo_agent.microvm.tcg import TcgAccelerator

    return TcgAccelerator(ram, io)


class Machine:
    """One micro-VM. Create with `Machine.create(...)`; implements `Guest`."""

    def __init__(
        self,
        *,
        ram_size: int,
        accelerator: str,
        firmware: FirmwareImage | None,
        dirty_rate: int,
        ram_path: Path,
        ram_file: int,
        ram_map: mmap.mmap,
    ) -> None:
        self._ram_size = ram_size
        self._firmware = firmware
        self._dirty_rate = dirty_rate
        self._ram_path = ram_path
        self._ram_file = ram_file
        self._map = ram_map
        self._ram = memoryview(ram_map)
        self._ram_array: npt.NDArray[np.uint8] | None = np.frombuffer(ram_map, dtype=np.uint8)

        self.devices = DeviceModel(self._ram, on_panic=self._guest_panicked)
        try:
            self._accel: Accelerator = _make_accelerator(accelerator, ram_map, self.devices)
        except (OSError, RuntimeError) as exc:
            # No /dev/kvm access, a kernel without a needed capability...
            raise MachineError(f"cannot create the {accelerator} accelerator: {exc}") from exc
        self.accelerator = self._accel.name

        # Run state, guarded by _lock. The vCPU thread parks on _changed while
        # paused; pause() waits on it for the thread to get there.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._started = False
        self._want_pause = False
        self._want_stop = False
        self._parked = True  # the vCPU is outside the guest
        self._thread: threading.Thread | None = None
        self._loaded_state = False
        self._stopped = threading.Event()
        self._closed = False
        self.exit_reason: str | None = None

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        memory: int | str,
        accel: str = "auto",
        firmware: FirmwareImage | None = None,
        dirty_rate: int = 0,
        ram_path: str | os.PathLike[str] | None = None,
    ) -> Machine:
        """A machine with zeroed RAM, not running yet.

        `start()` then boots `firmware` (default: built from this package's
        sources), unless `load_device_state()` was called first with RAM
        copied in, in which case it continues from that state.
        """
        ram_size = parse_memory(memory)
        rate = validate_dirty_rate(dirty_rate)
        name = choose_accelerator(accel)
        path, fd = _create_ram_file(ram_size, ram_path)
        try:
            ram_map = mmap.mmap(fd, ram_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        try:
            machine = cls(
                ram_size=ram_size,
                accelerator=name,
                firmware=firmware,
                dirty_rate=rate,
                ram_path=path,
                ram_file=fd,
                ram_map=ram_map,
            )
        except BaseException:
            # Views the half-built machine took may still pin the mapping;
            # it goes with them. The file must go now.
            with contextlib.suppress(BufferError):
                ram_map.close()
            os.close(fd)
            _unlink(path)
            raise
        log.info("micro-VM: %d MiB RAM at %s, accelerator %s", ram_size >> 20, path, machine.accelerator)
        return machine

    # ---- Guest protocol ---------------------------------------------------------------------

    @property
    def ram(self) -> memoryview:
        return self._ram

    @property
    def ram_array(self) -> npt.NDArray[np.uint8]:
        """Guest RAM as a numpy uint8 array (shared, writable)."""
        if self._ram_array is None:
            raise MachineError("the machine is stopped; its RAM is gone")
        return self._ram_array

    @property
    def page_count(self) -> int:
        return self._ram_size // abi.PAGE_SIZE

    @property
    def ram_size(self) -> int:
        return self._ram_size

    @property
    def ram_path(self) -> Path:
        return self._ram_path

    @property
    def running(self) -> bool:
        """Started, not stopped, and not paused."""
        with self._lock:
            return self._started and not self._want_pause and not self._stopped.is_set()

    def start(self) -> None:
        with self._lock:
            if self._started:
                raise MachineError("the machine was already started")
            if self._closed:
                raise MachineError("the machine is stopped")
        if not self._loaded_state:
            self._boot()
        with self._lock:
            if self._started:
                raise MachineError("the machine was already started")
            self._started = True
            self._parked = False
        self._thread = threading.Thread(target=self._vcpu_main, name=f"vcpu-{self.accelerator}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the vCPU, release the accelerator and remove the RAM file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._want_stop = True
            self._changed.notify_all()
        self.devices.interrupt_waits()
        self._accel.kick()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._stopped.set()
        try:
            self._accel.close()
        finally:
            self._release_ram()

    def pause(self) -> None:
        if self._thread is not None and threading.current_thread() is self._thread:
            raise MachineError("pause() called from the vCPU thread (an output callback?) would deadlock")
        with self._lock:
            if not self._started:
                return
            kick = not self._want_pause
            self._want_pause = True
        if kick:
            self.devices.interrupt_waits()
            self._accel.kick()
        with self._lock:
            while not self._parked:
                self._changed.wait()

    def resume(self) -> None:
        with self._lock:
            if not self._started:
                raise MachineError("resume() before start()")
            if not self._want_pause:
                return
            self.devices.allow_waits()
            self._want_pause = False
            self._changed.notify_all()

    def collect_dirty(self) -> npt.NDArray[np.int64]:
        # Merge through a page bitmap: linear in RAM size and ~100x faster
        # than np.union1d's sort once thousands of pages are dirty.
        bitmap = self.devices.take_dirty_bitmap()
        guest = self._accel.collect_dirty()
        if len(guest):
            bitmap[guest] = True
        return np.flatnonzero(bitmap).astype(np.int64, copy=False)

    def save_device_state(self) -> bytes:
        with self._lock:
            if self._started and not self._parked:
                raise MachineError("save_device_state() needs a paused machine")
            if self._closed:
                raise MachineError("the machine is stopped")
        devices = self.devices
        return state.encode(
            state.DeviceState(
                cpu=self._accel.get_cpu_state(),
                clock_ns=devices.clock.read(),
                clock_latch=devices.clock_latch,
                nic=devices.host_state(),
                console=devices.console_pending,
                accelerator=self.accelerator,
            )
        )

    def load_device_state(self, data: bytes, *, keep_connections: bool = False) -> None:
        """Adopt a saved state; copy the matching RAM in first.

        Connections open in the saved state have no client on this machine,
        so by default the guest is told they closed. A caller that re-attaches
        them (a lockstep secondary fed the same clients) passes
        `keep_connections=True`.
        """
        saved = state.decode(data)
        with self._lock:
            if self._started and not self._parked:
                raise MachineError("load_device_state() needs a paused machine")
            if self._closed:
                raise MachineError("the machine is stopped")
        self._accel.set_cpu_state(saved.cpu)
        self.devices.restore(
            saved.nic,
            clock_ns=saved.clock_ns,
            clock_latch=saved.clock_latch,
            console=saved.console,
            keep_connections=keep_connections,
        )
        self._loaded_state = True
        log.info(
            "micro-VM: device state loaded (saved under %s, %d connection(s) %s)",
            saved.accelerator or "?",
            len(saved.nic.open_connections),
            "kept" if keep_connections else "closed",
        )

    def open_connection(self) -> int:
        return self.devices.open_connection()

    def send_input(self, conn_id: int, data: bytes) -> None:
        self.devices.send_input(conn_id, data)

    def close_connection(self, conn_id: int) -> None:
        self.devices.close_connection(conn_id)

    def set_output_callback(self, callback: OutputCallback) -> None:
        self.devices.set_output_callback(callback)

    def input_full(self, conn_id: int) -> bool:
        return self.devices.input_backlog(conn_id) > INPUT_HIGH_WATER

    # ---- capabilities: the engine replicates this guest page by page ------------------------

    def page_log(self) -> PageLog:
        return self

    def migration_stream(self) -> None:
        return None

    def client_nic(self) -> ClientNic:
        return self

    def mirrored_nic(self) -> MirroredNic:
        return self.devices

    # ---- extras -----------------------------------------------------------------------------

    def input_backlog(self, conn_id: int) -> int:
        return self.devices.input_backlog(conn_id)

    def set_input_drained_callback(self, callback: Callable[[int], None] | None) -> None:
        self.devices.set_input_drained_callback(callback)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the vCPU has stopped for good (stop(), guest panic or crash)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- internals --------------------------------------------------------------------------

    def _boot(self) -> None:
        if self._firmware is not None:
            firmware = self._firmware
        else:
            from colo_agent.microvm.firmware_build import FirmwareBuildError

            try:
                firmware = default_firmware()
            except FirmwareBuildError as exc:
                raise MachineError(f"cannot build the guest firmware: {exc}") from exc
        if abi.FIRMWARE_ADDR + len(firmware.image) > self._ram_size or firmware.heap_start >= self._ram_size:
            raise MachineError(
                f"the firmware ({firmware.heap_start - abi.FIRMWARE_ADDR} bytes with its bss) does not fit "
                f"in {self._ram_size >> 20} MiB of RAM"
            )
        boot.write_boot_environment(self._map, self._ram_size)
        boot.write_boot_info(self._map, self._ram_size, firmware.heap_start, self._dirty_rate)
        self._ram[abi.FIRMWARE_ADDR : abi.FIRMWARE_ADDR + len(firmware.image)] = firmware.image
        # Neither accelerator sees host writes: the boot image goes in the
        # device model's log so the first collection carries it.
        self.devices.mark_dirty(0, abi.PD_ADDR + abi.PAGE_SIZE)
        self.devices.mark_dirty(abi.BOOT_INFO_ADDR, abi.PAGE_SIZE)
        self.devices.mark_dirty(abi.FIRMWARE_ADDR, len(firmware.image))
        self._accel.set_cpu_state(boot.initial_cpu_state())

    def _vcpu_main(self) -> None:
        try:
            while True:
                with self._lock:
                    leave = self._want_pause or self._want_stop
                if leave:
                    # Output written before the pause belongs to the epoch
                    # that is ending: drain it before pause() returns.
                    self.devices.drain_tx()
                    with self._lock:
                        self._parked = True
                        self._changed.notify_all()
                        while self._want_pause and not self._want_stop:
                            self._changed.wait()
                        if self._want_stop:
                            return
                        self._parked = False
                # A pause requested from here on kicks run(), which then
                # returns KICKED at once: no request is lost.
                result = self._accel.run()
                if result is RunResult.KICKED:
                    continue
                if result is RunResult.HALTED:
                    self._guest_exited("the guest halted")
                else:
                    self._guest_exited(f"the guest crashed: {self._accel.failure or 'unknown failure'}")
                return
        except BaseException as exc:
            log.exception("micro-VM: vCPU thread failed")
            self._guest_exited(f"vCPU thread failed: {exc}")
        finally:
            with self._lock:
                self._parked = True
                self._changed.notify_all()
            self._stopped.set()

    def _guest_exited(self, reason: str) -> None:
        with self._lock:
            if self.exit_reason is None and not self._want_stop:
                self.exit_reason = reason
                log.error("micro-VM: %s; the machine stopped", reason)
            self._want_stop = True
            self._changed.notify_all()

    def _guest_panicked(self, code: int) -> None:
        # Called from io_out in the vCPU thread: ask run() to return.
        with self._lock:
            if self.exit_reason is None:
                self.exit_reason = f"guest panic {code:#x}"
            self._want_stop = True
        self.devices.interrupt_waits()
        self._accel.kick()

    def _release_ram(self) -> None:
        self._ram_array = None
        self._ram.release()
        try:
            self._map.close()
        except BufferError:
            # Someone still holds a view of RAM (a numpy slice, say); the
            # mapping goes when they drop it. The file is removed regardless.
            log.debug("micro-VM: RAM still referenced; the mapping outlives stop()")
        os.close(self._ram_file)
        _unlink(self._ram_path)


def _create_ram_file(size: int, path: str | os.PathLike[str] | None) -> tuple[Path, int]:
    if path is None:
        directory = _ram_dir()
        try:
            fd, name = tempfile.mkstemp(prefix="colo-vm-", suffix=".ram", dir=directory)
        except OSError as exc:
            raise MachineError(f"cannot create a RAM file in {directory}: {exc.strerror}") from None
        ram_path = Path(name)
    else:
        ram_path = Path(path)
        try:
            fd = os.open(ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise MachineError(f"RAM file {ram_path} already exists; refusing to share it") from None
        except OSError as exc:
            raise MachineError(f"cannot create RAM file {ram_path}: {exc.strerror}") from None
    try:
        # Allocate now: a tmpfs that runs out of room later would kill the
        # agent with SIGBUS on a guest write instead of failing here.
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        _unlink(ram_path)
        raise MachineError(
            f"cannot allocate {size >> 20} MiB for RAM file {ram_path}: {exc.strerror}"
        ) from None
    if path is None:
        # Nobody else opens a file we named ourselves: unlinked now, it lives as
        # long as our mapping and vanishes even if the agent is killed -9.
        _unlink(ram_path)
    return ram_path, fd


def _ram_dir() -> Path:
    configured = os.environ.get(RAM_DIR_ENV)
    if configured:
        return Path(configured)
    return _SHM if _SHM.is_dir() else Path(tempfile.gettempdir())


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


if TYPE_CHECKING:
    # mypy proves here that Machine is a Guest.
    def _is_a_guest(machine: Machine) -> Guest:
        return machine
