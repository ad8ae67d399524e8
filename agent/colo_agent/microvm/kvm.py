"""The `kvm` accelerator: one vCPU on /dev/kvm, driven by ioctls from Python.

No external VMM: the VM has one memory slot (the whole guest RAM mmap, with
KVM's dirty log on), one vCPU, no in-kernel irqchip and no timers, which is all
the firmware of docs/guest-abi.md needs. Port I/O exits go to the monitor's
`IoHandler`; `hlt` returns HALTED.

Kicking. `kick()` sets `kvm_run.immediate_exit` and sends SIGUSR1 to the vCPU
thread. A vCPU inside the guest leaves with EINTR; a vCPU outside it sees
`immediate_exit` at its next KVM_RUN and returns EINTR at once, *after*
completing a pending port access (KVM finishes an in-flight IN/OUT before it
looks at signals or `immediate_exit`), so the CPU state read after a KICKED is
consistent and no kick is lost. KVM_RUN goes through libc's ioctl via ctypes
rather than `fcntl.ioctl`, because the latter retries EINTR (PEP 475) and would
spin on an `immediate_exit` that stays set. SIGUSR1 needs a handler (its
default action kills the process; an ignored signal never interrupts
KVM_RUN): the monitor calls `install_kick_signal_handler()` from the main
thread at startup.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from colo_agent.microvm import _kvm_abi as K
from colo_agent.microvm.abi import PAGE_SIZE
from colo_agent.microvm.accel import (
    GPR_NAMES,
    SEGMENT_NAMES,
    CpuState,
    DescriptorTable,
    IoHandler,
    RunResult,
    Segment,
    check_well_formed,
)

KVM_DEVICE = "/dev/kvm"
KICK_SIGNAL = signal.SIGUSR1

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc_ioctl.restype = ctypes.c_int

# VMX-style segment access rights (accel.Segment): field -> (bit, width).
_ATTRIBUTE_BITS = (
    ("type", 0, 4),
    ("s", 4, 1),
    ("dpl", 5, 2),
    ("present", 7, 1),
    ("avl", 12, 1),
    ("l", 13, 1),
    ("db", 14, 1),
    ("g", 15, 1),
    ("unusable", 16, 1),
)
_IO_SIZES = (1, 2, 4)
_EXIT_REASON = struct.Struct("<I")
_IO_EXIT = struct.Struct(K.RUN_IO_FORMAT)


class KvmError(RuntimeError):
    """KVM refused an operation the accelerator needs."""


class KvmUnavailableError(KvmError):
    """/dev/kvm cannot be used on this machine (absent, no permission, too old)."""


def _ioctl(fd: int, request: int, arg: Any = None, what: str = "") -> int:
    """One ioctl through libc; `arg` is a ctypes object (passed by reference), an int or None."""
    if arg is None:
        ptr: Any = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.byref(arg)
    while True:
        ret = _libc_ioctl(fd, request, ptr)
        if ret >= 0:
            return int(ret)
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"{what or hex(request)}: {os.strerror(err)}")


def kvm_unavailable_reason() -> str | None:
    """None when /dev/kvm opens read-write and speaks the stable API, else why not (for a log or a skip)."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return f"{KVM_DEVICE} does not exist"
        return f"{KVM_DEVICE} does not open: {exc.strerror}"
    try:
        version = _ioctl(fd, K.KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
    except OSError as exc:
        return f"{KVM_DEVICE} does not answer KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    if version != K.KVM_API_VERSION:
        return f"{KVM_DEVICE} speaks KVM API {version}, expected {K.KVM_API_VERSION}"
    return None


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick's only job is to interrupt KVM_RUN; there is nothing to do afterwards."""


def install_kick_signal_handler() -> None:
    """Let SIGUSR1 interrupt KVM_RUN without killing the process. Main thread only; idempotent.

    An existing Python handler is kept: any handler makes the signal interrupt
    KVM_RUN, and `run()` tells kicks from other signals by `immediate_exit`.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_kick_signal_handler() must be called from the main thread")
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return
    signal.signal(KICK_SIGNAL, _ignore_kick)


def _kick_handler_installed() -> bool:
    return callable(signal.getsignal(KICK_SIGNAL))


def _segment_to_kvm(seg: Segment, out: K.KvmSegment) -> None:
    out.base = seg.base
    out.limit = seg.limit
    out.selector = seg.selector
    for name, bit, width in _ATTRIBUTE_BITS:
        setattr(out, name, (seg.attributes >> bit) & ((1 << width) - 1))
    out.padding = 0


def _segment_from_kvm(seg: K.KvmSegment) -> Segment:
    attributes = 0
    for name, bit, width in _ATTRIBUTE_BITS:
        attributes |= (getattr(seg, name) & ((1 << width) - 1)) << bit
    return Segment(selector=seg.selector, base=seg.base, limit=seg.limit, attributes=attributes)


def pages_from_dirty_bitmap(words: npt.NDArray[np.uint64], page_count: int) -> npt.NDArray[np.int64]:
    """Sorted page indices whose bit is set in a KVM dirty bitmap (bit b of word w is page 64w + b)."""
    nonzero = np.flatnonzero(words)
    if nonzero.size == 0:
        return np.empty(0, dtype=np.int64)
    # Unpack only the words that have a bit set: a sparse log of a large guest
    # costs little more than the scan for non-zero words. x86 is little-endian,
    # so the bytes of a word are in bit order already.
    bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little").view(np.bool_)
    set_bits = np.flatnonzero(bits)
    pages = nonzero[set_bits >> 6] * 64 + (set_bits & 63)
    # Bits past the last page (the bitmap is padded to whole words) are never set by KVM.
    return pages[pages < page_count].astype(np.int64, copy=False)


class KvmAccelerator:
    """One KVM vCPU over the monitor's guest RAM mmap (see the module docstring).

    The accelerator holds a buffer export of `ram` until `close()`, so the RAM
    cannot be unmapped under a live VM: close the accelerator first.
    """

    name = "kvm"

    def __init__(self, ram: mmap.mmap, io: IoHandler) -> None:
        size = len(ram)
        if size == 0 or size % PAGE_SIZE:
            raise ValueError(f"guest RAM size {size:#x} is not a positive multiple of {PAGE_SIZE}")
        self.failure: str | None = None
        self._io = io
        self._page_count = size // PAGE_SIZE
        self._fds: list[int] = []
        self._run_map: mmap.mmap | None = None
        self._ram_export: ctypes.Array[ctypes.c_char] | None = None
        # Serialises kick() against the vCPU thread leaving run(), so a signal
        # is never sent to a thread identifier that may already be reused.
        self._kick_lock = threading.Lock()
        self._vcpu_thread: int | None = None
        self._closed = False
        self._close_when_run_returns = False
        # One u64 word per 64 pages, as KVM_GET_DIRTY_LOG writes it (a long-aligned bitmap).
        self._dirty_words = np.zeros((self._page_count + 63) // 64, dtype=np.uint64)
        try:
            self._open(ram, size)
        except BaseException:
            self.close()
            raise

    def _open(self, ram: mmap.mmap, size: int) -> None:
        try:
            kvm = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {KVM_DEVICE}: {exc.strerror}") from exc
        self._fds.append(kvm)
        version = _ioctl(kvm, K.KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
        if version != K.KVM_API_VERSION:
            raise KvmUnavailableError(f"{KVM_DEVICE} speaks KVM API {version}, expected {K.KVM_API_VERSION}")
        for cap, cap_name in (
            (K.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
            (K.KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"),
            (K.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
        ):
            if not self._has_cap(kvm, cap):
                raise KvmUnavailableError(f"{KVM_DEVICE} lacks {cap_name} (kernel too old)")
        run_size = _ioctl(kvm, K.KVM_GET_VCPU_MMAP_SIZE, what="KVM_GET_VCPU_MMAP_SIZE")

        vm = _ioctl(kvm, K.KVM_CREATE_VM, 0, what="KVM_CREATE_VM")
        self._fds.append(vm)
        self._vm = vm
        # Only VMX without unrestricted guest uses these, for real mode; they
        # must lie outside RAM and are harmless elsewhere.
        if self._has_cap(vm, K.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            _ioctl(
                vm, K.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(K.IDENTITY_MAP_ADDR), what="set identity map"
            )
        if self._has_cap(vm, K.KVM_CAP_SET_TSS_ADDR):
            _ioctl(vm, K.KVM_SET_TSS_ADDR, K.TSS_ADDR, what="KVM_SET_TSS_ADDR")

        self._ram_export = (ctypes.c_char * size).from_buffer(ram)
        region = K.KvmUserspaceMemoryRegion(
            slot=0,
            flags=K.KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr=0,
            memory_size=size,
            userspace_addr=ctypes.addressof(self._ram_export),
        )
        _ioctl(vm, K.KVM_SET_USER_MEMORY_REGION, region, what="KVM_SET_USER_MEMORY_REGION")

        vcpu = _ioctl(vm, K.KVM_CREATE_VCPU, 0, what="KVM_CREATE_VCPU")
        self._fds.append(vcpu)
        self._vcpu = vcpu
        # Before any sregs: KVM checks EFER.LME and CR4 bits against the guest's CPUID.
        _ioctl(vcpu, K.KVM_SET_CPUID2, self._supported_cpuid(kvm), what="KVM_SET_CPUID2")
        self._run_map = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(kvm)
        self._fds.remove(kvm)

    @staticmethod
    def _has_cap(fd: int, cap: int) -> bool:
        return _ioctl(fd, K.KVM_CHECK_EXTENSION, cap, what="KVM_CHECK_EXTENSION") > 0

    @staticmethod
    def _supported_cpuid(kvm: int) -> ctypes.Structure:
        capacity = 128
        while True:
            cpuid = K.kvm_cpuid2(capacity)
            try:
                _ioctl(kvm, K.KVM_GET_SUPPORTED_CPUID, cpuid, what="KVM_GET_SUPPORTED_CPUID")
            except OSError as exc:
                # E2BIG: more leaves than room; KVM does not say how many.
                if exc.errno == errno.E2BIG and capacity < 4096:
                    capacity *= 2
                    continue
                raise
            return cpuid

    # -- running --------------------------------------------------------------

    def run(self) -> RunResult:
        run_map = self._live_run_map()
        if not _kick_handler_installed():
            raise RuntimeError(
                "SIGUSR1 has no handler, so kick() could not interrupt KVM_RUN: "
                "call install_kick_signal_handler() from the main thread at startup"
            )
        with self._kick_lock:
            if self._vcpu_thread is not None:
                raise RuntimeError("run() is already executing in another thread")
            self._vcpu_thread = threading.get_ident()
        self.failure = None
        try:
            return self._run_loop(run_map)
        finally:
            with self._kick_lock:
                self._vcpu_thread = None
                close = self._close_when_run_returns
            if close:
                self.close()

    def _run_loop(self, run_map: mmap.mmap) -> RunResult:
        vcpu = self._vcpu
        ioctl = _libc_ioctl
        unpack_exit = _EXIT_REASON.unpack_from
        while True:
            if ioctl(vcpu, K.KVM_RUN, None) < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    if run_map[K.RUN_IMMEDIATE_EXIT]:
                        run_map[K.RUN_IMMEDIATE_EXIT] = 0
                        return RunResult.KICKED
                    continue  # some other signal; not ours to act on
                if err == errno.EAGAIN:
                    continue
                return self._fail(f"KVM_RUN failed: {os.strerror(err)}")
            (reason,) = unpack_exit(run_map, K.RUN_EXIT_REASON)
            if reason == K.KVM_EXIT_IO:
                failure = self._handle_io(run_map)
                if failure is not None:
                    return self._fail(failure)
            elif reason == K.KVM_EXIT_HLT:
                return RunResult.HALTED
            elif reason == K.KVM_EXIT_INTR:
                continue
            else:
                return self._fail(self._describe_exit(run_map, reason))

    def _handle_io(self, run_map: mmap.mmap) -> str | None:
        direction, size, port, count, offset = _IO_EXIT.unpack_from(run_map, K.RUN_EXIT_DATA)
        if size not in _IO_SIZES or count == 0 or offset + size * count > len(run_map):
            return f"malformed port I/O exit: port {port:#x} size {size} count {count} offset {offset}"
        if direction == K.KVM_EXIT_IO_OUT:
            if count == 1:  # the common case, kept free of numpy's per-call overhead
                self._io.io_out(port, size, int.from_bytes(run_map[offset : offset + size], "little"))
                return None
            # String I/O (rep outs) arrives as `count` consecutive items; KVM
            # itself advances rsi/rcx, so each item is one ordinary access.
            items = np.frombuffer(run_map, dtype=f"<u{size}", count=count, offset=offset)
            for value in items.tolist():
                self._io.io_out(port, size, value)
            return None
        if direction == K.KVM_EXIT_IO_IN:
            mask = (1 << (8 * size)) - 1
            for i in range(count):
                value = self._io.io_in(port, size) & mask
                item = offset + i * size
                run_map[item : item + size] = value.to_bytes(size, "little")
            return None
        return f"port I/O exit with unknown direction {direction} on port {port:#x}"

    def _describe_exit(self, run_map: mmap.mmap, reason: int) -> str:
        name = K.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
        where = f" at rip={self._rip():#x}"
        if reason == K.KVM_EXIT_SHUTDOWN:
            return f"guest shut down (triple fault){where}"
        if reason == K.KVM_EXIT_MMIO:
            addr, _data, length, is_write = struct.unpack_from(K.RUN_MMIO_FORMAT, run_map, K.RUN_EXIT_DATA)
            op = "write" if is_write else "read"
            return f"guest {op} of {length} bytes at {addr:#x}, outside guest RAM{where}"
        if reason == K.KVM_EXIT_FAIL_ENTRY:
            hw_reason, cpu = struct.unpack_from(K.RUN_FAIL_ENTRY_FORMAT, run_map, K.RUN_EXIT_DATA)
            return f"VM entry failed: hardware reason {hw_reason:#x} on cpu {cpu}{where}"
        if reason == K.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = struct.unpack_from(K.RUN_INTERNAL_FORMAT, run_map, K.RUN_EXIT_DATA)
            ndata = min(ndata, K.RUN_INTERNAL_DATA_MAX)
            data = struct.unpack_from(f"<{ndata}Q", run_map, K.RUN_EXIT_DATA + 8)
            what = K.INTERNAL_ERROR_NAMES.get(suberror, f"suberror {suberror}")
            extra = " data " + " ".join(f"{d:#x}" for d in data) if data else ""
            return f"KVM internal error: {what}{extra}{where}"
        return f"unexpected exit: {name}{where}"

    def _rip(self) -> int:
        regs = K.KvmRegs()
        try:
            _ioctl(self._vcpu, K.KVM_GET_REGS, regs, what="KVM_GET_REGS")
        except OSError:
            return -1
        return int(regs.rip)

    def _fail(self, failure: str) -> RunResult:
        self.failure = failure
        return RunResult.FAILED

    def kick(self) -> None:
        with self._kick_lock:
            run_map = self._run_map
            if self._closed or run_map is None:
                return
            # Set before signalling: a vCPU between two KVM_RUNs, which the
            # signal cannot interrupt, sees the flag on its next entry.
            run_map[K.RUN_IMMEDIATE_EXIT] = 1
            if self._vcpu_thread is not None and self._vcpu_thread != threading.get_ident():
                if not _kick_handler_installed():
                    # The default action would kill the process; run() will
                    # still return KICKED at its next KVM_RUN.
                    return
                signal.pthread_kill(self._vcpu_thread, KICK_SIGNAL)

    # -- state ----------------------------------------------------------------

    def get_cpu_state(self) -> CpuState:
        self._check_idle()
        regs = K.KvmRegs()
        sregs = K.KvmSregs()
        _ioctl(self._vcpu, K.KVM_GET_REGS, regs, what="KVM_GET_REGS")
        _ioctl(self._vcpu, K.KVM_GET_SREGS, sregs, what="KVM_GET_SREGS")
        return CpuState(
            gprs=tuple(int(getattr(regs, name)) for name in GPR_NAMES),
            rip=int(regs.rip),
            rflags=int(regs.rflags),
            segments=tuple(_segment_from_kvm(getattr(sregs, name)) for name in SEGMENT_NAMES),
            gdt=DescriptorTable(base=int(sregs.gdt.base), limit=int(sregs.gdt.limit)),
            idt=DescriptorTable(base=int(sregs.idt.base), limit=int(sregs.idt.limit)),
            cr0=int(sregs.cr0),
            cr2=int(sregs.cr2),
            cr3=int(sregs.cr3),
            cr4=int(sregs.cr4),
            efer=int(sregs.efer),
        )

    def set_cpu_state(self, state: CpuState) -> None:
        self._check_idle()
        check_well_formed(state)
        # Start from KVM's own sregs so what CpuState does not carry (TR, LDT,
        # APIC base, CR8) keeps the valid values KVM gave the vCPU at reset.
        sregs = K.KvmSregs()
        _ioctl(self._vcpu, K.KVM_GET_SREGS, sregs, what="KVM_GET_SREGS")
        for name, seg in zip(SEGMENT_NAMES, state.segments, strict=True):
            _segment_to_kvm(seg, getattr(sregs, name))
        sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
        sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
        sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4 = state.cr0, state.cr2, state.cr3, state.cr4
        sregs.efer = state.efer
        # No interrupt may be pending from a previous state: the firmware runs with IF=0.
        for i in range(len(sregs.interrupt_bitmap)):
            sregs.interrupt_bitmap[i] = 0
        regs = K.KvmRegs()
        for name, value in zip(GPR_NAMES, state.gprs, strict=True):
            setattr(regs, name, value)
        regs.rip = state.rip
        regs.rflags = state.rflags
        try:
            _ioctl(self._vcpu, K.KVM_SET_SREGS, sregs, what="KVM_SET_SREGS")
        except OSError as exc:
            raise ValueError(f"KVM rejected the control/segment registers of the CPU state: {exc}") from exc
        _ioctl(self._vcpu, K.KVM_SET_REGS, regs, what="KVM_SET_REGS")

    def _check_idle(self) -> None:
        self._live_run_map()
        if self._vcpu_thread is not None:
            raise RuntimeError("the vCPU state is only accessible while run() is not executing")

    def _live_run_map(self) -> mmap.mmap:
        if self._closed or self._run_map is None:
            raise RuntimeError("the kvm accelerator is closed")
        return self._run_map

    # -- dirty log ------------------------------------------------------------

    def collect_dirty(self) -> npt.NDArray[np.int64]:
        self._live_run_map()
        words = self._dirty_words
        log = K.KvmDirtyLog(slot=0, dirty_bitmap=words.ctypes.data)
        # Returns and clears the log, and re-arms write tracking of the
        # reported pages, in one call; safe while the vCPU runs.
        _ioctl(self._vm, K.KVM_GET_DIRTY_LOG, log, what="KVM_GET_DIRTY_LOG")
        return pages_from_dirty_bitmap(words, self._page_count)

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        """Release the vCPU, the VM and the RAM export. Idempotent.

        From the vCPU thread itself (a device handler stopping the machine),
        the close happens as run() returns, which it then does at once.
        """
        with self._kick_lock:
            if self._closed:
                return
            if self._vcpu_thread == threading.get_ident():
                self._close_when_run_returns = True
                if self._run_map is not None:
                    self._run_map[K.RUN_IMMEDIATE_EXIT] = 1
                return
            if self._vcpu_thread is not None:
                raise RuntimeError("close() while run() is executing: kick the vCPU and wait for run() first")
            self._closed = True
            run_map, self._run_map = self._run_map, None
        if run_map is not None:
            run_map.close()
        # The vCPU fd first: it holds a reference on the VM, which holds the memory slot.
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()
        # Only now, with the slot gone, may the monitor unmap guest RAM.
        self._ram_export = None

    def __enter__(self) -> KvmAccelerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
