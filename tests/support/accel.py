"""What the accelerator tests (kvm and tcg) share: tiny guests from assembly, a recording device."""

from __future__ import annotations

import mmap
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from colo_agent.microvm import abi, boot
from colo_agent.microvm.accel import Accelerator, RunResult

needs_assembler = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("objcopy") is None,
    reason="the test guests need gcc and objcopy (Debian: gcc, binutils)",
)

_assembled: dict[str, bytes] = {}


def assemble(source: str, tmp_path: Path) -> bytes:
    """Flat binary of `source` (GNU as, AT&T syntax, 64-bit), position-independent by construction."""
    if source not in _assembled:
        src = tmp_path / "guest.S"
        obj = tmp_path / "guest.o"
        out = tmp_path / "guest.bin"
        src.write_text(".code64\n.text\n" + source + "\n")
        subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True, capture_output=True)
        subprocess.run(
            ["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)], check=True, capture_output=True
        )
        _assembled[source] = out.read_bytes()
    return _assembled[source]


@dataclass
class RecordingIo:
    """A device model that records every access and answers INs from a queue."""

    inputs: dict[int, list[int]] = field(default_factory=dict)
    outs: list[tuple[int, int, int]] = field(default_factory=list)
    ins: list[tuple[int, int]] = field(default_factory=list)
    on_access: Callable[[], None] | None = None

    def io_out(self, port: int, size: int, value: int) -> None:
        self.outs.append((port, size, value))
        if self.on_access:
            self.on_access()

    def io_in(self, port: int, size: int) -> int:
        self.ins.append((port, size))
        if self.on_access:
            self.on_access()
        return self.inputs[port].pop(0)


A = TypeVar("A", bound=Accelerator)
MakeVm = Callable[..., tuple[A, mmap.mmap, RecordingIo]]
# Generous: only a hang should fail, never a slow shared machine.
JOIN_TIMEOUT_S = 10.0


def vm_maker(accel_cls: Callable[[mmap.mmap, RecordingIo], A], tmp_path: Path) -> Iterator[MakeVm[A]]:
    """Body of a `make_vm` fixture: accelerators over fresh long-mode RAM, closed afterwards.

    `make(source)` assembles `source` at the firmware address and sets the
    entry CPU state; `make(ram=..., io=...)` wraps existing RAM as it is."""
    made: list[tuple[A, mmap.mmap]] = []

    def make(
        source: str | None = None,
        ram: mmap.mmap | None = None,
        io: RecordingIo | None = None,
        ram_size: int = abi.MIN_RAM,
    ) -> tuple[A, mmap.mmap, RecordingIo]:
        io = io or RecordingIo()
        if ram is None:
            ram = mmap.mmap(-1, ram_size)
            boot.write_boot_environment(ram, ram_size)
            if source is not None:
                code = assemble(source, tmp_path)
                ram[abi.FIRMWARE_ADDR : abi.FIRMWARE_ADDR + len(code)] = code
        accel = accel_cls(ram, io)
        made.append((accel, ram))
        if source is not None:
            accel.set_cpu_state(boot.initial_cpu_state())
        return accel, ram, io

    yield make
    for accel, ram in reversed(made):
        accel.close()
        ram.close()


def run_in_thread(accel: Accelerator) -> tuple[threading.Thread, list[RunResult]]:
    result: list[RunResult] = []
    thread = threading.Thread(target=lambda: result.append(accel.run()), daemon=True)
    thread.start()
    return thread, result


def kick_and_join(accel: Accelerator, thread: threading.Thread, result: list[RunResult]) -> RunResult:
    accel.kick()
    thread.join(JOIN_TIMEOUT_S)
    assert not thread.is_alive(), "run() did not return after kick()"
    return result[0]


M64 = (1 << 64) - 1

# An endless loop that keeps a checkable invariant in several registers and the
# stack: r9 counts iterations, rax is an LCG stepped r9 times from 0, rbx is
# 1 + 2 + ... + r9. When the flag at 0x1f8000 is set, it stores them and halts.
LCG_A = 0x5851F42D4C957F2D
LCG_C = 0x14057B7EF767814F
MIGRATION_GUEST = f"""
    mov ${LCG_A:#x}, %r8
    mov ${LCG_C:#x}, %r10
    xor %eax, %eax
    xor %ebx, %ebx
    xor %r9d, %r9d
1:  imul %r8, %rax
    add %r10, %rax
    inc %r9
    push %r9
    add %r9, %rbx
    pop %r11
    cmpq $0, 0x1f8000
    je 1b
    mov %rax, 0x1f0000
    mov %rbx, 0x1f0008
    mov %r9, 0x1f0010
    mov %r11, 0x1f0018
    hlt
"""



def lcg_after(steps: int) -> int:
    """x -> a*x + c applied `steps` times to 0, by squaring the affine map."""
    mul, add = 1, 0  # the accumulated map x -> mul*x + add
    a, c = LCG_A, LCG_C
    while steps:
        if steps & 1:
            mul, add = (a * mul) & M64, (a * add + c) & M64
        a, c = (a * a) & M64, (a * c + c) & M64
        steps >>= 1
    return add


def check_migration_guest_finished(ram: mmap.mmap, counts: list[int]) -> None:
    rax, rbx, r9, r11 = struct.unpack_from("<4Q", ram, 0x1F0000)
    assert counts == sorted(counts) and r9 >= counts[-1] > 0
    assert rax == lcg_after(r9)
    assert rbx == (r9 * (r9 + 1) // 2) & M64
    assert r11 == r9


# The table at 0x180000 holds a count and then that many addresses. Each round
# first reads every address (so the soft TLB holds read-only entries for the
# pages), then stores a distinct value at each: round r writes (r << 32) | i
# at address i. A second table (0x1c0000) lists unaligned addresses that
# straddle a page boundary. Then it halts, and the next run does a new round.
DIRTY_GUEST = """
    xor %r12, %r12
round:
    inc %r12
    mov $0x180000, %rsi
    mov (%rsi), %rcx
    xor %rbx, %rbx
1:  mov 8(%rsi,%rbx,8), %rdi
    mov (%rdi), %rax
    inc %rbx
    cmp %rcx, %rbx
    jne 1b
    xor %rbx, %rbx
2:  mov 8(%rsi,%rbx,8), %rdi
    mov %r12, %rax
    shl $32, %rax
    or %rbx, %rax
    mov %rax, (%rdi)
    inc %rbx
    cmp %rcx, %rbx
    jne 2b
    mov $0x1c0000, %rsi
    mov (%rsi), %rcx
    xor %rbx, %rbx
3:  mov 8(%rsi,%rbx,8), %rdi
    mov %r12, (%rdi)
    inc %rbx
    cmp %rcx, %rbx
    jne 3b
    hlt
    jmp round
"""
DIRTY_RAM = 16 << 20


def write_table(ram: mmap.mmap, where: int, addrs: npt.NDArray[np.int64]) -> None:
    struct.pack_into(f"<Q{addrs.size}Q", ram, where, addrs.size, *addrs.tolist())


# A guest with 4 KiB pages of its own: virtual page 0x40000000 maps physical
# page 0x300000 read/write, 0x40001000 maps 0x301000 read-only.
OWN_TABLES_GUEST = """
    movq $0x40000000, %rax
    movq $0x1234, (%rax)
    movq 0x1000(%rax), %rbx
    hlt
    movq $1, 0x1000(%rax)
    hlt
"""


def install_own_tables(ram: mmap.mmap) -> None:
    # PDPT[1] (the second GiB) -> PD at 0x310000 -> PT at 0x311000.
    table = boot.PTE_PRESENT | boot.PTE_WRITABLE | boot.PTE_ACCESSED
    struct.pack_into("<Q", ram, abi.PDPT_ADDR + 8, 0x310000 | table)
    struct.pack_into("<Q", ram, 0x310000, 0x311000 | table)
    struct.pack_into("<Q", ram, 0x311000, 0x300000 | table | boot.PTE_DIRTY)
    struct.pack_into("<Q", ram, 0x311008, 0x301000 | boot.PTE_PRESENT | boot.PTE_ACCESSED)
    struct.pack_into("<Q", ram, 0x301000, 0xFEED)


def assert_state_refused(make_vm: MakeVm[Accelerator], change: dict[str, object], message: str) -> None:
    """`set_cpu_state` of the initial state with `change` raises ValueError(`message`) and changes nothing."""
    accel, _ram, _io = make_vm("hlt")
    before = accel.get_cpu_state()
    with pytest.raises(ValueError, match=message):
        accel.set_cpu_state(replace(boot.initial_cpu_state(), **change))  # type: ignore[arg-type]
    assert accel.get_cpu_state() == before
