"""The built firmware booted by the real monitor, on every available accelerator.

No sockets: input goes straight to the machine's NIC. What is checked here
is the firmware's side of the guest ABI: it boots and says so, serves through
the rings, refuses bad boot information with a panic instead of running on,
keeps its hands off RAM while idle, and dirties pages at the rate asked.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator

import pytest

from colo_agent.microvm import abi
from colo_agent.microvm.firmware_build import Firmware, build_firmware
from colo_agent.microvm.kvm import kvm_unavailable_reason
from colo_agent.microvm.machine import Machine

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the firmware")


def _accelerators() -> list[object]:
    """tcg where its module is in the tree, kvm where /dev/kvm opens."""
    try:
        import colo_agent.microvm.tcg  # noqa: F401

        tcg_missing = None
    except ImportError as exc:
        tcg_missing = f"no tcg accelerator: {exc}"
    kvm_marks = [pytest.mark.kvm]
    if kvm_unavailable_reason() is not None:
        kvm_marks.append(pytest.mark.skip(reason="/dev/kvm does not open"))
    return [
        pytest.param("tcg", marks=[pytest.mark.skip(reason=tcg_missing)] if tcg_missing else []),
        pytest.param("kvm", marks=kvm_marks),
    ]


ACCELERATORS = _accelerators()


class Client:
    """Collects what the guest sends, per connection."""

    def __init__(self) -> None:
        self.data: dict[int, bytearray] = {}
        self.closed: set[int] = set()
        self.changed = threading.Condition()

    def __call__(self, conn: int, data: bytes, closed: bool) -> None:
        with self.changed:
            self.data.setdefault(conn, bytearray()).extend(data)
            if closed:
                self.closed.add(conn)
            self.changed.notify_all()

    def wait_for(self, conn: int, expected: bytes, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.data.get(conn, b"")) < len(expected) and conn not in self.closed:
                left = deadline - time.monotonic()
                assert left > 0, f"no reply on conn {conn}: have {bytes(self.data.get(conn, b''))!r}"
                self.changed.wait(left)
            return bytes(self.data.get(conn, b""))


@pytest.fixture
def booted(request: pytest.FixtureRequest) -> Iterator[tuple[Machine, Client]]:
    accel, dirty_rate = request.param
    client = Client()
    machine = Machine.create("16Mi", accel=accel, dirty_rate=dirty_rate)
    try:
        machine.set_output_callback(client)
        machine.start()
        conn = machine.open_connection()
        machine.send_input(conn, b"PING\r\n")
        assert client.wait_for(conn, b"+PONG\r\n") == b"+PONG\r\n"
        yield machine, client
    finally:
        machine.stop()


def _booted(dirty_rate: int) -> list[object]:
    return [pytest.param((p.values[0], dirty_rate), id=p.values[0], marks=p.marks) for p in ACCELERATORS]


@pytest.mark.parametrize("booted", _booted(0), indirect=True)
def test_boots_logs_and_serves_pipelined_connections(
    booted: tuple[Machine, Client], caplog: pytest.LogCaptureFixture
) -> None:
    machine, client = booted
    conns = [machine.open_connection() for _ in range(3)]
    for i, c in enumerate(conns):
        machine.send_input(
            c, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n%d\r\n*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n" % i
        )
    for c in conns:
        reply = client.wait_for(c, b"+OK\r\n:1\r\n")
        assert reply.startswith(b"+OK\r\n:") and reply.endswith(b"\r\n")
    machine.send_input(conns[0], b"GET n\r\nDBSIZE\r\n")
    assert client.wait_for(conns[0], b"+OK\r\n:1\r\n$1\r\n3\r\n:2\r\n").endswith(b"$1\r\n3\r\n:2\r\n")
    machine.send_input(conns[1], b"\x00garbage\r\n")
    reply = client.wait_for(conns[1], b"+OK\r\n:2\r\n-ERR Protocol error")
    assert b"-ERR Protocol error" in reply
    with client.changed:
        assert client.changed.wait_for(lambda: conns[1] in client.closed, timeout=30)


@pytest.mark.parametrize("booted", _booted(0), indirect=True)
def test_an_idle_guest_dirties_no_page_and_a_request_only_a_few(booted: tuple[Machine, Client]) -> None:
    machine, client = booted
    m = machine
    m.pause()
    m.collect_dirty()
    m.resume()
    time.sleep(0.3)
    m.pause()
    idle = m.collect_dirty()
    m.resume()
    assert len(idle) == 0, f"an idle guest wrote pages {idle.tolist()}"
    conn = m.open_connection()
    m.send_input(conn, b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n")
    client.wait_for(conn, b"+OK\r\n")
    m.pause()
    busy = m.collect_dirty()
    m.resume()
    # Ring headers and data, the stack, the entry, the table, bookkeeping.
    assert 0 < len(busy) <= 24, busy.tolist()
    ring_pages = {abi.RX_RING_ADDR // abi.PAGE_SIZE, abi.TX_RING_ADDR // abi.PAGE_SIZE}
    assert ring_pages <= set(busy.tolist())


@pytest.mark.parametrize("booted", _booted(5000), indirect=True)
def test_dirty_rate_touches_fresh_scratch_pages_while_idle(booted: tuple[Machine, Client]) -> None:
    m, _ = booted
    m.pause()
    m.collect_dirty()
    m.resume()
    time.sleep(0.5)
    m.pause()
    dirty = m.collect_dirty()
    m.resume()
    # The rate itself is timing and belongs to benchmarks; here: the pages
    # written are heap pages and far more than an idle guest's none.
    assert len(dirty) > 100
    assert (dirty * abi.PAGE_SIZE >= abi.FIRMWARE_ADDR).sum() > 100


@pytest.mark.parametrize("accel", ACCELERATORS)
def test_boot_info_that_overlaps_the_image_makes_the_guest_panic(
    accel: str, caplog: pytest.LogCaptureFixture
) -> None:
    real = build_firmware()
    # Claim the image ends one page after it starts: heap_start would then
    # lie inside the firmware's own code and bss.
    liar = Firmware(path=real.path, image=real.image, end=abi.FIRMWARE_ADDR + abi.PAGE_SIZE)
    machine = Machine.create("16Mi", accel=accel, firmware=liar)
    try:
        with caplog.at_level(logging.INFO):
            machine.start()
            assert machine.wait_stopped(timeout=60)
        assert machine.exit_reason == "guest panic 0x1"
    finally:
        machine.stop()
