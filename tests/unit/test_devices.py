"""The device model, driven by a guest written in Python that speaks the ring ABI."""

from __future__ import annotations

import logging
import mmap
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.ring_guest import CAP, HDR, RingGuest

from colo_agent.microvm import abi
from colo_agent.microvm.devices import INPUT_HIGH_WATER, INPUT_LOW_WATER, DeviceModel, NicHostState

RAM_SIZE = abi.MIN_RAM
@pytest.fixture
def ram() -> memoryview:
    return memoryview(mmap.mmap(-1, RAM_SIZE))


@pytest.fixture
def panics() -> list[int]:
    return []


@pytest.fixture
def dev(ram: memoryview, panics: list[int]) -> DeviceModel:
    return DeviceModel(ram, on_panic=panics.append)


def _outputs(dev: DeviceModel) -> list[tuple[int, bytes, bool]]:
    out: list[tuple[int, bytes, bool]] = []
    dev.set_output_callback(lambda c, d, closed: out.append((c, d, closed)))
    return out


def test_open_data_close_reach_the_guest_in_order(dev: DeviceModel, ram: memoryview) -> None:
    guest = RingGuest(ram)
    conn = dev.open_connection()
    dev.send_input(conn, b"PING\r\n")
    dev.close_connection(conn)
    assert guest.receive() == [], "nothing enters RAM before a WAIT or doorbell exit"
    dev.io_out(abi.Port.WAIT, 4, 0)
    assert guest.receive() == [
        (conn, abi.FrameType.OPEN, b""),
        (conn, abi.FrameType.DATA, b"PING\r\n"),
        (conn, abi.FrameType.CLOSE, b""),
    ]
    assert conn != 0


def test_large_input_is_split_into_frames_of_at_most_4096_bytes(dev: DeviceModel, ram: memoryview) -> None:
    guest = RingGuest(ram)
    conn = dev.open_connection()
    blob = bytes(range(256)) * 40  # 10240 bytes
    dev.send_input(conn, blob)
    dev.flush_rx()
    frames = guest.receive()
    sizes = [len(p) for _, k, p in frames if k == abi.FrameType.DATA]
    assert sizes == [4096, 4096, 2048]
    assert b"".join(p for _, k, p in frames if k == abi.FrameType.DATA) == blob


