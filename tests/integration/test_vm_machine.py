"""The micro-VM monitor with real accelerators and the real firmware: dirty log,
save/restore within and across accelerators, pause under load, RAM lifecycle."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support.vm import ACCELS, KVM_REASON, VmServer, changed_pages, serve

from colo_agent.microvm.machine import Machine, MachineError
from colo_agent.microvm.state import DeviceStateError


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("dirty_rate", [0, 2_000], ids=["clients", "clients+busy-guest"])
def test_dirty_log_never_misses_a_changed_page(accel: str, dirty_rate: int) -> None:
    with serve(accel, dirty_rate=dirty_rate) as vm:
        client = vm.client()
        assert client.ping()
        machine = vm.machine
        machine.pause()
        machine.collect_dirty()
        shadow = machine.ram_array.copy()
        machine.resume()
        rng = np.random.default_rng(7)
        for round_ in range(6):
            for i in range(40):
                size = int(rng.integers(1, 20000))
                client.set(f"key:{round_}:{i}", rng.integers(0, 256, size, dtype=np.uint8).tobytes())
            client.incr("counter")
            machine.pause()
            dirty = machine.collect_dirty()
            current = machine.ram_array.copy()
            machine.resume()
            changed = changed_pages(shadow, current)
            missed = np.setdiff1d(changed, dirty)
            assert missed.size == 0, f"round {round_}: pages {missed[:20].tolist()} changed, not logged"
            assert np.all(np.diff(dirty) > 0), "collect_dirty must be sorted and unique"
            assert dirty.dtype == np.int64
            # A busy guest's scratch pages add up; clients alone touch few pages.
            limit = machine.page_count if dirty_rate else machine.page_count // 4
            assert 0 < dirty.size < limit, "the dirty log must not be 'everything'"
            shadow = current
        if dirty_rate:
            return
        # Nothing happens: (almost) nothing is dirty. A WAIT timeout may run
        # a little firmware housekeeping, but the log must stay small.
        time.sleep(0.2)
        machine.pause()
        machine.collect_dirty()
        machine.resume()
        time.sleep(0.2)
        machine.pause()
        idle = machine.collect_dirty()
        machine.resume()
        assert idle.size < 32


def _pairs() -> list[object]:
    pairs = [("tcg", "tcg"), ("kvm", "kvm"), ("kvm", "tcg"), ("tcg", "kvm")]
    out = []
    for src, dst in pairs:
        marks = []
        if "kvm" in (src, dst):
            marks = [pytest.mark.kvm, pytest.mark.skipif(KVM_REASON is not None, reason=str(KVM_REASON))]
        out.append(pytest.param(src, dst, id=f"{src}-to-{dst}", marks=marks))
    return out


@pytest.mark.parametrize(("src", "dst"), _pairs())
def test_save_restore_preserves_every_key(src: str, dst: str) -> None:
    keys = {f"k{i}".encode(): os.urandom(1 + i % 3000) for i in range(300)}
    with serve(src) as first:
        client = first.client()
        client.mset(keys)
        client.set("counter", 41)
        lingering = first.client()
        lingering.ping()  # a connection that is open in the saved state
        time_before = int(client.time()[0])
        first.machine.pause()
        saved = first.machine.save_device_state()
        image = first.machine.ram_array.copy()
    second = Machine.create("64Mi", accel=dst)
    second.ram_array[:] = image
    second.load_device_state(saved)
    vm = VmServer(second)
    try:
        client = vm.client()
        # Both connections open at the save were closed in the guest on
        # load; only this new one is left.
        assert client.info("clients")["connected_clients"] == 1
        got = client.mget(list(keys))
        assert got == list(keys.values())
        assert client.incr("counter") == 42
        dbsize = client.dbsize()
        assert dbsize == len(keys) + 1
        # The guest clock continues from the saved value: no jump back.
        assert int(client.time()[0]) >= time_before
        assert vm.machine.devices.counters["tx_errors"] == 0
        assert vm.client().ping()
    finally:
        vm.close()


@pytest.mark.parametrize("accel", ACCELS)
def test_pause_returns_while_the_guest_is_busy(accel: str) -> None:
    with serve(accel, dirty_rate=200_000) as vm:
        client = vm.client()
        assert client.ping()
        for _ in range(30):
            vm.machine.pause()
            vm.machine.collect_dirty()
            vm.machine.resume()
        assert client.ping()


@pytest.mark.parametrize("accel", ACCELS)
def test_paused_means_ram_stands_still(accel: str) -> None:
    with serve(accel, dirty_rate=1000) as vm:
        client = vm.client()
        client.set("a", "1")
        vm.machine.pause()
        before = vm.machine.ram_array.copy()
        # Input that arrives while paused waits on the host, not in guest RAM.
        with socket.create_connection(("127.0.0.1", vm.port), timeout=0.3) as sock:
            sock.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
            with pytest.raises(TimeoutError):
                sock.recv(100)
            after = vm.machine.ram_array.copy()
            assert changed_pages(before, after).size == 0
            vm.machine.resume()
            sock.settimeout(60)
            assert sock.recv(100) == b"$1\r\n1\r\n"


@pytest.mark.parametrize("accel", ACCELS)
def test_ram_file_lifecycle(accel: str, tmp_path: Path) -> None:
    path = tmp_path / "guest.ram"
    machine = Machine.create("8Mi", accel=accel, ram_path=path)
    assert path.stat().st_size == 8 << 20
    with pytest.raises(MachineError, match="already exists"):
        Machine.create("8Mi", accel=accel, ram_path=path)
    machine.start()
    machine.pause()
    machine.resume()
    machine.stop()
    machine.stop()  # idempotent
    assert not path.exists()


def test_default_ram_file_leaves_nothing_behind_even_if_the_process_is_killed() -> None:
    """The file is unlinked as soon as it is mapped: a SIGKILLed agent leaves no RAM in /dev/shm."""
    machine = Machine.create("4Mi", accel="tcg")
    path = machine.ram_path
    assert not path.exists()
    machine.start()
    machine.pause()
    machine.ram[0x200000] = 0x5A  # the mapping is still backed
    assert machine.ram[0x200000] == 0x5A
    machine.stop()


def test_colo_ram_dir_moves_the_ram_file_off_dev_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's /dev/shm holds 64 MiB; agent pods point COLO_RAM_DIR at a sized emptyDir."""
    monkeypatch.setenv("COLO_RAM_DIR", str(tmp_path))
    with Machine.create("4Mi", accel="tcg") as machine:
        assert machine.ram_path.parent == tmp_path
    monkeypatch.setenv("COLO_RAM_DIR", str(tmp_path / "missing"))
    with pytest.raises(MachineError, match=r"cannot create a RAM file in .*missing"):
        Machine.create("4Mi", accel="tcg")


