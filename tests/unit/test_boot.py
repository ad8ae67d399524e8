"""The long-mode boot environment: page tables, GDT and the entry CPU state."""

from __future__ import annotations

import mmap
import struct

import pytest

from colo_agent.microvm import abi, boot


def _walk(ram: bytes, cr3: int, vaddr: int) -> int:
    """Translate like the MMU would, for the 4-level / 2 MiB layout we build."""
    pml4e = struct.unpack_from("<Q", ram, cr3 + ((vaddr >> 39) & 0x1FF) * 8)[0]
    assert pml4e & boot.PTE_PRESENT
    pdpte = struct.unpack_from("<Q", ram, (pml4e & ~0xFFF & (1 << 52) - 1) + ((vaddr >> 30) & 0x1FF) * 8)[0]
    assert pdpte & boot.PTE_PRESENT and not pdpte & boot.PTE_LARGE
    pde = struct.unpack_from("<Q", ram, (pdpte & ~0xFFF & (1 << 52) - 1) + ((vaddr >> 21) & 0x1FF) * 8)[0]
    assert pde & boot.PTE_PRESENT and pde & boot.PTE_LARGE and pde & boot.PTE_WRITABLE
    # Pre-set so the page walk never writes back into guest RAM.
    assert pde & boot.PTE_ACCESSED and pde & boot.PTE_DIRTY
    return (pde & ~(boot.LARGE_PAGE_SIZE - 1) & (1 << 52) - 1) | (vaddr & (boot.LARGE_PAGE_SIZE - 1))


def test_identity_maps_first_gib() -> None:
    ram = mmap.mmap(-1, abi.MIN_RAM)
    boot.write_boot_environment(ram, abi.MIN_RAM)
    image = bytes(ram)
    for vaddr in (0, abi.FIRMWARE_ADDR + 0x123, abi.MIN_RAM - 1, (1 << 30) - 8, 0x2345_6789):
        assert _walk(image, abi.PML4_ADDR, vaddr) == vaddr


def test_gdt_matches_initial_segments() -> None:
    ram = bytearray(abi.MIN_RAM)
    boot.write_boot_environment(ram, abi.MIN_RAM)
    state = boot.initial_cpu_state()
    assert state.gdt.base == abi.GDT_ADDR
    for seg in state.segments:
        desc = struct.unpack_from("<Q", ram, state.gdt.base + seg.selector)[0]
        access = (desc >> 40) & 0xFF
        flags = (desc >> 52) & 0xF
        # Descriptor access byte + flags nibble are exactly the VMX attribute layout.
        assert access | flags << 12 == seg.attributes
        assert seg.selector + 7 <= state.gdt.limit


def test_initial_state_is_abi_entry() -> None:
    state = boot.initial_cpu_state()
    assert state.rip == abi.FIRMWARE_ADDR
    assert state.gpr("rsp") == abi.STACK_TOP
    assert state.segments[0].selector == abi.CODE_SELECTOR
    assert all(s.selector == abi.DATA_SELECTOR for s in state.segments[1:])
    assert state.cr0 & boot.CR0_PE and state.cr0 & boot.CR0_PG
    assert state.cr4 & boot.CR4_PAE
    assert state.efer == boot.EFER_LME | boot.EFER_LMA
    assert not state.rflags & (1 << 9)  # interrupts off


def test_boot_info_layout() -> None:
    ram = bytearray(abi.MIN_RAM)
    boot.write_boot_info(ram, abi.MIN_RAM, heap_start=0x200000, dirty_rate=7)
    fields = struct.unpack_from("<8Q", ram, abi.BOOT_INFO_ADDR)
    assert fields == (
        abi.BOOT_MAGIC,
        abi.MIN_RAM,
        0x200000,
        abi.RX_RING_ADDR,
        abi.RING_CAPACITY,
        abi.TX_RING_ADDR,
        abi.RING_CAPACITY,
        7,
    )


@pytest.mark.parametrize(
    ("size", "ram_size", "message"),
    [
        (abi.MIN_RAM, abi.MIN_RAM + 1, "multiple of the page size"),
        (abi.MIN_RAM, abi.MIN_RAM - abi.PAGE_SIZE, "outside the supported range"),
        (abi.MIN_RAM, abi.MAX_RAM + abi.PAGE_SIZE, "outside the supported range"),
        (abi.MIN_RAM, abi.MIN_RAM * 2, "less than ram_size"),
    ],
)
def test_bad_ram_is_refused(size: int, ram_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        boot.write_boot_environment(bytearray(size), ram_size)


def test_read_only_ram_is_refused() -> None:
    with pytest.raises(ValueError, match="writable"):
        boot.write_boot_environment(bytes(abi.MIN_RAM), abi.MIN_RAM)


def test_bad_heap_start_is_refused() -> None:
    with pytest.raises(ValueError, match="heap_start"):
        boot.write_boot_info(bytearray(abi.MIN_RAM), abi.MIN_RAM, heap_start=0x1234)
