"""The kvm accelerator against tiny 64-bit guests assembled from source here.

Each guest is a few instructions of GNU assembly, assembled with gcc and
loaded at the firmware address into RAM prepared by `boot.py`, so these tests
exercise the same long-mode entry the firmware gets.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support.accel import (
    JOIN_TIMEOUT_S,
    LCG_A,
    M64,
    MIGRATION_GUEST,
    MakeVm,
    RecordingIo,
    assemble,
    kick_and_join,
    lcg_after,
    needs_assembler,
    run_in_thread,
    vm_maker,
)

from colo_agent.microvm import abi, boot
from colo_agent.microvm.accel import DescriptorTable, RunResult
from colo_agent.microvm.kvm import KvmAccelerator, install_kick_signal_handler, kvm_unavailable_reason

KVM_REASON = kvm_unavailable_reason()
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(KVM_REASON is not None, reason=f"kvm: {KVM_REASON}"),
    needs_assembler,
]

RAM_SIZE = abi.MIN_RAM
PAGE = abi.PAGE_SIZE


@pytest.fixture(autouse=True, scope="module")
def _kick_handler() -> None:
    install_kick_signal_handler()


@pytest.fixture
def make_vm(tmp_path: Path) -> Iterator[MakeVm[KvmAccelerator]]:
    yield from vm_maker(KvmAccelerator, tmp_path)


# -- port I/O -----------------------------------------------------------------

IO_GUEST = """
    mov $0x3f8, %dx
    mov $0x41, %al
    out %al, %dx
    mov $0x500, %dx
    mov $0xdeadbeef, %eax
    out %eax, %dx
    mov $0x510, %dx
    in %dx, %eax
    mov %rax, %rbx
    xor %eax, %eax
    mov $0x514, %dx
    in %dx, %ax
    mov %rax, %rcx
    hlt
"""


def test_port_io_reaches_handler_and_in_lands_in_rax(make_vm) -> None:
    accel, _ram, io = make_vm(IO_GUEST)
    io.inputs = {0x510: [0x89ABCDEF], 0x514: [0x1234]}
    assert accel.run() is RunResult.HALTED
    assert io.outs == [(0x3F8, 1, 0x41), (0x500, 4, 0xDEADBEEF)]
    assert io.ins == [(0x510, 4), (0x514, 2)]
    state = accel.get_cpu_state()
    assert state.gpr("rbx") == 0x89ABCDEF
    assert state.gpr("rcx") == 0x1234


def test_in_value_is_truncated_to_access_width(make_vm) -> None:
    accel, _ram, io = make_vm("mov $0x510, %dx\n xor %eax, %eax\n in %dx, %al\n hlt")
    io.inputs = {0x510: [0x1FF]}
    assert accel.run() is RunResult.HALTED
    assert accel.get_cpu_state().gpr("rax") == 0xFF


STRING_IO_GUEST = """
    cld
    mov $0x200000, %rsi
    mov $16, %rcx
    mov $0x3f8, %dx
    rep outsb
    mov $0x201000, %rdi
    mov $4, %rcx
    mov $0x510, %dx
    rep insl
    hlt
