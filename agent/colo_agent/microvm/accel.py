"""What the micro-VM monitor needs from an accelerator (`kvm` or `tcg`).

An accelerator owns one vCPU over guest RAM that the monitor mapped. It runs
the vCPU in the calling thread (`run`), calls the monitor's `IoHandler`
synchronously for every port access, and tracks the pages the *guest* writes.
CPU state crosses accelerators through the neutral `CpuState`, so a guest
saved under one accelerator continues under the other.
"""

from __future__ import annotations

import enum
import mmap
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Segment:
    selector: int
    base: int
    limit: int
    # VMX-style access rights: type(4) s(1) dpl(2) p(1) avl(1) l(1) db(1) g(1)
    # in bits 0-3, 4, 5-6, 7, 12, 13, 14, 15, as KVM and VMCS lay them out.
    attributes: int


@dataclass(frozen=True)
class DescriptorTable:
    base: int
    limit: int


GPR_NAMES: tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
SEGMENT_NAMES: tuple[str, ...] = ("cs", "ds", "es", "fs", "gs", "ss")


@dataclass(frozen=True)
class CpuState:
    """Every vCPU register the firmware depends on, accelerator-neutral."""

    gprs: tuple[int, ...]  # in GPR_NAMES order
    rip: int
    rflags: int
    segments: tuple[Segment, ...]  # in SEGMENT_NAMES order
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    extra: dict[str, int] = field(default_factory=dict)  # e.g. fs_base/gs_base MSRs

    def gpr(self, name: str) -> int:
        return self.gprs[GPR_NAMES.index(name)]


def _check_uint(name: str, value: object, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        if bits == 64:
            raise ValueError(f"{name} = {value!r} is not a 64-bit unsigned integer")
        raise ValueError(f"{name} = {value!r} does not fit {bits} bits")


def check_well_formed(state: CpuState) -> None:
    """Raise ValueError naming the field unless every register fits its width.

    What any accelerator needs before it loads a state; each then adds its own
    rules (tcg: 64-bit long mode only; KVM checks the rest itself).
    """
    if len(state.gprs) != len(GPR_NAMES):
        raise ValueError(f"CpuState has {len(state.gprs)} general registers, expected {len(GPR_NAMES)}")
    if len(state.segments) != len(SEGMENT_NAMES):
        raise ValueError(f"CpuState has {len(state.segments)} segments, expected {len(SEGMENT_NAMES)}")
    for name, value in zip(GPR_NAMES, state.gprs, strict=True):
        _check_uint(name, value, 64)
    for name in ("rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer"):
        _check_uint(name, getattr(state, name), 64)
    for name, seg in zip(SEGMENT_NAMES, state.segments, strict=True):
        _check_uint(f"{name}.base", seg.base, 64)
        _check_uint(f"{name}.selector", seg.selector, 16)
        _check_uint(f"{name}.limit", seg.limit, 32)
        _check_uint(f"{name}.attributes", seg.attributes, 17)  # the VMX layout, plus "unusable"
    for name, table in (("gdt", state.gdt), ("idt", state.idt)):
        _check_uint(f"{name}.base", table.base, 64)
        _check_uint(f"{name}.limit", table.limit, 16)


class RunResult(enum.Enum):
    KICKED = "kicked"  # kick() was called (or an I/O handler asked to stop)
    HALTED = "halted"  # the guest executed hlt
    FAILED = "failed"  # the guest crashed (triple fault, bad memory access, internal error)


class IoHandler(Protocol):
    """The device model. Called in the vCPU thread, between guest instructions."""

    def io_out(self, port: int, size: int, value: int) -> None: ...

    def io_in(self, port: int, size: int) -> int: ...


class Accelerator(Protocol):
    name: str
    # Set when run() returned FAILED: what went wrong, for the log.
    failure: str | None

    def run(self) -> RunResult:
        """Run the vCPU in this thread until kick(), hlt or a crash.

        A kick() that arrives while the vCPU is not running makes the next
        run() return KICKED at once (after completing any port access that
        was in flight), so no kick is ever lost.
        """

    def kick(self) -> None:
        """From any thread: make run() return KICKED within a bounded time."""

    def get_cpu_state(self) -> CpuState:
        """Only while run() is not executing."""

    def set_cpu_state(self, state: CpuState) -> None:
        """Only while run() is not executing."""

    def collect_dirty(self) -> npt.NDArray[np.int64]:
        """Sorted indices of pages the guest wrote since the previous call.

        Tracking starts when the accelerator is created: the first call
        returns every page written since then.
        """

    def close(self) -> None: ...


class AcceleratorFactory(Protocol):
    def __call__(self, ram: mmap.mmap, io: IoHandler) -> Accelerator: ...
