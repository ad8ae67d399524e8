"""tcg and kvm side by side: CPU state and RAM move between them, and they log the same pages.

Runs only where /dev/kvm opens; the guests and helpers are those of `support.accel`.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support.accel import (
    DIRTY_GUEST,
    DIRTY_RAM,
    JOIN_TIMEOUT_S,
    MIGRATION_GUEST,
    RecordingIo,
    assemble,
    check_migration_guest_finished,
    needs_assembler,
    write_table,
)

from colo_agent.microvm import abi, boot
from colo_agent.microvm.accel import Accelerator, AcceleratorFactory, RunResult
from colo_agent.microvm.kvm import KvmAccelerator, install_kick_signal_handler, kvm_unavailable_reason
from colo_agent.microvm.tcg import TcgAccelerator

KVM_REASON = kvm_unavailable_reason()
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(KVM_REASON is not None, reason=f"kvm: {KVM_REASON}"),
    needs_assembler,
]

RAM_SIZE = abi.MIN_RAM
PAGE = abi.PAGE_SIZE

ACCELERATORS: dict[str, AcceleratorFactory] = {"tcg": TcgAccelerator, "kvm": KvmAccelerator}


@pytest.fixture(autouse=True, scope="module")
def _kick_handler() -> None:
    install_kick_signal_handler()


def _ram_with(source: str, tmp_path: Path, size: int = RAM_SIZE) -> mmap.mmap:
    ram = mmap.mmap(-1, size)
    boot.write_boot_environment(ram, size)
    code = assemble(source, tmp_path)
    ram[abi.FIRMWARE_ADDR : abi.FIRMWARE_ADDR + len(code)] = code
    return ram


def _run_a_while(vcpu: Accelerator) -> None:
    result: list[RunResult] = []
    thread = threading.Thread(target=lambda: result.append(vcpu.run()), daemon=True)
    thread.start()
    time.sleep(0.05)
    vcpu.kick()
    thread.join(JOIN_TIMEOUT_S)
    assert not thread.is_alive(), "run() did not return after kick()"
    assert result == [RunResult.KICKED]


@pytest.mark.parametrize("order", [("tcg", "kvm", "tcg", "kvm"), ("kvm", "tcg", "kvm", "tcg")], ids="->".join)
def test_guest_moves_between_accelerators_and_carries_on(order: tuple[str, ...], tmp_path: Path) -> None:
    ram = _ram_with(MIGRATION_GUEST, tmp_path)
    state = boot.initial_cpu_state()
    counts = []
    vcpu: Accelerator | None = None
    try:
        for step, name in enumerate(order):
            copy = mmap.mmap(-1, RAM_SIZE)
            copy[:] = ram[:]
            ram.close()
            ram = copy
            vcpu = ACCELERATORS[name](ram, RecordingIo())
            vcpu.set_cpu_state(state)
            # What one accelerator reports, the other takes and reports back unchanged.
            assert vcpu.get_cpu_state() == state
            _run_a_while(vcpu)
            state = vcpu.get_cpu_state()
            counts.append(state.gpr("r9"))
            if step < len(order) - 1:
                vcpu.close()
                vcpu = None
        assert vcpu is not None
        struct.pack_into("<Q", ram, 0x1F8000, 1)
        assert vcpu.run() is RunResult.HALTED
        check_migration_guest_finished(ram, counts)
    finally:
        if vcpu is not None:
            vcpu.close()
        ram.close()


def test_both_accelerators_log_the_same_pages(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    pages = rng.choice(np.arange(0x200, DIRTY_RAM // PAGE - 1), size=500, replace=False)
    addrs = pages * PAGE + rng.integers(0, PAGE // 8, size=pages.size) * 8
    logs = {}
    images = {}
    for name, factory in ACCELERATORS.items():
        ram = _ram_with(DIRTY_GUEST, tmp_path, DIRTY_RAM)
        write_table(ram, 0x180000, addrs)
        write_table(ram, 0x1C0000, np.array([0x400FFC], dtype=np.int64))
        vcpu = factory(ram, RecordingIo())
        try:
            vcpu.set_cpu_state(boot.initial_cpu_state())
            assert vcpu.collect_dirty().size == 0
            rounds = []
            for _round in range(2):
                assert vcpu.run() is RunResult.HALTED
                rounds.append(vcpu.collect_dirty().tolist())
            logs[name] = rounds
            images[name] = bytes(ram)
        finally:
            vcpu.close()
            ram.close()
    assert logs["tcg"] == logs["kvm"]
    assert images["tcg"] == images["kvm"]
    assert logs["tcg"][0] == sorted({*pages.tolist(), 0x400, 0x401})