def test_loading_a_bad_state_is_refused_clearly() -> None:
    with Machine.create("4Mi", accel="tcg") as machine:
        with pytest.raises(DeviceStateError, match="magic"):
            machine.load_device_state(b"x" * 100)
        machine.start()
        with pytest.raises(MachineError, match="paused"):
            machine.save_device_state()
        with pytest.raises(MachineError, match="already"):
            machine.start()


@dataclass(frozen=True)
class TinyImage:
    """A few hand-assembled instructions instead of the firmware."""

    image: bytes
    heap_start: int = 0x101000


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize(
    ("code", "reason"),
    [
        # mov eax, 0xbad; mov dx, PANIC; out dx, eax; hlt
        pytest.param("b8ad0b0000" "66ba3005" "ef" "f4", "guest panic 0xbad", id="panic"),
        pytest.param("f4", "halted", id="hlt"),
        # mov byte [0x10000000], 1: mapped by the page tables, beyond RAM
        pytest.param("c6042500000010" "01" "f4", "crashed", id="write-beyond-ram"),
    ],
)
def test_a_guest_that_dies_stops_the_machine(accel: str, code: str, reason: str) -> None:
    with Machine.create("8Mi", accel=accel, firmware=TinyImage(bytes.fromhex(code))) as machine:
        machine.start()
        assert machine.wait_stopped(60)
        assert machine.exit_reason is not None and reason in machine.exit_reason
        machine.pause()  # returns at once: nothing runs any more
