"""The accelerator contract (`accel.Accelerator`), one suite run under kvm and tcg.

Each guest is a few instructions of GNU assembly, assembled with gcc and
loaded at the firmware address into RAM prepared by `boot.py`, so these tests
exercise the same long-mode entry the firmware gets. No timing is asserted:
joins only have generous timeouts, so a loaded machine cannot fail a test. The
kvm cases skip where /dev/kvm cannot be used; what only one accelerator does
(tcg's named guest exceptions, kvm's triple fault and kick signal) stays in
test_tcg.py and test_kvm.py.
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
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.accel import (
    DIRTY_GUEST,
    DIRTY_RAM,
    JOIN_TIMEOUT_S,
    LCG_A,
    M64,
    MIGRATION_GUEST,
    OWN_TABLES_GUEST,
    MakeVm,
    RecordingIo,
    assemble,
    assert_state_refused,
    check_migration_guest_finished,
    install_own_tables,
    kick_and_join,
    lcg_after,
    needs_assembler,
    run_in_thread,
    vm_maker,
    write_table,
)

from colo_agent.microvm import abi, boot
from colo_agent.microvm.accel import AcceleratorFactory, DescriptorTable, RunResult, Segment
from colo_agent.microvm.kvm import KvmAccelerator, install_kick_signal_handler, kvm_unavailable_reason
from colo_agent.microvm.tcg import TcgAccelerator

KVM_REASON = kvm_unavailable_reason()
pytestmark = needs_assembler

RAM_SIZE = abi.MIN_RAM
PAGE = abi.PAGE_SIZE


@pytest.fixture(
    params=[
        pytest.param(TcgAccelerator, id="tcg"),
        pytest.param(
            KvmAccelerator,
            id="kvm",
            marks=[pytest.mark.kvm, pytest.mark.skipif(KVM_REASON is not None, reason=f"kvm: {KVM_REASON}")],
        ),
    ]
)
def factory(request: pytest.FixtureRequest) -> AcceleratorFactory:
    if request.param is KvmAccelerator:
        install_kick_signal_handler()
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def make_vm(factory: AcceleratorFactory, tmp_path: Path) -> Iterator[MakeVm]:
    yield from vm_maker(factory, tmp_path)  # type: ignore[arg-type]


def page_array(ram: mmap.mmap) -> npt.NDArray[np.uint8]:
    return np.frombuffer(ram, dtype=np.uint8).reshape(-1, PAGE)


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
    mov $0x520, %dx
    mov $0x1234, %ax
    out %ax, %dx
    hlt
"""


def test_port_io_reaches_handler_and_in_lands_in_rax(make_vm: MakeVm) -> None:
    accel, _ram, io = make_vm(IO_GUEST)
    io.inputs = {0x510: [0x89ABCDEF], 0x514: [0x1234]}
    assert accel.run() is RunResult.HALTED
    assert io.outs == [(0x3F8, 1, 0x41), (0x500, 4, 0xDEADBEEF), (0x520, 2, 0x1234)]
    assert io.ins == [(0x510, 4), (0x514, 2)]
    state = accel.get_cpu_state()
    assert state.gpr("rbx") == 0x89ABCDEF
    assert state.gpr("rcx") == 0x1234


def test_in_value_is_truncated_to_access_width(make_vm: MakeVm) -> None:
    accel, _ram, io = make_vm("mov $0x510, %dx\n mov $-1, %rax\n in %dx, %al\n hlt")
    io.inputs = {0x510: [0x1FF]}
    assert accel.run() is RunResult.HALTED
    # An 8-bit IN replaces al only, as on hardware.
    assert accel.get_cpu_state().gpr("rax") == 0xFFFF_FFFF_FFFF_FFFF
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


def test_string_io_moves_every_item_in_order(make_vm: MakeVm) -> None:
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
    # rep insl stored into guest RAM: that page is the guest's write.
    np.testing.assert_array_equal(accel.collect_dirty(), [0x201])


def test_hlt_returns_halted_and_run_continues_after_it(make_vm: MakeVm) -> None:
    accel, _ram, io = make_vm("hlt\n mov $0x3f8, %dx\n mov $0x42, %al\n out %al, %dx\n hlt")
    assert accel.run() is RunResult.HALTED
    assert io.outs == []
    assert accel.run() is RunResult.HALTED
    assert io.outs == [(0x3F8, 1, 0x42)]
    assert accel.failure is None


