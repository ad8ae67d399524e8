"""What only the tcg accelerator does: named guest exceptions, its page walk, its CPU-state checks.

The accelerator contract both accelerators keep is test_accel_contract.py.

Each guest is a few instructions of GNU assembly, assembled with gcc and
loaded at the firmware address into RAM prepared by `boot.py`, so these tests
exercise the same long-mode entry the firmware gets. No timing is asserted:
joins only have generous timeouts, so a loaded machine cannot fail a test.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from support.accel import (
    OWN_TABLES_GUEST,
    MakeVm,
    assert_state_refused,
    install_own_tables,
    needs_assembler,
    vm_maker,
)

from colo_agent.microvm import abi, boot
from colo_agent.microvm.accel import DescriptorTable, RunResult
from colo_agent.microvm.tcg import TcgAccelerator, segment_from_descriptor, walk_page_tables

pytestmark = needs_assembler

RAM_SIZE = abi.MIN_RAM


@pytest.fixture
def make_vm(tmp_path: Path) -> Iterator[MakeVm[TcgAccelerator]]:
    yield from vm_maker(TcgAccelerator, tmp_path)


# -- hlt and failures ---------------------------------------------------------


def test_fetch_outside_ram_fails(make_vm: MakeVm) -> None:
    accel, _ram, _io = make_vm("mov $0x30000000, %rax\n jmp *%rax")
    assert accel.run() is RunResult.FAILED
    assert accel.failure is not None
    assert "instruction fetch at 0x30000000" in accel.failure


def test_unmapped_virtual_address_is_a_page_fault(make_vm: MakeVm) -> None:
    # Above the identity-mapped first GiB the guest's page tables map nothing.
    accel, _ram, _io = make_vm("mov $0x80000000, %rax\n mov (%rax), %rbx\n hlt")
    assert accel.run() is RunResult.FAILED
    assert accel.failure is not None
    assert "#PF" in accel.failure and "read at 0x80000000" in accel.failure


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("ud2", "#UD"),
        ("xor %ecx, %ecx\n div %rcx", "#DE"),
        ("mov $0x8000000000000000, %rax\n mov (%rax), %rbx", "#GP"),
        ("int3", "#BP"),
    ],
)
def test_guest_exception_fails_with_its_name_and_rip(make_vm: MakeVm, source: str, what: str) -> None:
    accel, _ram, _io = make_vm(source + "\n hlt")
    assert accel.run() is RunResult.FAILED
    assert accel.failure is not None
    assert what in accel.failure and "fatal" in accel.failure
    assert "rip=0x1000" in accel.failure  # somewhere in the first few instructions


# -- dirty log ----------------------------------------------------------------


def test_read_only_page_faults_when_cr0_wp_is_set(make_vm: MakeVm) -> None:
    accel, ram, _io = make_vm(OWN_TABLES_GUEST)
    install_own_tables(ram)
    assert accel.run() is RunResult.HALTED
    state = accel.get_cpu_state()
    accel.set_cpu_state(replace(state, cr0=state.cr0 | 1 << 16))
    assert accel.run() is RunResult.FAILED
    assert accel.failure is not None
    assert "write at 0x40001000" in accel.failure and "read-only" in accel.failure
    assert struct.unpack_from("<Q", ram, 0x301000)[0] == 0xFEED


def test_walk_page_tables_matches_the_boot_identity_map() -> None:
    ram = bytearray(RAM_SIZE)
    boot.write_boot_environment(ram, RAM_SIZE)
    for vaddr in (0, 0x1234, abi.FIRMWARE_ADDR + 0x10, RAM_SIZE - 1, (1 << 30) - 8):
        assert walk_page_tables(ram, RAM_SIZE, abi.PML4_ADDR, vaddr) == (vaddr, True, False)
    assert isinstance(walk_page_tables(ram, RAM_SIZE, abi.PML4_ADDR, 1 << 30), str)
    # A CR3 beyond RAM is an error, not an exception.
    assert "outside guest RAM" in str(walk_page_tables(ram, RAM_SIZE, RAM_SIZE, 0))


# -- CPU state ----------------------------------------------------------------


def test_segment_from_descriptor_matches_the_boot_segments() -> None:
    state = boot.initial_cpu_state()
    assert segment_from_descriptor(abi.CODE_SELECTOR, boot.GDT_CODE64) == state.segments[0]
    assert segment_from_descriptor(abi.DATA_SELECTOR, boot.GDT_DATA) == state.segments[1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cr0": boot.CR0_PE | boot.CR0_ET | boot.CR0_NE}, "CR0.PG"),
        ({"efer": boot.EFER_LME}, "EFER.LMA"),
        ({"cr4": boot.CR4_PAE | 1 << 12}, "LA57"),
        # fs = 0x10 must be loadable from the GDT: here it is beyond its limit...
        ({"gdt": DescriptorTable(base=abi.GDT_ADDR, limit=0xF)}, "beyond the GDT limit"),
        # ...or outside RAM, which unicorn would otherwise crash on.
        ({"gdt": DescriptorTable(base=RAM_SIZE, limit=0x17)}, "GDT entry"),
    ],
)
def test_bad_cpu_state_is_refused_and_changes_nothing(
    make_vm: MakeVm, change: dict[str, object], message: str
) -> None:
    assert_state_refused(make_vm, change, message)


def test_unsupported_efer_bit_is_refused_and_rolled_back(make_vm: MakeVm) -> None:
    accel, _ram, _io = make_vm("hlt")
    before = accel.get_cpu_state()
    with pytest.raises(ValueError, match="efer"):
        accel.set_cpu_state(replace(before, efer=before.efer | 1 << 20))  # a reserved bit
    assert accel.get_cpu_state() == before


