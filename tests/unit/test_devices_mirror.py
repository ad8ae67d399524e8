"""Lockstep input mirroring at the NIC: the secondary's RX ring is the primary's, byte for byte."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from colo_agent.microvm import abi
from colo_agent.microvm.devices import DeviceModel

RAM = 4 << 20
TAIL = abi.RX_RING_ADDR + abi.RING_TAIL_OFFSET
HEAD = abi.RX_RING_ADDR + abi.RING_HEAD_OFFSET
DATA = abi.RX_RING_ADDR + abi.RING_DATA_OFFSET


def _nic() -> tuple[DeviceModel, memoryview]:
    ram = memoryview(bytearray(RAM))
    return DeviceModel(ram, on_panic=lambda code: None), ram


def _mirrored_pair() -> tuple[DeviceModel, memoryview, DeviceModel, memoryview, list[tuple[int, bytes]]]:
    """A primary NIC whose RX batches are recorded, and a secondary NIC that takes only mirrored input."""
    primary, pram = _nic()
    secondary, sram = _nic()
    batches: list[tuple[int, bytes]] = []
    primary.set_rx_tap(lambda pos, raw: batches.append((pos, raw)))
    secondary.enable_rx_mirror()
    return primary, pram, secondary, sram, batches


def _ring(ram: memoryview) -> bytes:
    return bytes(ram[DATA : DATA + abi.RING_CAPACITY])


def _head(ram: memoryview) -> int:
    return int(struct.unpack_from("<I", ram, HEAD)[0])


def _consume_all(ram: memoryview) -> None:
    """What the guest does: take every frame (tail catches up with head)."""
    struct.pack_into("<I", ram, TAIL, _head(ram))


@given(st.lists(st.binary(min_size=1, max_size=9000), min_size=1, max_size=30), st.data())
@settings(max_examples=40, deadline=None)
def test_secondary_ring_equals_primary_ring(inputs: list[bytes], data: st.DataObject) -> None:
    primary, pram, secondary, sram, batches = _mirrored_pair()
    conn = primary.open_connection()
    for chunk in inputs:
        primary.send_input(conn, chunk)
        if data.draw(st.booleans()):
            primary.flush_rx()
            _consume_all(pram)
    primary.flush_rx()
    # Deliver out of order: a batch whose predecessor is missing waits for it.
    order = data.draw(st.permutations(range(len(batches))))
    for i in order:
        secondary.mirror_rx(*batches[i])
        secondary.flush_rx()
        _consume_all(sram)
    secondary.flush_rx()
    assert _head(sram) == _head(pram)
    assert _ring(sram) == _ring(pram)
    # Every byte the primary put in its ring was marked dirty on the secondary too.
    assert set(secondary.collect_dirty()) >= {DATA // abi.PAGE_SIZE}


def test_batches_already_in_a_restored_ring_are_skipped() -> None:
    primary, pram, secondary, sram, batches = _mirrored_pair()
    conn = primary.open_connection()
    primary.send_input(conn, b"*1\r\n$4\r\nPING\r\n")
    primary.flush_rx()
    checkpoint = primary.host_state()
    sram[:] = pram  # the commit: the secondary takes the primary's RAM and device state
    primary.send_input(conn, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
    primary.flush_rx()
    secondary.restore(checkpoint, clock_ns=0, clock_latch=0, console=b"", keep_connections=True)
    for b in batches:  # both batches arrive; the first is already in the restored ring
        secondary.mirror_rx(*b)
    secondary.flush_rx()
    assert _head(sram) == _head(pram)
    assert _ring(sram) == _ring(pram)


def test_a_full_ring_waits_for_the_guest() -> None:
    primary, pram, secondary, sram, batches = _mirrored_pair()
    conn = primary.open_connection()
    for _ in range(3):
        primary.send_input(conn, b"x" * (abi.RING_CAPACITY // 2 - 64))
        primary.flush_rx()
        _consume_all(pram)
    for b in batches:
        secondary.mirror_rx(*b)
    secondary.flush_rx()
    first = _head(sram)
    assert 0 < first < _head(pram)  # no room for everything until the guest consumes
    _consume_all(sram)
    secondary.flush_rx()
    _consume_all(sram)
    secondary.flush_rx()
    assert _head(sram) == _head(pram)


def test_a_batch_applied_after_the_checkpoint_is_applied_again_after_the_commit() -> None:
    """The secondary's guest may take input the primary published after its pause; the commit
    resets the ring to that pause, and the input must reach the guest a second time."""
    primary, pram, secondary, sram, batches = _mirrored_pair()
    conn = primary.open_connection()
    primary.flush_rx()
    checkpoint_ram = bytes(pram)
    checkpoint = primary.host_state()  # the pause: OPEN is in, the SET is not
    primary.send_input(conn, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
    primary.flush_rx()
    for b in batches:
        secondary.mirror_rx(*b)
    secondary.flush_rx()
    _consume_all(sram)  # the secondary's guest executed the SET
    sram[:] = checkpoint_ram  # commit of the checkpoint
    secondary.restore(checkpoint, clock_ns=0, clock_latch=0, console=b"", keep_connections=True)
    assert _head(sram) == checkpoint.rx_head
    secondary.flush_rx()
    assert _head(sram) == _head(pram)
    assert _ring(sram) == _ring(pram)


def test_connections_opened_through_the_mirror_are_known_even_across_the_ring_end() -> None:
    primary, pram, secondary, sram, batches = _mirrored_pair()
    first = primary.open_connection()
    primary.send_input(first, b"x" * (abi.RING_CAPACITY - 200))
    primary.flush_rx()
    _consume_all(pram)
    second = primary.open_connection()  # after a PAD at the end of the ring
    primary.send_input(second, b"y" * 300)
    primary.flush_rx()
    primary.close_connection(first)
    primary.flush_rx()
    for b in batches:
        secondary.mirror_rx(*b)
        secondary.flush_rx()
        _consume_all(sram)
    assert secondary.open_connections == {second}