def test_full_ring_holds_input_on_the_host_and_pads_at_the_end(dev: DeviceModel, ram: memoryview) -> None:
    guest = RingGuest(ram)
    conn = dev.open_connection()
    blob = np.random.default_rng(1).integers(0, 256, 3 * CAP + 1234, dtype=np.uint8).tobytes()
    dev.send_input(conn, blob)
    received = bytearray()
    pads_seen = False
    for _ in range(20):
        dev.flush_rx()
        used = dev.rx_used()
        assert used <= CAP
        head = struct.unpack_from("<I", ram, abi.RX_RING_ADDR)[0]
        tail = struct.unpack_from("<I", ram, abi.RX_RING_ADDR + 64)[0]
        pads_seen |= (head // CAP) != (tail // CAP)
        received += b"".join(p for _, k, p in guest.receive() if k == abi.FrameType.DATA)
        if len(received) == len(blob):
            break
    assert bytes(received) == blob
    assert pads_seen
    assert dev.input_backlog(conn) == 0


def test_round_robin_lets_a_small_request_past_a_big_upload(dev: DeviceModel, ram: memoryview) -> None:
    guest = RingGuest(ram)
    big, small = dev.open_connection(), dev.open_connection()
    dev.send_input(big, b"x" * (4 * CAP))
    dev.send_input(small, b"PING\r\n")
    dev.flush_rx()
    assert (small, abi.FrameType.DATA, b"PING\r\n") in guest.receive()


def test_backpressure_callback_fires_once_backlog_drains(dev: DeviceModel, ram: memoryview) -> None:
    guest = RingGuest(ram)
    drained: list[int] = []
    dev.set_input_drained_callback(drained.append)
    conn = dev.open_connection()
    dev.send_input(conn, b"y" * (INPUT_HIGH_WATER + 1))
    assert dev.input_backlog(conn) > INPUT_HIGH_WATER
    while dev.input_backlog(conn) > INPUT_LOW_WATER:
        assert drained == []
        dev.flush_rx()
        guest.receive()
    assert drained == [conn]


def test_tx_frames_reach_the_output_callback_and_coalesce(dev: DeviceModel, ram: memoryview) -> None:
    guest = RingGuest(ram)
    out = _outputs(dev)
    a, b = dev.open_connection(), dev.open_connection()
    guest.send(a, abi.FrameType.DATA, b"+OK\r\n")
    guest.send(a, abi.FrameType.DATA, b"+PONG\r\n")
    guest.send(b, abi.FrameType.DATA, b":1\r\n")
    guest.send(b, abi.FrameType.CLOSE)
    guest.send(b, abi.FrameType.DATA, b"dropped: b has no client any more")
    dev.io_out(abi.Port.TX_DOORBELL, 4, 0)
    assert out == [(a, b"+OK\r\n+PONG\r\n", False), (b, b":1\r\n", False), (b, b"", True)]
    assert dev.open_connections == {a}
    tail = struct.unpack_from("<I", ram, abi.TX_RING_ADDR + abi.RING_TAIL_OFFSET)[0]
    head = struct.unpack_from("<I", ram, abi.TX_RING_ADDR + abi.RING_HEAD_OFFSET)[0]
    assert tail == head


def test_tx_wraps_with_pad(dev: DeviceModel, ram: memoryview) -> None:
    guest = RingGuest(ram)
    out = _outputs(dev)
    conn = dev.open_connection()
    chunk = b"z" * 4000
    total = 0
    for _ in range(100):
        guest.send(conn, abi.FrameType.DATA, chunk)
        dev.drain_tx()
        total += len(chunk)
    assert b"".join(d for _, d, _ in out) == chunk * 100
    assert total > CAP


def test_malformed_tx_ring_is_discarded_not_fatal(
    dev: DeviceModel, ram: memoryview, caplog: pytest.LogCaptureFixture
) -> None:
    guest = RingGuest(ram)
    out = _outputs(dev)
    conn = dev.open_connection()
    base = abi.TX_RING_ADDR + abi.RING_DATA_OFFSET
    HDR.pack_into(ram, base, conn, abi.FrameType.DATA, 60000)  # longer than a frame may be
    struct.pack_into("<I", ram, abi.TX_RING_ADDR, 64)
    with caplog.at_level(logging.ERROR):
        dev.drain_tx()
    assert "malformed TX ring" in caplog.text
    assert out == []
    guest.send(conn, abi.FrameType.DATA, b"+OK\r\n")
    dev.drain_tx()
    assert out == [(conn, b"+OK\r\n", False)]


def test_corrupt_rx_tail_stops_rx_instead_of_overwriting(dev: DeviceModel, ram: memoryview) -> None:
    conn = dev.open_connection()
    struct.pack_into("<I", ram, abi.RX_RING_ADDR + abi.RING_TAIL_OFFSET, 12345)
    dev.flush_rx()
    assert dev.input_backlog(conn) == 0
    assert struct.unpack_from("<I", ram, abi.RX_RING_ADDR)[0] == 0


def test_input_for_closed_connection_is_dropped(dev: DeviceModel, ram: memoryview) -> None:
    conn = dev.open_connection()
    dev.close_connection(conn)
    dev.send_input(conn, b"late")
    dev.send_input(999, b"unknown")
    dev.close_connection(conn)
    dev.flush_rx()
    kinds = [k for _, k, _ in RingGuest(ram).receive()]
    assert kinds == [abi.FrameType.OPEN, abi.FrameType.CLOSE]


def test_connection_ids_are_unique_and_never_zero(dev: DeviceModel) -> None:
    ids = {dev.open_connection() for _ in range(1000)}
    assert len(ids) == 1000 and 0 not in ids


def test_wait_returns_when_input_arrives(dev: DeviceModel, ram: memoryview) -> None:
    conn = dev.open_connection()
    dev.flush_rx()
    RingGuest(ram).receive()
    timer = threading.Timer(0.05, dev.send_input, (conn, b"PING\r\n"))
    timer.start()
    dev.io_out(abi.Port.WAIT, 4, abi.WAIT_FOREVER)
    timer.join()
    assert dev.rx_used() > 0


def test_wait_times_out(dev: DeviceModel) -> None:
    start = time.monotonic()
    dev.io_out(abi.Port.WAIT, 4, 20_000)
    assert time.monotonic() - start >= 0.019


def test_interrupt_ends_a_wait_and_later_waits_return_at_once(dev: DeviceModel) -> None:
    timer = threading.Timer(0.05, dev.interrupt_waits)
    timer.start()
    dev.io_out(abi.Port.WAIT, 4, abi.WAIT_FOREVER)
    timer.join()
    dev.io_out(abi.Port.WAIT, 4, abi.WAIT_FOREVER)  # would hang if not interrupted
    dev.allow_waits()
    start = time.monotonic()
    dev.io_out(abi.Port.WAIT, 4, 10_000)
    assert time.monotonic() - start >= 0.009


def test_clock_latches_and_is_monotonic(dev: DeviceModel) -> None:
    values = []
    for _ in range(100):
        lo = dev.io_in(abi.Port.CLOCK_LO, 4)
        hi = dev.io_in(abi.Port.CLOCK_HI, 4)
        values.append(hi << 32 | lo)
    assert values == sorted(values)
    assert abs(values[-1] - time.time_ns()) < 60 * 10**9


def test_clock_restore_continues_from_saved_value(dev: DeviceModel) -> None:
    nic = dev.host_state()
    dev.restore(nic, clock_ns=5 * 10**9, clock_latch=0, console=b"", keep_connections=False)
    now = dev.clock.read()
    assert 5 * 10**9 <= now < 5 * 10**9 + 10 * 10**9


def test_console_lines_go_to_the_guest_logger(dev: DeviceModel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="colo_agent.guest"):
        for byte in b"hello guest\r\nsecond":
            dev.io_out(abi.Port.CONSOLE, 1, byte)
    assert [r.getMessage() for r in caplog.records if r.name == "colo_agent.guest"] == ["hello guest"]
    assert dev.console_pending == b"second"


def test_panic_is_reported(dev: DeviceModel, panics: list[int]) -> None:
    dev.io_out(abi.Port.PANIC, 4, 0xDEAD)
    assert panics == [0xDEAD]


def test_unknown_ports_are_harmless(dev: DeviceModel) -> None:
    dev.io_out(0x80, 1, 0x12)
    assert dev.io_in(0x60, 1) == 0xFF
    assert dev.io_in(0x60, 4) == 0xFFFFFFFF


def test_device_writes_are_in_the_dirty_log(dev: DeviceModel, ram: memoryview) -> None:
    guest = RingGuest(ram)
    assert dev.collect_dirty().size == 0
    conn = dev.open_connection()
    dev.send_input(conn, b"a" * 5000)
    dev.flush_rx()
    rx_page = abi.RX_RING_ADDR // abi.PAGE_SIZE
    data_page = (abi.RX_RING_ADDR + abi.RING_DATA_OFFSET) // abi.PAGE_SIZE
    assert dev.collect_dirty().tolist() == [rx_page, data_page, data_page + 1]
    assert dev.collect_dirty().size == 0
    guest.receive()
    guest.send(conn, abi.FrameType.DATA, b"ok")
    dev.drain_tx()
    assert dev.collect_dirty().tolist() == [abi.TX_RING_ADDR // abi.PAGE_SIZE]


def test_restore_closes_saved_connections_unless_kept(ram: memoryview) -> None:
    first = DeviceModel(ram, on_panic=lambda code: None)
    a, b = first.open_connection(), first.open_connection()
    first.flush_rx()
    RingGuest(ram).receive()
    saved = first.host_state()
    assert saved.open_connections == (a, b)

    second = DeviceModel(ram, on_panic=lambda code: None)
    second.restore(saved, clock_ns=1, clock_latch=0, console=b"", keep_connections=False)
    assert second.open_connections == frozenset()
    second.flush_rx()
    assert RingGuest(ram).receive() == [(a, abi.FrameType.CLOSE, b""), (b, abi.FrameType.CLOSE, b"")]
    assert second.open_connection() not in (a, b)

    third = DeviceModel(ram, on_panic=lambda code: None)
    third.restore(second.host_state(), clock_ns=1, clock_latch=0, console=b"", keep_connections=True)
    assert len(third.open_connections) == 1


def test_restore_prefers_saved_ring_indices(ram: memoryview, caplog: pytest.LogCaptureFixture) -> None:
    dev = DeviceModel(ram, on_panic=lambda code: None)
    nic = NicHostState(rx_head=64, tx_tail=0, next_conn_id=7, open_connections=())
    with caplog.at_level(logging.WARNING):
        dev.restore(nic, clock_ns=0, clock_latch=0, console=b"", keep_connections=False)
    assert "differ from the saved ones" in caplog.text
    assert struct.unpack_from("<I", ram, abi.RX_RING_ADDR)[0] == 64


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.binary(min_size=1, max_size=9000)),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 5),
)
def test_every_input_byte_arrives_in_order_per_connection(
    sends: list[tuple[int, bytes]], guest_every: int
) -> None:
    ram = memoryview(mmap.mmap(-1, RAM_SIZE))
    dev = DeviceModel(ram, on_panic=lambda code: None)
    guest = RingGuest(ram)
    conns = [dev.open_connection() for _ in range(3)]
    got: dict[int, bytearray] = {c: bytearray() for c in conns}
    for i, (which, data) in enumerate(sends):
        dev.send_input(conns[which], data)
        if i % guest_every == 0:
            dev.flush_rx()
            for conn, kind, payload in guest.receive():
                if kind == abi.FrameType.DATA:
                    got[conn] += payload
    while any(dev.input_backlog(c) for c in conns):
        dev.flush_rx()
        for conn, kind, payload in guest.receive():
            if kind == abi.FrameType.DATA:
                got[conn] += payload
    for index, conn in enumerate(conns):
        assert bytes(got[conn]) == b"".join(d for w, d in sends if w == index)