"""


def test_string_io_moves_every_item_in_order(make_vm) -> None:
    accel, ram, io = make_vm(STRING_IO_GUEST)
    message = b"hello, string io"
    ram[0x200000 : 0x200000 + len(message)] = message
    io.inputs = {0x510: [0x11111111, 0x22222222, 0x33333333, 0x44444444]}
    assert accel.run() is RunResult.HALTED
    assert bytes(value for _port, _size, value in io.outs) == message
    assert {(port, size) for port, size, _value in io.outs} == {(0x3F8, 1)}
    assert struct.unpack_from("<4I", ram, 0x201000) == (0x11111111, 0x22222222, 0x33333333, 0x44444444)
    state = accel.get_cpu_state()
    assert state.gpr("rcx") == 0
    assert state.gpr("rsi") == 0x200000 + len(message)
    assert state.gpr("rdi") == 0x201000 + 16


# -- hlt and failures ---------------------------------------------------------


def test_hlt_returns_halted_and_run_continues_after_it(make_vm) -> None:
    accel, _ram, io = make_vm("hlt\n mov $0x3f8, %dx\n mov $0x42, %al\n out %al, %dx\n hlt")
    assert accel.run() is RunResult.HALTED
    assert io.outs == []
    assert accel.run() is RunResult.HALTED
    assert io.outs == [(0x3F8, 1, 0x42)]


def test_access_outside_ram_fails_with_address(make_vm) -> None:
    accel, _ram, _io = make_vm("movq $1, 0x20000000\n hlt")
    assert accel.run() is RunResult.FAILED
    assert accel.failure is not None
    assert "0x20000000" in accel.failure and "outside guest RAM" in accel.failure


def test_triple_fault_fails(make_vm) -> None:
    # No IDT (limit 0): #UD cannot be delivered, escalates to a triple fault.
    accel, _ram, _io = make_vm("ud2")
    assert accel.run() is RunResult.FAILED
    assert accel.failure is not None and "triple fault" in accel.failure
    assert f"rip={abi.FIRMWARE_ADDR:#x}" in accel.failure


def test_handler_exception_propagates(make_vm) -> None:
    accel, _ram, _io = make_vm("mov $0x510, %dx\n in %dx, %eax\n hlt")  # no input queued -> KeyError
    with pytest.raises(KeyError):
        accel.run()


# -- dirty log ----------------------------------------------------------------

# Writes one qword to every address of the table at 0x180000 (count first),
# halts, then writes one more page.
DIRTY_GUEST = """
    mov $0x180000, %rsi
    mov (%rsi), %rcx
    add $8, %rsi
1:  mov (%rsi), %rdi
    movq $0x5a5a5a5a, (%rdi)
    add $8, %rsi
    dec %rcx
    jnz 1b
    hlt
    movq $1, 0x3ff008
    hlt
