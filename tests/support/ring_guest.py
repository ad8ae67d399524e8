"""The firmware's side of the NIC rings, in Python: for tests that drive the device model."""

from __future__ import annotations

import struct

from colo_agent.microvm import abi

HDR = struct.Struct("<IHH")
CAP = abi.RING_CAPACITY


class RingGuest:
    """The firmware's side of the NIC: consumes RX, produces TX."""

    def __init__(self, ram: memoryview) -> None:
        self.ram = ram

    def _u32(self, addr: int) -> int:
        value: int = struct.unpack_from("<I", self.ram, addr)[0]
        return value

    def _set_u32(self, addr: int, value: int) -> None:
        struct.pack_into("<I", self.ram, addr, value & 0xFFFFFFFF)

    def receive(self) -> list[tuple[int, int, bytes]]:
        ring = abi.RX_RING_ADDR
        head = self._u32(ring + abi.RING_HEAD_OFFSET)
        tail = self._u32(ring + abi.RING_TAIL_OFFSET)
        out = []
        while tail != head:
            pos = tail & (CAP - 1)
            base = ring + abi.RING_DATA_OFFSET + pos
            conn, kind, length = HDR.unpack_from(self.ram, base)
            if kind == abi.FrameType.PAD:
                tail += CAP - pos
                continue
            assert length <= abi.MAX_FRAME_PAYLOAD
            assert pos + 8 + length <= CAP, "a frame must never wrap"
            out.append((conn, kind, bytes(self.ram[base + 8 : base + 8 + length])))
            tail += 8 + (length + 7) // 8 * 8
        self._set_u32(ring + abi.RING_TAIL_OFFSET, tail)
        return out

    def send(self, conn: int, kind: int, payload: bytes = b"") -> None:
        ring = abi.TX_RING_ADDR
        head = self._u32(ring + abi.RING_HEAD_OFFSET)
        size = 8 + (len(payload) + 7) // 8 * 8
        pos = head & (CAP - 1)
        if CAP - pos < size:
            HDR.pack_into(self.ram, ring + abi.RING_DATA_OFFSET + pos, 0, abi.FrameType.PAD, 0)
            head += CAP - pos
            pos = 0
        base = ring + abi.RING_DATA_OFFSET + pos
        HDR.pack_into(self.ram, base, conn, kind, len(payload))
        self.ram[base + 8 : base + 8 + len(payload)] = payload
        self._set_u32(ring + abi.RING_HEAD_OFFSET, head + size)