def test_access_outside_ram_fails_with_address(make_vm: MakeVm) -> None:
    accel, _ram, _io = make_vm("movq $1, 0x20000000\n hlt")
    assert accel.run() is RunResult.FAILED
    assert accel.failure is not None
    assert "0x20000000" in accel.failure and "outside guest RAM" in accel.failure
    assert "write" in accel.failure


def test_handler_exception_propagates(make_vm: MakeVm) -> None:
    accel, _ram, _io = make_vm("mov $0x510, %dx\n in %dx, %eax\n hlt")  # no input queued -> KeyError
    with pytest.raises(KeyError):
        accel.run()
    # The accelerator stays usable.
    _accel_state = accel.get_cpu_state()


def test_first_write_to_every_page_lands_and_is_logged(make_vm: MakeVm) -> None:
    accel, ram, _io = make_vm(DIRTY_GUEST, ram_size=DIRTY_RAM)
    rng = np.random.default_rng(7)
    # Pages from 2 MiB up: above the code and the tables.
    pages = rng.choice(np.arange(0x200, DIRTY_RAM // PAGE - 1), size=3000, replace=False)
    addrs = pages * PAGE + rng.integers(0, PAGE // 8, size=pages.size) * 8
    write_table(ram, 0x180000, addrs)
    # Two qwords straddling page boundaries: 4 bytes land on each side.
    spare = np.setdiff1d(np.arange(0x200, DIRTY_RAM // PAGE - 1), pages)[:4:2]
    straddling = (spare + 1) * PAGE - 4
    write_table(ram, 0x1C0000, straddling)
    # Host writes (boot structures, tables) are the monitor's, never logged here.
    assert accel.collect_dirty().size == 0

    for round_ in (1, 2, 3):
        shadow = page_array(ram).copy()
        assert accel.run() is RunResult.HALTED
        dirty = accel.collect_dirty()
        assert dirty.dtype == np.int64
        # Every store landed, the first one to each page included...
        values = np.array([struct.unpack_from("<Q", ram, int(a))[0] for a in addrs], dtype=np.uint64)
        expected = (np.uint64(round_) << np.uint64(32)) | np.arange(addrs.size, dtype=np.uint64)
        np.testing.assert_array_equal(values, expected)
        for addr in straddling.tolist():
            assert struct.unpack_from("<Q", ram, addr)[0] == round_
        # ...and the log is exactly the pages written, both halves of the
        # straddling stores included.
        want = np.union1d(pages, np.concatenate([spare, spare + 1]))
        np.testing.assert_array_equal(dirty, want)
        changed = np.flatnonzero((page_array(ram) != shadow).any(axis=1))
        assert set(changed.tolist()) <= set(dirty.tolist())
        assert accel.collect_dirty().size == 0


# Executes a table of stores {u64 address, u64 value, u64 width} at 0x180000
# (count first), each with an instruction of that width, then halts; the next
# run starts over with whatever the table then holds.
STORE_TABLE_GUEST = """
0:  mov $0x180000, %rsi
    mov (%rsi), %rcx
    add $8, %rsi
1:  test %rcx, %rcx
    jz 9f
    mov (%rsi), %rdi
    mov 8(%rsi), %rax
    mov 16(%rsi), %rdx
    add $24, %rsi
    dec %rcx
    cmp $1, %rdx
    je 11f
    cmp $2, %rdx
    je 12f
    cmp $4, %rdx
    je 14f
    mov %rax, (%rdi)
    jmp 1b
11: mov %al, (%rdi)
    jmp 1b
12: mov %ax, (%rdi)
    jmp 1b
14: mov %eax, (%rdi)
    jmp 1b
9:  hlt
    jmp 0b
"""


STORE_AREA = (0x200000, 0x240000)  # 64 pages the stores may touch


@st.composite
def store_rounds(draw: st.DrawFn) -> list[list[tuple[int, int, int]]]:
    def store() -> st.SearchStrategy[tuple[int, int, int]]:
        return st.tuples(
            st.integers(STORE_AREA[0], STORE_AREA[1] - 8),
            st.integers(0, M64),
            st.sampled_from((1, 2, 4, 8)),
        )

    return draw(st.lists(st.lists(store(), max_size=40), min_size=1, max_size=3))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=store_rounds())
def test_dirty_log_is_exactly_the_pages_stored_to(
    make_vm: MakeVm, rounds: list[list[tuple[int, int, int]]]
) -> None:
    # Any mix of widths, unaligned and page-straddling stores, over several
    # collections: each round the log names exactly the pages a store
    # touched, and RAM holds exactly what the stores left there.
    accel, ram, _io = make_vm(STORE_TABLE_GUEST)
    model = bytearray(ram[STORE_AREA[0] : STORE_AREA[1]])
    for stores in rounds:
        struct.pack_into(f"<Q{3 * len(stores)}Q", ram, 0x180000, len(stores), *(x for s in stores for x in s))
        assert accel.run() is RunResult.HALTED
        touched: set[int] = set()
        for addr, value, width in stores:
            offset = addr - STORE_AREA[0]
            model[offset : offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            touched.update({addr // PAGE, (addr + width - 1) // PAGE})
        assert accel.collect_dirty().tolist() == sorted(touched)
        assert ram[STORE_AREA[0] : STORE_AREA[1]] == bytes(model)


def test_dirty_log_rearms_after_collection(make_vm: MakeVm) -> None:
    # The same page written in two rounds is reported in both.
    accel, _ram, _io = make_vm("movq $1, 0x300000\n hlt\n movq $2, 0x300008\n hlt")
    assert accel.run() is RunResult.HALTED
    np.testing.assert_array_equal(accel.collect_dirty(), [0x300])
    assert accel.run() is RunResult.HALTED
    np.testing.assert_array_equal(accel.collect_dirty(), [0x300])


STORE_KINDS_GUEST = """
    mov $0x210000, %rsp
    push %rax                       # stack: page 0x20f
    call 1f                         # return address: page 0x20f as well
1:  mov $0x220000, %rdi
    mov $0xab, %al
    mov $3 * 4096, %rcx
    cld
    rep stosb                       # pages 0x220-0x222
    mov $0x230000, %rdi
    mov $7, %rax
    lock xchg %rax, (%rdi)          # atomic: page 0x230
    mov $0x240000, %rdi
    xor %eax, %eax
    mov $9, %rcx
    lock cmpxchg %rcx, (%rdi)       # page 0x240
    mov $0x250000, %rdi
    movq $5, %rax
    lock xadd %rax, (%rdi)          # page 0x250
    mov $0x260ff8, %rsi
    mov $0x270000, %rdi
    mov $2, %rcx
    rep movsq                       # reads 0x260, writes page 0x270
    hlt
"""


def test_every_kind_of_store_is_logged(make_vm: MakeVm) -> None:
    accel, ram, _io = make_vm(STORE_KINDS_GUEST)
    struct.pack_into("<2Q", ram, 0x260FF8, 0x1111, 0x2222)
    assert accel.run() is RunResult.HALTED
    np.testing.assert_array_equal(
        accel.collect_dirty(), [0x20F, 0x220, 0x221, 0x222, 0x230, 0x240, 0x250, 0x270]
    )
    assert ram[0x220000:0x223000] == b"\xab" * 3 * PAGE
    assert struct.unpack_from("<Q", ram, 0x230000)[0] == 7
    assert struct.unpack_from("<Q", ram, 0x240000)[0] == 9
    assert struct.unpack_from("<Q", ram, 0x250000)[0] == 5
    assert struct.unpack_from("<2Q", ram, 0x270000) == (0x1111, 0x2222)


def test_collection_does_not_disturb_translated_code(make_vm: MakeVm) -> None:
    # Self-modifying code on a page the guest also dirties: the new
    # instruction must run, whatever the TLB flushes did to the cached code.
    source = """
        lea patch(%rip), %rdi
        movb $0x42, 1(%rdi)     # mov $0x41, %al -> mov $0x42, %al
    patch:
        mov $0x41, %al
        mov $0x3f8, %dx
        out %al, %dx
        hlt
    """
    accel, _ram, io = make_vm(source)
    assert accel.run() is RunResult.HALTED
    assert io.outs == [(0x3F8, 1, 0x42)]
    assert accel.collect_dirty().tolist() == [abi.FIRMWARE_ADDR // PAGE]


def test_walks_the_guests_page_tables_and_logs_physical_pages(make_vm: MakeVm) -> None:
    accel, ram, _io = make_vm(OWN_TABLES_GUEST)
    install_own_tables(ram)
    assert accel.run() is RunResult.HALTED
    assert struct.unpack_from("<Q", ram, 0x300000)[0] == 0x1234
    assert accel.get_cpu_state().gpr("rbx") == 0xFEED
    np.testing.assert_array_equal(accel.collect_dirty(), [0x300])
    # CR0.WP is clear at entry (as under kvm): ring 0 may write a read-only page.
    assert accel.run() is RunResult.HALTED
    assert struct.unpack_from("<Q", ram, 0x301000)[0] == 1
    # That read-only entry has no dirty bit yet: a hardware walk (kvm) sets it,
    # a write to the page-table page 0x311 that the log names too; tcg's
    # walker leaves accessed/dirty bits alone.
    dirty = set(accel.collect_dirty().tolist())
    assert 0x301 in dirty and dirty <= {0x301, 0x311}


# Stores an ever-growing counter at pseudo-random pages of 0x200000-0x3fffff
# (an LCG picks the page), and rings port 0x500 every 64 stores.
CHURN_GUEST = """
    mov $0x5851f42d4c957f2d, %r8
    mov $0x14057b7ef767814f, %r10
    xor %eax, %eax
    xor %r9, %r9
1:  imul %r8, %rax
    add %r10, %rax
    mov %rax, %rdi
    shr $40, %rdi
    and $0x1ff, %rdi
    add $0x200, %rdi
    shl $12, %rdi
    mov %rax, %rcx
    shr $20, %rcx
    and $0xff8, %rcx
    add %rcx, %rdi
    inc %r9
    mov %r9, (%rdi)
    test $63, %r9
    jnz 1b
    mov $0x500, %dx
    out %eax, %dx
    jmp 1b
"""


def test_collecting_while_running_never_misses_a_change(make_vm: MakeVm) -> None:
    # Pre-copy: copy the reported pages of a running guest into a shadow,
    # over and over; after a final pause and collection the shadow must
    # equal RAM, i.e. no change was ever lost between two collections.
    accel, ram, io = make_vm(CHURN_GUEST)
    # Some collections meet the vCPU held in a device handler.
    io.on_access = lambda: time.sleep(0.0002) if len(io.outs) % 16 == 0 else None
    shadow = page_array(ram).copy()
    live = page_array(ram)
    assert accel.collect_dirty().size == 0
    thread, result = run_in_thread(accel)
    try:
        rounds = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline or rounds < 30:
            pages = accel.collect_dirty()
            shadow[pages] = live[pages]
            rounds += 1
    finally:
        assert kick_and_join(accel, thread, result) is RunResult.KICKED
    pages = accel.collect_dirty()
    shadow[pages] = live[pages]
    np.testing.assert_array_equal(shadow, live)
    assert accel.get_cpu_state().gpr("r9") > 0
    assert io.outs, "the guest never reached its port access"


SPIN_GUEST = "1: jmp 1b"


@pytest.mark.parametrize(
    "source",
    [SPIN_GUEST, "1: inc %rax\n jmp 1b", "1: mov %rax, 0x300000\n inc %rax\n jmp 1b"],
    ids=["jmp-self", "inc", "store"],
)
def test_kick_stops_a_spinning_guest_every_time(make_vm: MakeVm, source: str) -> None:
    accel, _ram, _io = make_vm(source)
    for _round in range(20):
        thread, result = run_in_thread(accel)
        time.sleep(0.002)
        assert kick_and_join(accel, thread, result) is RunResult.KICKED


def test_kick_right_after_run_starts_is_not_lost(make_vm: MakeVm) -> None:
    # Kicks landing while run() enters emulation, where unicorn itself drops
    # a stop request (uc_emu_start clears it): without the re-kicker about
    # one kick in 150 of this loop was lost on the development machine.
    accel, _ram, _io = make_vm(SPIN_GUEST)
    for round_ in range(300):
        thread, result = run_in_thread(accel)
        time.sleep(0.0001 * (round_ % 7))
        assert kick_and_join(accel, thread, result) is RunResult.KICKED


def test_kick_before_run_is_not_lost(make_vm: MakeVm) -> None:
    accel, _ram, io = make_vm("mov $0x3f8, %dx\n out %al, %dx\n hlt")
    accel.kick()
    assert accel.run() is RunResult.KICKED
    assert io.outs == []
    assert accel.get_cpu_state().rip == abi.FIRMWARE_ADDR
    assert accel.run() is RunResult.HALTED


def test_kick_from_a_handler_completes_the_access_first(make_vm: MakeVm, tmp_path: Path) -> None:
    prologue = "mov $0x510, %dx\n in %dx, %eax\n"
    accel, _ram, io = make_vm(prologue + "1: jmp 1b")
    io.inputs = {0x510: [0xCAFE]}
    io.on_access = accel.kick
    assert accel.run() is RunResult.KICKED
    state = accel.get_cpu_state()
    assert state.gpr("rax") == 0xCAFE
    # rip is past the `in`, on the spin loop: the access is complete.
    assert state.rip == abi.FIRMWARE_ADDR + len(assemble(prologue, tmp_path))


def test_kick_from_another_thread_during_io_handler(make_vm: MakeVm) -> None:
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


def test_run_from_two_threads_is_refused(make_vm: MakeVm) -> None:
    accel, _ram, _io = make_vm(SPIN_GUEST)
    thread, result = run_in_thread(accel)
    time.sleep(0.01)
    with pytest.raises(RuntimeError, match="already executing"):
        accel.run()
    with pytest.raises(RuntimeError, match="only accessible"):
        accel.get_cpu_state()
    assert kick_and_join(accel, thread, result) is RunResult.KICKED


def _canonical(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 1 << 47, dtype=np.int64))


def test_initial_state_reads_back_exactly(make_vm: MakeVm) -> None:
    accel, _ram, _io = make_vm("hlt")
    assert accel.get_cpu_state() == boot.initial_cpu_state()


def test_cpu_state_round_trips(make_vm: MakeVm) -> None:
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
        rflags=0x2 | 0x1 | 0x40 | 0x80 | 0x400 | 0x800,  # CF ZF SF DF OF
        segments=tuple(segments),
        idt=DescriptorTable(base=0x8000, limit=0xFFF),
        cr2=0xDEAD000,
    )
    accel.set_cpu_state(state)
    assert accel.get_cpu_state() == state
    accel.set_cpu_state(initial)
    assert accel.get_cpu_state() == initial


def test_segments_reloaded_by_the_guest_read_back_from_the_gdt(make_vm: MakeVm) -> None:
    # The guest loads the null selector into ds and es.
    accel, _ram, _io = make_vm("xor %eax, %eax\n mov %eax, %ds\n mov %eax, %es\n hlt")
    initial = boot.initial_cpu_state()
    segments = list(initial.segments)
    segments[3] = replace(segments[3], base=0x77)
    accel.set_cpu_state(replace(initial, segments=tuple(segments)))
    assert accel.run() is RunResult.HALTED
    got = accel.get_cpu_state()
    assert got.segments[1] == Segment(selector=0, base=0, limit=0, attributes=1 << 16)
    assert got.segments[2] == Segment(selector=0, base=0, limit=0, attributes=1 << 16)
    assert got.segments[0] == boot.initial_cpu_state().segments[0]
    assert got.segments[3].base == 0x77


def test_state_taken_mid_run_continues_on_a_fresh_accelerator(make_vm: MakeVm) -> None:
    accel, ram, _io = make_vm(MIGRATION_GUEST)
    counts = []
    for _hop in range(3):
        thread, result = run_in_thread(accel)
        time.sleep(0.05)
        assert kick_and_join(accel, thread, result) is RunResult.KICKED
        state = accel.get_cpu_state()
        r9 = state.gpr("r9")
        counts.append(r9)
        # Kicked at a block boundary: rax is 0, 1 or 2 instructions into step r9 + 1.
        assert state.gpr("rax") in {lcg_after(r9), (LCG_A * lcg_after(r9)) & M64, lcg_after(r9 + 1)}
        copy = mmap.mmap(-1, RAM_SIZE)
        copy[:] = ram[:]
        accel, ram, _io = make_vm(ram=copy)
        accel.set_cpu_state(state)
        assert accel.get_cpu_state() == state
    struct.pack_into("<Q", ram, 0x1F8000, 1)
    assert accel.run() is RunResult.HALTED
    check_migration_guest_finished(ram, counts)


def test_restore_over_new_code_in_the_same_accelerator(make_vm: MakeVm, tmp_path: Path) -> None:
    # A restore copies RAM in under a live accelerator: code it translated
    # before must not run instead of the new contents.
    accel, ram, io = make_vm("mov $0x3f8, %dx\n mov $0x41, %al\n out %al, %dx\n hlt")
    assert accel.run() is RunResult.HALTED
    code = assemble("mov $0x3f8, %dx\n mov $0x5a, %al\n out %al, %dx\n hlt", tmp_path)
    ram[abi.FIRMWARE_ADDR : abi.FIRMWARE_ADDR + len(code)] = code
    accel.set_cpu_state(boot.initial_cpu_state())
    assert accel.run() is RunResult.HALTED
    assert [value for _port, _size, value in io.outs] == [0x41, 0x5A]


def test_ram_must_be_whole_pages(factory: AcceleratorFactory) -> None:
    ram = mmap.mmap(-1, PAGE * 2 + 1)
    with pytest.raises(ValueError, match="multiple"):
        factory(ram, RecordingIo())
    ram.close()


def test_close_releases_ram_and_is_idempotent(factory: AcceleratorFactory) -> None:
    ram = mmap.mmap(-1, RAM_SIZE)
    accel = factory(ram, RecordingIo())
    with pytest.raises(BufferError):
        ram.close()  # still mapped into the accelerator
    accel.close()
    accel.close()
    accel.kick()  # harmless after close
    with pytest.raises(RuntimeError, match="closed"):
        accel.run()
    with pytest.raises(RuntimeError, match="closed"):
        accel.collect_dirty()
    ram.close()


def test_close_from_the_vcpu_thread_happens_when_run_returns(
    factory: AcceleratorFactory, tmp_path: Path
) -> None:
    ram = mmap.mmap(-1, RAM_SIZE)
    boot.write_boot_environment(ram, RAM_SIZE)
    code = assemble("mov $0x3f8, %dx\n out %al, %dx\n 1: jmp 1b", tmp_path)
    ram[abi.FIRMWARE_ADDR : abi.FIRMWARE_ADDR + len(code)] = code
    io = RecordingIo()
    accel = factory(ram, io)
    accel.set_cpu_state(boot.initial_cpu_state())
    io.on_access = accel.close  # a device handler stopping the machine
    assert accel.run() is RunResult.KICKED
    with pytest.raises(RuntimeError, match="closed"):
        accel.run()
    ram.close()  # the RAM export went with the close


def test_close_while_running_elsewhere_is_refused(make_vm: MakeVm) -> None:
    accel, _ram, _io = make_vm(SPIN_GUEST)
    thread, result = run_in_thread(accel)
    time.sleep(0.01)
    with pytest.raises(RuntimeError, match="kick the vCPU"):
        accel.close()
    assert kick_and_join(accel, thread, result) is RunResult.KICKED


# Writes one qword to every address of the table at 0x180000 (count first),
# halts, then writes one more page.
STORE_LIST_GUEST = """
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


def test_dirty_log_reports_exactly_the_pages_written(make_vm: MakeVm) -> None:
    accel, ram, _io = make_vm(STORE_LIST_GUEST)
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


def test_a_kick_is_consumed_by_the_run_it_stops(make_vm: MakeVm) -> None:
    accel, _ram, _io = make_vm(SPIN_GUEST)
    thread, result = run_in_thread(accel)
    time.sleep(0.05)
    assert kick_and_join(accel, thread, result) is RunResult.KICKED
    # The kick is consumed: the next run spins again until kicked again.
    thread, result = run_in_thread(accel)
    time.sleep(0.05)
    assert thread.is_alive()
    assert kick_and_join(accel, thread, result) is RunResult.KICKED


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gprs": (0,) * 15}, "general registers"),
        ({"rip": -1}, "rip"),
        ({"cr3": 1 << 64}, "cr3"),
        ({"gdt": DescriptorTable(base=0, limit=0x10000)}, "gdt.limit"),
    ],
)
def test_bad_cpu_state_is_refused_and_changes_nothing(
    make_vm: MakeVm, change: dict[str, object], message: str
) -> None:
    assert_state_refused(make_vm, change, message)
