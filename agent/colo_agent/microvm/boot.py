"""The long-mode boot environment of docs/guest-abi.md, shared by every accelerator.

The monitor calls `write_boot_environment` on zeroed RAM before the first run
and starts the vCPU from `initial_cpu_state()`. Both accelerators enter the
firmware directly in 64-bit mode, so no real-mode trampoline exists.

Descriptors and page-table entries are written with their *accessed* (and, for
leaf entries, *dirty*) bits already set. Otherwise the CPU's first use of them
writes those bits back into guest RAM, which would dirty the GDT and page-table
pages behind the firmware's back and make the accelerators' dirty logs differ.
"""

from __future__ import annotations

import struct
from typing import Any

from colo_agent.microvm import abi
from colo_agent.microvm.accel import GPR_NAMES, CpuState, DescriptorTable, Segment

# Segment descriptors: limit 0xFFFFF with G=1 (4 GiB; ignored in long mode).
# 0x9B = present, ring 0, code, execute/read, accessed; flags 0xA = G | L.
GDT_CODE64 = 0x00AF9B000000FFFF
# 0x93 = present, ring 0, data, read/write, accessed; flags 0xC = G | D/B.
GDT_DATA = 0x00CF93000000FFFF
GDT_ENTRIES = (0, GDT_CODE64, GDT_DATA)
GDT_LIMIT = len(GDT_ENTRIES) * 8 - 1

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_LARGE = 1 << 7  # PS: a 2 MiB page in a PD entry

LARGE_PAGE_SIZE = 2 << 20
PD_ENTRIES = 512  # 512 x 2 MiB = the first 1 GiB, identity mapped

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as 1

# VMX-style access rights (see accel.Segment), matching the descriptors above.
CODE64_ATTRIBUTES = 0xB | 1 << 4 | 1 << 7 | 1 << 13 | 1 << 15  # type, S, P, L, G
DATA_ATTRIBUTES = 0x3 | 1 << 4 | 1 << 7 | 1 << 14 | 1 << 15  # type, S, P, D/B, G

# Highest address any boot structure occupies; RAM must cover it.
_BOOT_AREA_END = abi.PD_ADDR + abi.PAGE_SIZE


def _check_ram(ram: Any, ram_size: int) -> memoryview:
    if not isinstance(ram_size, int) or isinstance(ram_size, bool):
        raise TypeError(f"ram_size must be an int, not {type(ram_size).__name__}")
    if ram_size % abi.PAGE_SIZE:
        raise ValueError(f"ram_size {ram_size:#x} is not a multiple of the page size {abi.PAGE_SIZE}")
    if not abi.MIN_RAM <= ram_size <= abi.MAX_RAM:
        raise ValueError(
            f"ram_size {ram_size:#x} is outside the supported range {abi.MIN_RAM:#x}..{abi.MAX_RAM:#x}"
        )
    view = memoryview(ram).cast("B")
    if view.readonly:
        raise ValueError("guest RAM must be writable")
    if len(view) < ram_size:
        raise ValueError(f"guest RAM buffer holds {len(view):#x} bytes, less than ram_size {ram_size:#x}")
    assert _BOOT_AREA_END <= abi.MIN_RAM
    return view


def write_boot_environment(ram: Any, ram_size: int) -> None:
    """Write the GDT and the identity-mapping page tables into guest RAM.

    `ram` is any writable buffer (the guest RAM mmap); `ram_size` the guest's
    RAM size in bytes. The whole first GiB is mapped whatever the RAM size, so
    the firmware sees one flat address space; accesses past the end of RAM
    fault in the accelerator, not in the page walk.
    """
    view = _check_ram(ram, ram_size)
    struct.pack_into(f"<{len(GDT_ENTRIES)}Q", view, abi.GDT_ADDR, *GDT_ENTRIES)

    table = PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED
    view[abi.PML4_ADDR : abi.PML4_ADDR + abi.PAGE_SIZE] = bytes(abi.PAGE_SIZE)
    view[abi.PDPT_ADDR : abi.PDPT_ADDR + abi.PAGE_SIZE] = bytes(abi.PAGE_SIZE)
    struct.pack_into("<Q", view, abi.PML4_ADDR, abi.PDPT_ADDR | table)
    struct.pack_into("<Q", view, abi.PDPT_ADDR, abi.PD_ADDR | table)
    leaf = table | PTE_DIRTY | PTE_LARGE
    struct.pack_into(
        f"<{PD_ENTRIES}Q", view, abi.PD_ADDR, *((i * LARGE_PAGE_SIZE) | leaf for i in range(PD_ENTRIES))
    )


def write_boot_info(ram: Any, ram_size: int, heap_start: int, dirty_rate: int = 0) -> None:
    """Write `struct boot_info` at BOOT_INFO_ADDR (docs/guest-abi.md)."""
    view = _check_ram(ram, ram_size)
    if heap_start % abi.PAGE_SIZE or not abi.FIRMWARE_ADDR < heap_start < ram_size:
        raise ValueError(
            f"heap_start {heap_start:#x} must be page aligned, above the firmware at "
            f"{abi.FIRMWARE_ADDR:#x} and below ram_size {ram_size:#x}"
        )
    if not 0 <= dirty_rate < 1 << 64:
        raise ValueError(f"dirty_rate {dirty_rate} is not a 64-bit unsigned integer")
    struct.pack_into(
        "<8Q",
        view,
        abi.BOOT_INFO_ADDR,
        abi.BOOT_MAGIC,
        ram_size,
        heap_start,
        abi.RX_RING_ADDR,
        abi.RING_CAPACITY,
        abi.TX_RING_ADDR,
        abi.RING_CAPACITY,
        dirty_rate,
    )


def initial_cpu_state() -> CpuState:
    """The vCPU state at the firmware's entry point (docs/guest-abi.md)."""
    code = Segment(selector=abi.CODE_SELECTOR, base=0, limit=0xFFFFFFFF, attributes=CODE64_ATTRIBUTES)
    data = Segment(selector=abi.DATA_SELECTOR, base=0, limit=0xFFFFFFFF, attributes=DATA_ATTRIBUTES)
    gprs = [0] * 16
    gprs[GPR_NAMES.index("rsp")] = abi.STACK_TOP
    return CpuState(
        gprs=tuple(gprs),
        rip=abi.FIRMWARE_ADDR,
        rflags=RFLAGS_RESERVED,
        segments=(code, data, data, data, data, data),  # cs ds es fs gs ss
        gdt=DescriptorTable(base=abi.GDT_ADDR, limit=GDT_LIMIT),
        idt=DescriptorTable(base=0, limit=0),
        cr0=CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr2=0,
        cr3=abi.PML4_ADDR,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )
