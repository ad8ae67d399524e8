"""The device-state format: round trip, and clear errors for anything malformed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_agent.microvm import state
from colo_agent.microvm.accel import CpuState, DescriptorTable, Segment
from colo_agent.microvm.devices import NicHostState

u64 = st.integers(0, (1 << 64) - 1)
u32 = st.integers(0, (1 << 32) - 1)
u16 = st.integers(0, (1 << 16) - 1)

segments = st.builds(Segment, selector=u16, base=u64, limit=u32, attributes=u32)
tables = st.builds(DescriptorTable, base=u64, limit=u32)
cpu_states = st.builds(
    CpuState,
    gprs=st.tuples(*[u64] * 16),
    rip=u64,
    rflags=u64,
    segments=st.tuples(*[segments] * 6),
    gdt=tables,
    idt=tables,
    cr0=u64,
    cr2=u64,
    cr3=u64,
    cr4=u64,
    efer=u64,
    extra=st.dictionaries(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20), u64, max_size=5),
)
nics = st.builds(
    NicHostState,
    rx_head=u32,
    tx_tail=u32,
    next_conn_id=st.integers(1, (1 << 32) - 1),
    open_connections=st.lists(st.integers(1, (1 << 32) - 1), unique=True, max_size=50).map(tuple),
)
device_states = st.builds(
    state.DeviceState,
    cpu=cpu_states,
    clock_ns=u64,
    clock_latch=u64,
    nic=nics,
    console=st.binary(max_size=1024),
    accelerator=st.sampled_from(["kvm", "tcg", ""]),
)


@settings(max_examples=200, deadline=None)
@given(device_states)
def test_round_trip(saved: state.DeviceState) -> None:
    assert state.decode(state.encode(saved)) == saved


@settings(max_examples=300, deadline=None)
@given(device_states, st.data())
def test_any_corruption_is_a_typed_error(saved: state.DeviceState, data: st.DataObject) -> None:
    blob = bytearray(state.encode(saved))
    where = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    blob[where] ^= flip
    with pytest.raises(state.DeviceStateError):
        state.decode(bytes(blob))


@settings(max_examples=200, deadline=None)
@given(device_states, st.data())
def test_truncation_is_a_typed_error(saved: state.DeviceState, data: st.DataObject) -> None:
    blob = state.encode(saved)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(state.DeviceStateError):
        state.decode(blob[:cut])


@settings(deadline=None)
@given(st.binary(max_size=400))
def test_garbage_never_crashes(blob: bytes) -> None:
    with pytest.raises(state.DeviceStateError):
        state.decode(blob)


def _example() -> state.DeviceState:
    seg = Segment(0x10, 0, 0xFFFFFFFF, 0xC093)
    return state.DeviceState(
        cpu=CpuState(
            gprs=tuple(range(16)),
            rip=0x100000,
            rflags=2,
            segments=(seg,) * 6,
            gdt=DescriptorTable(0x500, 23),
            idt=DescriptorTable(0, 0),
            cr0=0x80000031,
            cr2=0,
            cr3=0x1000,
            cr4=0x20,
            efer=0x500,
            extra={"fs_base": 7},
        ),
        clock_ns=123,
        clock_latch=456,
        nic=NicHostState(rx_head=8, tx_tail=16, next_conn_id=3, open_connections=(1, 2)),
        console=b"half a line",
        accelerator="kvm",
    )


def test_messages_say_what_is_wrong() -> None:
    blob = state.encode(_example())
    with pytest.raises(state.DeviceStateError, match="magic"):
        state.decode(b"NOTSTATE" + blob[8:])
    newer = blob[:8] + struct.pack("<H", state.VERSION + 1) + blob[10:]
    with pytest.raises(state.DeviceStateVersionError, match="version 2 is not supported"):
        state.decode(newer)
    with pytest.raises(state.DeviceStateChecksumError, match="checksum"):
        state.decode(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(state.DeviceStateError, match="the header says"):
        state.decode(blob + b"\0")
    with pytest.raises(state.DeviceStateError, match="shorter than"):
        state.decode(blob[:10])


def test_values_the_format_cannot_hold_are_refused() -> None:
    good = _example()
    bad_cpu = CpuState(**{**good.cpu.__dict__, "rip": 1 << 64})
    with pytest.raises(state.DeviceStateError, match="cannot be encoded"):
        state.encode(state.DeviceState(**{**good.__dict__, "cpu": bad_cpu}))
    short = CpuState(**{**good.cpu.__dict__, "gprs": (0,) * 15})
    with pytest.raises(state.DeviceStateError, match="15 GPRs"):
        state.encode(state.DeviceState(**{**good.__dict__, "cpu": short}))
