"""The slice of the Linux KVM userspace ABI (<linux/kvm.h>, x86-64) the accelerator uses.

Layouts are the kernel's and never change (the KVM ABI is stable); the sizes
are asserted below so a typo fails at import rather than corrupting a vCPU.
"""

from __future__ import annotations

import ctypes

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

KVM_API_VERSION = 12


class KvmRegs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * 4),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmDirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


def kvm_cpuid2(capacity: int) -> ctypes.Structure:
    """A `struct kvm_cpuid2` with room for `capacity` entries (a flexible array in C)."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * capacity)]

    cpuid = KvmCpuid2()
    cpuid.nent = capacity
    return cpuid


assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmSegment) == 24
assert ctypes.sizeof(KvmDtable) == 16
assert ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmUserspaceMemoryRegion) == 32
assert ctypes.sizeof(KvmDirtyLog) == 16
assert ctypes.sizeof(KvmCpuidEntry2) == 40

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | KVMIO << 8 | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


_CPUID2_HEADER = 8  # sizeof(struct kvm_cpuid2) without its flexible array

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _CPUID2_HEADER)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_SET_CPUID2 = _iow(0x90, _CPUID2_HEADER)

KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_USER_MEMORY = 3
KVM_CAP_EXT_CPUID = 7
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IMMEDIATE_EXIT = 136

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

# struct kvm_run: the fixed header, then a union of per-exit data at offset 32.
RUN_IMMEDIATE_EXIT = 1  # __u8
RUN_EXIT_REASON = 8  # __u32
RUN_EXIT_DATA = 32
# io: __u8 direction, __u8 size, __u16 port, __u32 count, __u64 data_offset
RUN_IO_FORMAT = "<BBHIQ"
# mmio: __u64 phys_addr, __u8 data[8], __u32 len, __u8 is_write
RUN_MMIO_FORMAT = "<Q8sIB"
# fail_entry: __u64 hardware_entry_failure_reason, __u32 cpu
RUN_FAIL_ENTRY_FORMAT = "<QI"
# internal: __u32 suberror, __u32 ndata, __u64 data[16]
RUN_INTERNAL_FORMAT = "<II"
RUN_INTERNAL_DATA_MAX = 16

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

EXIT_REASON_NAMES = {
    0: "unknown",
    1: "exception",
    2: "io",
    3: "hypercall",
    4: "debug",
    5: "hlt",
    6: "mmio",
    7: "irq window open",
    8: "shutdown",
    9: "fail entry",
    10: "intr",
    17: "internal error",
    24: "system event",
}
INTERNAL_ERROR_NAMES = {
    KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery faulted",
}

# Above the 1 GiB RAM limit and below the 4 GiB hole's top, where VMX without
# unrestricted guest keeps its real-mode TSS (3 pages) and identity map (1 page).
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