"""


def test_dirty_log_reports_exactly_the_pages_written(make_vm) -> None:
    accel, ram, _io = make_vm(DIRTY_GUEST)
    rng = np.random.default_rng(7)
    # Pages 0x200..0x3fe: above the code and the table, below the last-phase page.
    pages = rng.choice(np.arange(0x200, 0x3FF), size=97, replace=False)
    offsets = rng.integers(0, PAGE // 8, size=pages.size) * 8
    addrs = pages * PAGE + offsets
    struct.pack_into(f"<Q{addrs.size}Q", ram, 0x180000, addrs.size, *addrs.tolist())
    shadow = bytes(ram)
    # Monitor-side writes (boot structures, the table) are not the guest's.
    assert accel.collect_dirty().size == 0

    assert accel.run() is RunResult.HALTED
    dirty = accel.collect_dirty()
    assert dirty.dtype == np.int64
    np.testing.assert_array_equal(dirty, np.sort(pages))
    changed = np.flatnonzero(
        (np.frombuffer(ram, dtype=np.uint8) != np.frombuffer(shadow, dtype=np.uint8)).reshape(-1, PAGE).any(1)
    )
    assert set(changed.tolist()) <= set(dirty.tolist())
    assert accel.collect_dirty().size == 0

    assert accel.run() is RunResult.HALTED
    np.testing.assert_array_equal(accel.collect_dirty(), [0x3FF])


def test_dirty_log_rearms_after_collection(make_vm) -> None:
    # The same page written in two rounds is reported in both.
    accel, _ram, _io = make_vm("movq $1, 0x300000\n hlt\n movq $2, 0x300008\n hlt")
    assert accel.run() is RunResult.HALTED
    np.testing.assert_array_equal(accel.collect_dirty(), [0x300])
    assert accel.run() is RunResult.HALTED
    np.testing.assert_array_equal(accel.collect_dirty(), [0x300])


# -- kick ---------------------------------------------------------------------

SPIN_GUEST = "1: jmp 1b"


def test_kick_stops_a_spinning_guest(make_vm) -> None:
    accel, _ram, _io = make_vm(SPIN_GUEST)
    thread, result = run_in_thread(accel)
    time.sleep(0.05)
    assert kick_and_join(accel, thread, result) is RunResult.KICKED
    # The kick is consumed: the next run spins again until kicked again.
    thread, result = run_in_thread(accel)
    time.sleep(0.05)
    assert thread.is_alive()
    assert kick_and_join(accel, thread, result) is RunResult.KICKED


def test_kick_before_run_is_not_lost(make_vm) -> None:
    accel, _ram, io = make_vm("mov $0x3f8, %dx\n out %al, %dx\n hlt")
    accel.kick()
    assert accel.run() is RunResult.KICKED
    assert io.outs == []
    assert accel.get_cpu_state().rip == abi.FIRMWARE_ADDR
    assert accel.run() is RunResult.HALTED


def test_kick_during_in_completes_the_access_first(make_vm, tmp_path: Path) -> None:
    prologue = "mov $0x510, %dx\n in %dx, %eax\n"
    accel, _ram, io = make_vm(prologue + "1: jmp 1b")
    io.inputs = {0x510: [0xCAFE]}
    io.on_access = accel.kick
    assert accel.run() is RunResult.KICKED
    state = accel.get_cpu_state()
    assert state.gpr("rax") == 0xCAFE
    # rip is past the `in`, on the spin loop: the access is complete.
    assert state.rip == abi.FIRMWARE_ADDR + len(assemble(prologue, tmp_path))


def test_kick_from_another_thread_during_io_handler(make_vm) -> None:
    # The monitor's pause path: kick() races a port access in the vCPU thread.
    accel, _ram, io = make_vm("mov $0x500, %dx\n 1: out %eax, %dx\n inc %eax\n jmp 1b")
    handler_entered = threading.Event()
    io.on_access = handler_entered.set
    thread, result = run_in_thread(accel)
    assert handler_entered.wait(JOIN_TIMEOUT_S)
    for _round in range(3):
        assert kick_and_join(accel, thread, result) is RunResult.KICKED
        state = accel.get_cpu_state()
        values = [value for _port, _size, value in io.outs]
        # The handler saw each OUT once, in order, and none is half done: eax
        # is the last value sent if the vCPU stopped right after the `out`
        # (at `inc`, +5), else the next one to send.
        assert values == list(range(len(values)))
        at_inc = state.rip == abi.FIRMWARE_ADDR + 5
        assert state.gpr("rax") == len(values) - (1 if at_inc else 0)
        thread, result = run_in_thread(accel)
    assert kick_and_join(accel, thread, result) is RunResult.KICKED


def test_run_requires_kick_handler(make_vm, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    accel, _ram, _io = make_vm("hlt")
    monkeypatch.setattr(signal, "getsignal", lambda _sig: signal.SIG_DFL)
    with pytest.raises(RuntimeError, match="install_kick_signal_handler"):
        accel.run()


def test_install_kick_handler_keeps_existing_handler() -> None:
    import signal

    def mine(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        install_kick_signal_handler()
        install_kick_signal_handler()
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, previous)


# -- CPU state ----------------------------------------------------------------


def _canonical(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 1 << 47, dtype=np.int64))


def test_cpu_state_round_trips(make_vm) -> None:
    accel, _ram, _io = make_vm("hlt")
    rng = np.random.default_rng(3)
    initial = boot.initial_cpu_state()
    segments = list(initial.segments)
    segments[3] = replace(segments[3], base=_canonical(rng))  # fs_base
    segments[4] = replace(segments[4], base=_canonical(rng))  # gs_base
    state = replace(
        initial,
        gprs=tuple(int(x) * 2 + 1 for x in rng.integers(0, 1 << 63, size=16, dtype=np.int64)),
        rip=0x123456,
        rflags=0x2 | 0x1 | 0x40 | 0x80 | 0x800,  # CF ZF SF OF
        segments=tuple(segments),
        gdt=DescriptorTable(base=0x7000, limit=0x3F),
        idt=DescriptorTable(base=0x8000, limit=0xFFF),
        cr2=0xDEAD000,
    )
    accel.set_cpu_state(state)
    assert accel.get_cpu_state() == state
    accel.set_cpu_state(initial)
    assert accel.get_cpu_state() == initial


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gprs": (0,) * 15}, "general registers"),
        ({"rip": -1}, "rip"),
        ({"cr3": 1 << 64}, "cr3"),
        ({"gdt": DescriptorTable(base=0, limit=0x10000)}, "gdt.limit"),
        # Long mode active without paging: KVM refuses, we say so.
        ({"cr0": boot.CR0_PE | boot.CR0_ET | boot.CR0_NE}, "rejected"),
    ],
)
def test_bad_cpu_state_is_refused(make_vm, change: dict[str, object], message: str) -> None:
    accel, _ram, _io = make_vm("hlt")
    before = accel.get_cpu_state()
    with pytest.raises(ValueError, match=message):
        accel.set_cpu_state(replace(boot.initial_cpu_state(), **change))  # type: ignore[arg-type]
    assert accel.get_cpu_state() == before




def test_state_taken_mid_run_continues_on_a_fresh_accelerator(make_vm) -> None:
    accel, ram, _io = make_vm(MIGRATION_GUEST)
    counts = []
    for _hop in range(3):
        thread, result = run_in_thread(accel)
        time.sleep(0.05)
        assert kick_and_join(accel, thread, result) is RunResult.KICKED
        state = accel.get_cpu_state()
        counts.append(state.gpr("r9"))
        r9 = state.gpr("r9")
        # Kicked anywhere in the loop body: rax is 0, 1 or 2 instructions into step r9 + 1.
        assert state.gpr("rax") in {lcg_after(r9), (LCG_A * lcg_after(r9)) & M64, lcg_after(r9 + 1)}
        copy = mmap.mmap(-1, RAM_SIZE)
        copy[:] = ram[:]
        accel, ram, _io = make_vm(ram=copy)
        accel.set_cpu_state(state)
        assert accel.get_cpu_state() == state
    struct.pack_into("<Q", ram, 0x1F8000, 1)
    assert accel.run() is RunResult.HALTED
    rax, rbx, r9, r11 = struct.unpack_from("<4Q", ram, 0x1F0000)
    assert counts == sorted(counts) and r9 >= counts[-1] > 0
    assert rax == lcg_after(r9)
    assert rbx == (r9 * (r9 + 1) // 2) & M64
    assert r11 == r9


# -- lifecycle ----------------------------------------------------------------


def test_ram_must_be_whole_pages() -> None:
    ram = mmap.mmap(-1, PAGE * 2 + 1)
    with pytest.raises(ValueError, match="multiple"):
        KvmAccelerator(ram, RecordingIo())
    ram.close()


def test_close_releases_ram_and_is_idempotent() -> None:
    ram = mmap.mmap(-1, RAM_SIZE)
    accel = KvmAccelerator(ram, RecordingIo())
    with pytest.raises(BufferError):
        ram.close()  # still registered with KVM
    accel.close()
    accel.close()
    accel.kick()  # harmless after close
    with pytest.raises(RuntimeError, match="closed"):
        accel.run()
    with pytest.raises(RuntimeError, match="closed"):
        accel.collect_dirty()
    ram.close()


def test_close_from_the_vcpu_thread_happens_when_run_returns() -> None:
    ram = mmap.mmap(-1, RAM_SIZE)
    boot.write_boot_environment(ram, RAM_SIZE)
    code = b"\x66\xba\xf8\x03\xee\xeb\xfe"  # mov $0x3f8, %dx; out %al, %dx; 1: jmp 1b
    ram[abi.FIRMWARE_ADDR : abi.FIRMWARE_ADDR + len(code)] = code
    io = RecordingIo()
    accel = KvmAccelerator(ram, io)
    accel.set_cpu_state(boot.initial_cpu_state())
    io.on_access = accel.close  # a device handler stopping the machine
    assert accel.run() is RunResult.KICKED
    with pytest.raises(RuntimeError, match="closed"):
        accel.run()
    ram.close()  # the RAM export went with the close
