"""The `tcg` accelerator: one vCPU emulated by unicorn (QEMU's TCG) in this process.

Guest RAM is the monitor's mmap, mapped into unicorn with `mem_map_ptr`, so the
monitor, the replication engine and the guest share the same bytes. Port I/O
reaches the monitor's `IoHandler` through unicorn's IN/OUT instruction hooks,
synchronously in the vCPU thread; `hlt` ends `run()` with HALTED. Unicorn never
delivers an exception to the guest, so a guest exception ends `run()` with
FAILED, which is what the firmware's missing IDT makes of it under kvm too (a
triple fault).

Address translation and dirty tracking. Unicorn runs in its *virtual TLB*
mode: every soft-TLB miss calls `_fill_tlb`, which walks the guest's own
4-level page tables (the identity map of docs/guest-abi.md, or whatever the
guest installs) and hands back the physical page and its permissions. A page
that is clean in the dirty bitmap is entered read/execute only, so the first
store to it misses again, *as a store*: the fill records the page and enters
it writable, and the store then completes normally. Collecting flushes the
soft TLB, which write-protects every page again in one call. This is
write-protection tracking with the TLB entry as the protection unit. It
avoids both traps of doing it with `mem_protect` and a write-protect hook:
unicorn splits a memory region at every per-page protection change and
rebuilds its flat view at each split (on 64 MiB, 100 faults cost 0.1 s and
1,000 faults 35 s, growing quadratically), and a write-protect hook that lifts
the protection and returns True silently drops the faulting store. No store
is hooked; only the first store to each page per round costs a fill.

Kicking. `kick()` calls `emu_stop()`, which ends emulation at the next
translation-block boundary; every block checks for it, so even a one-
instruction spin loop stops. `uc_emu_start` clears pending stop requests
while it starts, so a stop that lands in that window would be lost: a small
re-kicker thread repeats `emu_stop()` every millisecond until `run()` has
seen the request.

Collecting while the vCPU runs (pre-copy) is safe: the soft TLB may only be
flushed by the vCPU thread at a safe point, or while that thread is held
inside a device handler, so `collect_dirty()` either does the work itself
(vCPU idle, or held in a handler) or asks the vCPU thread to, and waits.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import unicorn
from unicorn import unicorn_const as uc
from unicorn import x86_const as x86
from unicorn.unicorn_py3 import unicorn as _binding
from unicorn.unicorn_py3.unicorn import Uc, UcError

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
from colo_agent.microvm.boot import (
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    PTE_LARGE,  # PS, in a PDPT or PD entry
    PTE_PRESENT,
    PTE_WRITABLE,
)

PAGE_SHIFT = 12

MSR_EFER = 0xC000_0080

CR0_WP = 1 << 16
CR4_LA57 = 1 << 12
EFER_NXE = 1 << 11
RFLAGS_VM = 1 << 17

PTE_NX = 1 << 63
_FRAME_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 of a paging-structure entry

DESC_PRESENT = 1 << 47

# VMX-style access rights (accel.Segment).
ATTR_LONG = 1 << 13
ATTR_GRANULARITY = 1 << 15
ATTR_UNUSABLE = 1 << 16

_GPR_IDS = tuple(getattr(x86, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES)
_SEGMENT_IDS = tuple(getattr(x86, f"UC_X86_REG_{name.upper()}") for name in SEGMENT_NAMES)
_CS, _FS, _GS = (SEGMENT_NAMES.index(name) for name in ("cs", "fs", "gs"))
_BASE_IDS = {_FS: x86.UC_X86_REG_FS_BASE, _GS: x86.UC_X86_REG_GS_BASE}

# emu_start's end address is ignored once the exits list is enabled (ours
# stays empty). A plain `until` would not do: at every return from emu_start
# unicorn invalidates the code at that address, translating it first, and a
# fill that cannot translate it fails the run.
_NO_END = 0

_READ_EXEC = uc.UC_PROT_READ | uc.UC_PROT_EXEC
_ACCESS_NAMES = {uc.UC_MEM_READ: "read", uc.UC_MEM_WRITE: "write", uc.UC_MEM_FETCH: "instruction fetch"}
_EXCEPTION_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 6: "#UD", 8: "#DF", 12: "#SS", 13: "#GP", 14: "#PF"}
_FATAL = "fatal: exceptions are not delivered to the guest (under kvm this firmware triple-faults)"
_QWORD = struct.Struct("<Q")
_REKICK_INTERVAL_S = 0.001

# The TLB fill hook is the one hot hook, so it bypasses the binding's generic
# layers: a native callback registered directly, and CR3 read through
# libunicorn's own uc_reg_read into a preallocated buffer (the binding's
# reg_read costs about four times as much). Both are part of the pinned
# unicorn 2.1 binding; `TcgAccelerator._open` fails loudly if they move.
_uc_reg_read = _binding.uclib.uc_reg_read
_TLB_FILL_CALLBACK = _binding.HOOK_TLB_FILL_CFUNC


class TcgError(RuntimeError):
    """Unicorn refused an operation the accelerator needs."""


def walk_page_tables(ram: Any, ram_size: int, cr3: int, vaddr: int) -> tuple[int, bool, bool] | str:
    """Translate `vaddr` through 4-level long-mode paging, as the MMU does.

    Returns (physical address, writable, no-execute) where writable and
    no-execute combine every level, or a string saying why the walk failed.
    Accessed and dirty bits are not written back: the monitor's tables carry
    them preset (boot.py), and the dirty log tracks the guest's own stores.
    """
    upper = vaddr >> 47
    if upper and upper != 0x1FFFF:
        return "the address is not canonical (#GP)"
    table = cr3 & _FRAME_MASK
    writable = True
    nx = False
    shift = 39
    while True:
        slot = table + ((vaddr >> shift) & 0x1FF) * 8
        if slot + 8 > ram_size:
            return f"its paging structure at {table:#x} is outside guest RAM (#PF)"
        (entry,) = _QWORD.unpack_from(ram, slot)
        if not entry & PTE_PRESENT:
            return "the guest's page tables do not map it (#PF)"
        writable = writable and bool(entry & PTE_WRITABLE)
        nx = nx or bool(entry & PTE_NX)
        if shift == 12 or (shift < 39 and entry & PTE_LARGE):
            offset_mask = (1 << shift) - 1
            return (entry & _FRAME_MASK & ~offset_mask) | (vaddr & offset_mask), writable, nx
        table = entry & _FRAME_MASK
        shift -= 9


def validate_long_mode_state(state: CpuState) -> None:
    """Refuse, with a ValueError that says why, a CpuState this accelerator cannot run.

    Besides well-formed values, the vCPU must be in 64-bit long mode: unicorn
    runs it in its 64-bit mode, and the guest ABI never leaves long mode.
    """
    check_well_formed(state)
    missing = [
        what
        for what, present in (
            ("CR0.PE", state.cr0 & CR0_PE),
            ("CR0.PG", state.cr0 & CR0_PG),
            ("CR4.PAE", state.cr4 & CR4_PAE),
            ("EFER.LME", state.efer & EFER_LME),
            ("EFER.LMA", state.efer & EFER_LMA),
            ("CS.L", state.segments[_CS].attributes & ATTR_LONG),
        )
        if not present
    ]
    if missing:
        raise ValueError(
            f"the tcg accelerator runs 64-bit long mode only; the state lacks {', '.join(missing)}"
        )
    if state.cr4 & CR4_LA57:
        raise ValueError("the tcg accelerator does not support 5-level paging (CR4.LA57)")
    if state.rflags & RFLAGS_VM:
        raise ValueError("RFLAGS.VM (virtual-8086 mode) cannot be set in long mode")


def segment_from_descriptor(selector: int, descriptor: int) -> Segment:
    """The hidden segment state a CPU loads from a GDT descriptor, as KVM reports it."""
    limit = (descriptor & 0xFFFF) | ((descriptor >> 32) & 0xF0000)
    base = ((descriptor >> 16) & 0xFFFFFF) | (((descriptor >> 56) & 0xFF) << 24)
    attributes = ((descriptor >> 40) & 0xFF) | (((descriptor >> 52) & 0xF) << 12)
    if attributes & ATTR_GRANULARITY:
        limit = (limit << 12) | 0xFFF
    return Segment(selector=selector, base=base, limit=limit, attributes=attributes)


def _null_segment(selector: int) -> Segment:
    return Segment(selector=selector, base=0, limit=0, attributes=ATTR_UNUSABLE)


class TcgAccelerator:
    """One unicorn vCPU over the monitor's guest RAM mmap (see the module docstring).

    Like the kvm accelerator, it holds a buffer export of `ram` until
    `close()`, so the RAM cannot be unmapped under a live vCPU.
    """

    name = "tcg"

    def __init__(self, ram: mmap.mmap, io: IoHandler) -> None:
        size = len(ram)
        if size == 0 or size % PAGE_SIZE:
            raise ValueError(f"guest RAM size {size:#x} is not a positive multiple of {PAGE_SIZE}")
        self.failure: str | None = None
        self._io = io
        self._ram_size = size
        self._page_count = size // PAGE_SIZE
        # One byte per page: the fill hook marks a page with a plain bytearray
        # store (the cheapest from Python); numpy scans the same memory. The
        # bytes are 0 or 1, so numpy may read them as bools: np.flatnonzero
        # has a fast path for bools and a generic one for uint8 that made
        # every collection cost milliseconds per GiB of RAM, dirty or not.
        self._dirty_bytes = bytearray(self._page_count)
        self._dirty = np.frombuffer(self._dirty_bytes, dtype=np.bool_)

        # Run state, guarded by _lock. No device handler is ever called with
        # it held, so a handler may kick() or close() from the vCPU thread.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._vcpu_thread: int | None = None
        self._in_guest = False  # inside emu_start: a stop must go through emu_stop()
        self._in_handler = False  # the vCPU thread is held in a device handler
        self._kick_pending = False
        self._collect_wanted = False  # a collector waits for the vCPU thread
        self._stopped_for_collect = False  # this emulation was stopped for a collector
        self._collected: npt.NDArray[np.int64] | None = None
        self._collect_serial = threading.Lock()  # one collector at a time
        self._closed = False
        self._close_when_run_returns = False
        self._rekick = threading.Event()
        self._rekicker: threading.Thread | None = None

        # Set by hooks during emu_start, read by run() once it returns.
        self._stop_failure: str | None = None
        self._hook_error: BaseException | None = None

        # Paging controls besides CR3, which the fill hook reads at each call
        # (a guest may switch address spaces at any time). These change only
        # with a mode switch the guest ABI rules out, so they are refreshed
        # whenever run() enters emulation and by set_cpu_state().
        self._write_protect = True
        self._nx_enabled = False
        self._cr3 = ctypes.c_uint64()
        self._cr3_ref = ctypes.byref(self._cr3)
        # Hidden segment state as set by set_cpu_state(), reported back while
        # the guest keeps the same selectors (unicorn cannot read it out).
        self._segments: list[Segment | None] = [None] * len(SEGMENT_NAMES)

        self._ram: memoryview | None = memoryview(ram)
        self._ram_export: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * size).from_buffer(ram)
        self._uc: Uc | None = None
        try:
            self._uc = self._open(ctypes.addressof(self._ram_export), size)
        except BaseException:
            self.close()
            raise

    def _open(self, ram_address: int, size: int) -> Uc:
        emu = Uc(uc.UC_ARCH_X86, uc.UC_MODE_64)
        self._uc = emu  # close() releases it should the set-up fail half way
        emu.ctl_set_tlb_mode(uc.UC_TLB_VIRTUAL)
        emu.ctl_exits_enabled(True)
        emu.mem_map_ptr(0, size, uc.UC_PROT_ALL, ram_address)
        add_native_hook = getattr(emu, "_Uc__do_hook_add", None)
        if add_native_hook is None:
            raise TcgError(f"unicorn {unicorn.__version__} lacks the native hook entry this module needs")
        self._fill_tlb_native = _TLB_FILL_CALLBACK(self._fill_tlb)
        add_native_hook(uc.UC_HOOK_TLB_FILL, self._fill_tlb_native, 1, 0)
        emu.hook_add(uc.UC_HOOK_INSN, self._on_in, aux1=x86.UC_X86_INS_IN)
        emu.hook_add(uc.UC_HOOK_INSN, self._on_out, aux1=x86.UC_X86_INS_OUT)
        emu.hook_add(uc.UC_HOOK_INTR, self._on_exception)
        return emu

    # -- address translation and dirty tracking --------------------------------

    def _fill_tlb(self, handle: int, vaddr: int, access: int, entry: Any, _data: object) -> bool:
        """Translate one page for unicorn's soft TLB; record the page at its first store."""
        try:
            ram = self._ram
            if ram is None:
                return False
            _uc_reg_read(handle, x86.UC_X86_REG_CR3, self._cr3_ref)
            walked = walk_page_tables(ram, self._ram_size, self._cr3.value, vaddr)
            if isinstance(walked, str):
                return self._translation_fault(handle, vaddr, access, walked)
            physical, writable, nx = walked
            page = physical >> PAGE_SHIFT
            if page >= self._page_count:
                return self._stop_with(
                    f"guest {_ACCESS_NAMES.get(access, 'access')} at {vaddr:#x} (physical {physical:#x}) "
                    f"is outside guest RAM ({self._ram_size:#x} bytes)"
                )
            perms = _READ_EXEC
            if nx and self._nx_enabled:
                if access == uc.UC_MEM_FETCH:
                    return self._translation_fault(handle, vaddr, access, "its page is not executable (#PF)")
                perms = uc.UC_PROT_READ
            if access == uc.UC_MEM_WRITE:
                if not writable and self._write_protect:
                    return self._translation_fault(handle, vaddr, access, "its page is read-only (#PF)")
                self._dirty_bytes[page] = 1
                perms |= uc.UC_PROT_WRITE
            elif self._dirty_bytes[page] and (writable or not self._write_protect):
                # Dirty already this round: its next store need not miss.
                perms |= uc.UC_PROT_WRITE
            fill = entry[0]
            fill.paddr = physical & ~(PAGE_SIZE - 1)
            fill.perms = perms
            return True
        except BaseException as exc:
            # A native callback must not raise; run() re-raises it.
            self._hook_error = exc
            return self._stop_with(f"internal error translating {vaddr:#x}: {exc!r}")

    def _translation_fault(self, handle: int, vaddr: int, access: int, why: str) -> bool:
        # Unicorn synchronises the guest's rip before it asks for a fill.
        rip = ctypes.c_uint64()
        _uc_reg_read(handle, x86.UC_X86_REG_RIP, ctypes.byref(rip))
        return self._stop_with(
            f"guest {_ACCESS_NAMES.get(access, 'access')} at {vaddr:#x} faults at rip={rip.value:#x}: "
            f"{why}; {_FATAL}"
        )

    def _stop_with(self, failure: str) -> bool:
        """Record why the run must end. Returning False from the fill makes unicorn stop."""
        if self._stop_failure is None:
            self._stop_failure = failure
        return False

    def collect_dirty(self) -> npt.NDArray[np.int64]:
        with self._collect_serial, self._lock:
            emu = self._live()
            on_vcpu = self._vcpu_thread == threading.get_ident()
            if self._vcpu_thread is None or on_vcpu or self._in_handler:
                # The vCPU is idle, or held at a safe point until we release
                # the lock: the soft TLB is ours to flush.
                return self._collect_locked(emu)
            self._collect_wanted = True
            self._collected = None
            if self._in_guest:
                self._stopped_for_collect = True
                self._request_stop_locked(emu)
            while self._collected is None:
                if self._closed:
                    raise RuntimeError("the tcg accelerator was closed during collect_dirty()")
                if self._vcpu_thread is None or self._in_handler:
                    # run() returned, or the vCPU is held in a handler now.
                    self._collect_wanted = False
                    return self._collect_locked(emu)
                self._changed.wait()
            pages, self._collected = self._collected, None
            return pages

    def _collect_locked(self, emu: Uc) -> npt.NDArray[np.int64]:
        pages = np.flatnonzero(self._dirty).astype(np.int64, copy=False)
        if pages.size:
            self._dirty[pages] = False
            # Every writable TLB entry belongs to a page dirtied this round;
            # dropping them all makes the next store to each page miss again.
            emu.ctl(uc.UC_CTL_TLB_FLUSH, uc.UC_CTL_IO_WRITE)
        return pages

    def _serve_collect_locked(self, emu: Uc) -> None:
        """At a safe point in the vCPU thread: do a collection another thread asked for."""
        if self._collect_wanted:
            self._collect_wanted = False
            self._collected = self._collect_locked(emu)
            self._changed.notify_all()

    # -- port I/O and exceptions -----------------------------------------------

    def _enter_handler(self, emu: Uc) -> None:
        with self._lock:
            self._serve_collect_locked(emu)
            self._in_handler = True

    def _leave_handler(self, emu: Uc) -> None:
        with self._lock:
            # Guest code runs again once this returns: a collector that came
            # meanwhile found _in_handler set and did its work already.
            self._in_handler = False
            self._serve_collect_locked(emu)

    def _on_in(self, emu: Uc, port: int, size: int, _data: object) -> int:
        self._enter_handler(emu)
        try:
            return int(self._io.io_in(port, size)) & ((1 << (8 * size)) - 1)
        except BaseException as exc:
            self._hook_error = exc
            emu.emu_stop()
            return 0
        finally:
            self._leave_handler(emu)

    def _on_out(self, emu: Uc, port: int, size: int, value: int, _data: object) -> None:
        self._enter_handler(emu)
        try:
            self._io.io_out(port, size, value)
        except BaseException as exc:
            self._hook_error = exc
            emu.emu_stop()
        finally:
            self._leave_handler(emu)

    def _on_exception(self, emu: Uc, vector: int, _data: object) -> None:
        name = _EXCEPTION_NAMES.get(vector, "exception")
        rip = emu.reg_read(x86.UC_X86_REG_RIP)
        self._stop_with(f"guest raised {name} (vector {vector}) at rip={rip:#x}; {_FATAL}")
        emu.emu_stop()

    # -- running ----------------------------------------------------------------

    def run(self) -> RunResult:
        with self._lock:
            emu = self._live()
            if self._vcpu_thread is not None:
                raise RuntimeError("run() is already executing in another thread")
            self.failure = None
            if self._kick_pending:
                self._kick_pending = False
                return RunResult.KICKED
            self._vcpu_thread = threading.get_ident()
        try:
            return self._run_loop(emu)
        finally:
            with self._lock:
                self._vcpu_thread = None
                self._in_guest = False
                close = self._close_when_run_returns
                self._changed.notify_all()
            if close:
                self.close()

    def _run_loop(self, emu: Uc) -> RunResult:
        while True:
            with self._lock:
                self._serve_collect_locked(emu)
                if self._kick_pending or self._close_when_run_returns:
                    self._kick_pending = False
                    return RunResult.KICKED
                self._stopped_for_collect = False
                self._in_guest = True
            self._stop_failure = None
            self._hook_error = None
            error: UcError | None = None
            try:
                self._refresh_paging_controls(emu)
                emu.emu_start(emu.reg_read(x86.UC_X86_REG_RIP), _NO_END)
            except UcError as exc:
                error = exc
            finally:
                with self._lock:
                    self._in_guest = False
                    kicked = self._kick_pending or self._close_when_run_returns
                    self._kick_pending = False
                    internal_stop = self._stopped_for_collect
            if self._hook_error is not None:
                exc, self._hook_error = self._hook_error, None
                raise exc
            if self._stop_failure is not None:
                self.failure = self._stop_failure
                return RunResult.FAILED
            if error is not None:
                self.failure = self._describe(emu, error)
                return RunResult.FAILED
            if kicked:
                return RunResult.KICKED
            if internal_stop:
                continue  # stopped for a collection: serve it and go on
            # A clean return without any stop request: the guest executed hlt.
            # (A stop request that races a hlt wins, and the guest continues
            # after the hlt; the firmware only halts in a loop.)
            return RunResult.HALTED

    def _describe(self, emu: Uc, error: UcError) -> str:
        rip = emu.reg_read(x86.UC_X86_REG_RIP)
        if error.errno == uc.UC_ERR_INSN_INVALID:
            return f"guest raised #UD (invalid instruction) at rip={rip:#x}; {_FATAL}"
        return f"emulation failed at rip={rip:#x}: {error}"

    def _refresh_paging_controls(self, emu: Uc) -> None:
        self._write_protect = bool(emu.reg_read(x86.UC_X86_REG_CR0) & CR0_WP)
        self._nx_enabled = bool(emu.reg_read(x86.UC_X86_REG_MSR, MSR_EFER) & EFER_NXE)

    def kick(self) -> None:
        with self._lock:
            if self._closed or self._uc is None:
                return
            self._kick_pending = True
            self._request_stop_locked(self._uc)

    def _request_stop_locked(self, emu: Uc) -> None:
        if not self._in_guest:
            return  # run() checks the request before it enters emulation
        emu.emu_stop()
        if self._vcpu_thread == threading.get_ident():
            return  # from a hook: emulation is under way, the stop cannot be lost
        if self._rekicker is None:
            self._rekicker = threading.Thread(target=self._rekick_loop, name="tcg-rekick", daemon=True)
            self._rekicker.start()
        self._rekick.set()

    def _stop_wanted_locked(self) -> bool:
        return self._in_guest and (self._kick_pending or self._collect_wanted or self._close_when_run_returns)

    def _rekick_loop(self) -> None:
        """Repeat emu_stop() until run() has taken the request (see the module docstring)."""
        pause = threading.Event()
        while True:
            self._rekick.wait()
            while True:
                with self._lock:
                    if self._closed or self._uc is None:
                        return
                    if not self._stop_wanted_locked():
                        self._rekick.clear()
                        break
                    self._uc.emu_stop()
                pause.wait(_REKICK_INTERVAL_S)

    # -- state ------------------------------------------------------------------

    def get_cpu_state(self) -> CpuState:
        emu = self._idle()
        _, gdt_base, gdt_limit, _ = emu.reg_read(x86.UC_X86_REG_GDTR)
        _, idt_base, idt_limit, _ = emu.reg_read(x86.UC_X86_REG_IDTR)
        gdt = DescriptorTable(base=gdt_base, limit=gdt_limit)
        cr3 = emu.reg_read(x86.UC_X86_REG_CR3)
        segments = []
        for index, reg in enumerate(_SEGMENT_IDS):
            selector = emu.reg_read(reg)
            segment = self._segments[index]
            if segment is None or segment.selector != selector:
                segment = self._segment_from_gdt(selector, gdt, cr3)
            if index in _BASE_IDS:
                segment = Segment(
                    segment.selector, emu.reg_read(_BASE_IDS[index]), segment.limit, segment.attributes
                )
            segments.append(segment)
        return CpuState(
            gprs=tuple(emu.reg_read(reg) for reg in _GPR_IDS),
            rip=emu.reg_read(x86.UC_X86_REG_RIP),
            rflags=emu.reg_read(x86.UC_X86_REG_RFLAGS),
            segments=tuple(segments),
            gdt=gdt,
            idt=DescriptorTable(base=idt_base, limit=idt_limit),
            cr0=emu.reg_read(x86.UC_X86_REG_CR0),
            cr2=emu.reg_read(x86.UC_X86_REG_CR2),
            cr3=cr3,
            cr4=emu.reg_read(x86.UC_X86_REG_CR4),
            efer=emu.reg_read(x86.UC_X86_REG_MSR, MSR_EFER),
        )

    def _descriptor(self, selector: int, gdt: DescriptorTable, cr3: int) -> int | str:
        """The GDT descriptor `selector` names, or why there is none."""
        index = selector & ~7
        if selector & 4:
            return f"selector {selector:#x} names the LDT, which the tcg accelerator does not support"
        if index + 7 > gdt.limit:
            return f"selector {selector:#x} is beyond the GDT limit {gdt.limit:#x}"
        assert self._ram is not None
        walked = walk_page_tables(self._ram, self._ram_size, cr3, gdt.base + index)
        if isinstance(walked, str):
            return (
                f"the GDT entry of selector {selector:#x} (at {gdt.base + index:#x}) is unreachable: {walked}"
            )
        physical = walked[0]
        if physical + 8 > self._ram_size:
            return f"the GDT entry of selector {selector:#x} is outside guest RAM"
        return int(_QWORD.unpack_from(self._ram, physical)[0])

    def _segment_from_gdt(self, selector: int, gdt: DescriptorTable, cr3: int) -> Segment:
        if selector & 0xFFFC == 0:
            return _null_segment(selector)
        descriptor = self._descriptor(selector, gdt, cr3)
        if isinstance(descriptor, str):
            return _null_segment(selector)
        return segment_from_descriptor(selector, descriptor)

    def set_cpu_state(self, state: CpuState) -> None:
        emu = self._idle()
        validate_long_mode_state(state)
        # Loading FS or GS makes unicorn read its descriptor from guest memory
        # (through the fill hook), and a failed read there would abort the
        # process rather than raise: check the descriptors can be read first.
        for index in (_FS, _GS):
            selector = state.segments[index].selector
            if selector & 0xFFFC:
                descriptor = self._descriptor(selector, state.gdt, state.cr3)
                if isinstance(descriptor, str):
                    raise ValueError(f"{SEGMENT_NAMES[index]}: {descriptor}")
                if not descriptor & DESC_PRESENT:
                    name = SEGMENT_NAMES[index]
                    raise ValueError(f"{name}: selector {selector:#x} names a descriptor that is not present")
        before = self.get_cpu_state()
        try:
            self._apply_state(emu, state)
        except (UcError, ValueError) as exc:
            self._apply_state(emu, before)
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"the emulated CPU refused the state: {exc}") from exc

    def _apply_state(self, emu: Uc, state: CpuState) -> None:
        # Control registers in the order that keeps long mode active (CR4.PAE
        # and EFER.LME before CR0.PG), then the tables, then the segments.
        emu.reg_write(x86.UC_X86_REG_CR3, state.cr3)
        emu.reg_write(x86.UC_X86_REG_CR4, state.cr4)
        emu.reg_write(x86.UC_X86_REG_MSR, (MSR_EFER, state.efer))
        emu.reg_write(x86.UC_X86_REG_CR0, state.cr0)
        emu.reg_write(x86.UC_X86_REG_CR2, state.cr2)
        emu.reg_write(x86.UC_X86_REG_GDTR, (0, state.gdt.base, state.gdt.limit, 0))
        emu.reg_write(x86.UC_X86_REG_IDTR, (0, state.idt.base, state.idt.limit, 0))
        # Unicorn keeps only the selector of CS, DS, ES and SS in 64-bit mode
        # (their bases are ignored there anyway); FS and GS load from the GDT,
        # and their bases then come from the FS_BASE/GS_BASE MSRs.
        for reg, seg in zip(_SEGMENT_IDS, state.segments, strict=True):
            emu.reg_write(reg, seg.selector)
        for index, reg in _BASE_IDS.items():
            emu.reg_write(reg, state.segments[index].base)
        for reg, value in zip(_GPR_IDS, state.gprs, strict=True):
            emu.reg_write(reg, value)
        emu.reg_write(x86.UC_X86_REG_RFLAGS, state.rflags)
        emu.reg_write(x86.UC_X86_REG_RIP, state.rip)
        self._segments = list(state.segments)
        held = {
            "cr0": emu.reg_read(x86.UC_X86_REG_CR0),
            "cr4": emu.reg_read(x86.UC_X86_REG_CR4),
            "efer": emu.reg_read(x86.UC_X86_REG_MSR, MSR_EFER),
        }
        for name, value in held.items():
            if value != getattr(state, name):
                wanted = getattr(state, name)
                raise ValueError(
                    f"the emulated CPU does not support {name} = {wanted:#x} (it holds {value:#x})"
                )
        # RAM may have been replaced under us (a restore copies it in first):
        # code translated from, and TLB entries for, the old contents must go.
        emu.ctl_flush_tb()
        emu.ctl(uc.UC_CTL_TLB_FLUSH, uc.UC_CTL_IO_WRITE)
        self._refresh_paging_controls(emu)

    # -- lifecycle --------------------------------------------------------------

    def _live(self) -> Uc:
        if self._closed or self._uc is None:
            raise RuntimeError("the tcg accelerator is closed")
        return self._uc

    def _idle(self) -> Uc:
        emu = self._live()
        if self._vcpu_thread is not None:
            raise RuntimeError("the vCPU state is only accessible while run() is not executing")
        return emu

    def close(self) -> None:
        """Release unicorn and the RAM export. Idempotent.

        From the vCPU thread itself (a device handler stopping the machine),
        the close happens as run() returns, which it then does at once.
        """
        with self._lock:
            if self._closed:
                return
            if self._vcpu_thread is not None:
                if self._vcpu_thread != threading.get_ident():
                    raise RuntimeError(
                        "close() while run() is executing: kick the vCPU and wait for run() first"
                    )
                self._close_when_run_returns = True
                if self._uc is not None:
                    self._uc.emu_stop()
                return
            self._closed = True
            emu, self._uc = self._uc, None
            self._rekick.set()
            self._changed.notify_all()
        if emu is not None:
            # uc_close now rather than whenever the garbage collector breaks
            # the hooks' reference cycle: only then may the RAM export go.
            finalizer = getattr(emu, "_Uc__finalizer", None)
            if finalizer is None:
                # Without it unicorn may still map the RAM: keep the export.
                return
            finalizer()
        if self._ram is not None:
            self._ram.release()
            self._ram = None
        self._ram_export = None

    def __enter__(self) -> TcgAccelerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
