"""What only the kvm accelerator does: triple faults, KVM's own CPU-state checks, the kick signal.

The accelerator contract both accelerators keep is test_accel_contract.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from support.accel import (
    MakeVm,
    assert_state_refused,
    needs_assembler,
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



@pytest.fixture(autouse=True, scope="module")
def _kick_handler() -> None:
    install_kick_signal_handler()


@pytest.fixture
def make_vm(tmp_path: Path) -> Iterator[MakeVm[KvmAccelerator]]:
    yield from vm_maker(KvmAccelerator, tmp_path)


# -- hlt and failures ---------------------------------------------------------


def test_triple_fault_fails(make_vm) -> None:
    # No IDT (limit 0): #UD cannot be delivered, escalates to a triple fault.
    accel, _ram, _io = make_vm("ud2")
    assert accel.run() is RunResult.FAILED
    assert accel.failure is not None and "triple fault" in accel.failure
    assert f"rip={abi.FIRMWARE_ADDR:#x}" in accel.failure


# -- kick ---------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Long mode active without paging: KVM refuses, we say so.
        ({"cr0": boot.CR0_PE | boot.CR0_ET | boot.CR0_NE}, "rejected"),
    ],
)
def test_bad_cpu_state_is_refused(make_vm, change: dict[str, object], message: str) -> None:
    assert_state_refused(make_vm, change, message)


def test_cpu_state_with_the_gdt_elsewhere_round_trips(make_vm) -> None:
    # KVM takes segment registers as given; tcg checks them against the GDT, so
    # moving the GDT to empty memory is a kvm-only round trip.
    accel, _ram, _io = make_vm("hlt")
    state = replace(boot.initial_cpu_state(), gdt=DescriptorTable(base=0x7000, limit=0x3F))
    accel.set_cpu_state(state)
    assert accel.get_cpu_state() == state
