"""The lockstep mirror link, sans-IO: client input to the secondary, its output back.

One authenticated connection of the pairing (`ChannelKind.MIRROR`) carries,
primary -> secondary, every batch of frames the primary published in its
guest's RX ring (`Input`: ring position + raw ring bytes) and, secondary ->
primary, every chunk of output the secondary's guest produced (`Output`:
generation, connection, absolute stream offset, bytes). Frames::

    offset size field
    0      4    magic     b"CMIR"
    4      1    version
    5      1    type      MirrorType
    6      2    reserved  0
    8      4    length    of the payload
    12     8    checksum  xxh3_64 of the payload

A malformed frame raises `MirrorProtocolError` and leaves the decoder as it
was: the caller drops the link (the pairing is yanked) rather than feed a
guest input it cannot vouch for.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

import xxhash

MAGIC: Final = b"CMIR"
VERSION: Final = 1
HEADER = struct.Struct("<4sBBHIQ")
MAX_PAYLOAD: Final = 1 << 20
_INPUT = struct.Struct("<QI")  # term, ring position
_OUTPUT = struct.Struct("<QIQB")  # generation, conn, offset, closed


class MirrorProtocolError(Exception):
    """The peer sent a frame that is not a mirror frame of this version."""


class MirrorType(enum.IntEnum):
    INPUT = 1
    OUTPUT = 2


@dataclass(frozen=True)
class Input:
    term: int
    position: int
    data: bytes


@dataclass(frozen=True)
class Output:
    generation: int
    conn: int
    offset: int
    data: bytes
    closed: bool


MirrorMessage: TypeAlias = Input | Output


def encode(msg: MirrorMessage) -> bytes:
    if isinstance(msg, Input):
        mtype, head = MirrorType.INPUT, _INPUT.pack(msg.term, msg.position & 0xFFFFFFFF)
    else:
        mtype, head = MirrorType.OUTPUT, _OUTPUT.pack(msg.generation, msg.conn, msg.offset, int(msg.closed))
    payload = head + msg.data
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"mirror payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, VERSION, mtype, 0, len(payload), xxhash.xxh3_64_intdigest(payload)) + payload


class MirrorDecoder:
    def __init__(self) -> None:
        self._buf = bytearray()

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_message(self) -> MirrorMessage | None:
        """One complete message, or None until more bytes arrive."""
        if len(self._buf) < HEADER.size:
            return None
        magic, version, mtype, reserved, length, checksum = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise MirrorProtocolError(f"bad magic {bytes(magic)!r}")
        if version != VERSION:
            raise MirrorProtocolError(f"mirror version {version}, this agent speaks {VERSION}")
        if reserved:
            raise MirrorProtocolError("reserved header bits set")
        if length > MAX_PAYLOAD:
            raise MirrorProtocolError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
        if len(self._buf) < HEADER.size + length:
            return None
        payload = bytes(self._buf[HEADER.size : HEADER.size + length])
        if xxhash.xxh3_64_intdigest(payload) != checksum:
            raise MirrorProtocolError("payload checksum mismatch")
        msg = _decode(mtype, payload)
        del self._buf[: HEADER.size + length]
        return msg


def _decode(mtype: int, payload: bytes) -> MirrorMessage:
    if mtype == MirrorType.INPUT:
        if len(payload) < _INPUT.size:
            raise MirrorProtocolError("truncated INPUT")
        term, position = _INPUT.unpack_from(payload)
        return Input(term, position, payload[_INPUT.size :])
    if mtype == MirrorType.OUTPUT:
        if len(payload) < _OUTPUT.size:
            raise MirrorProtocolError("truncated OUTPUT")
        gen, conn, offset, closed = _OUTPUT.unpack_from(payload)
        if closed > 1:
            raise MirrorProtocolError(f"OUTPUT closed flag {closed}")
        return Output(gen, conn, offset, payload[_OUTPUT.size :], bool(closed))
    raise MirrorProtocolError(f"unknown mirror message type {mtype}")


# -------------------------------------------------------------------------- engine state

_STATE = struct.Struct("<4sI")  # magic, machine state length
_STATE_MAGIC: Final = b"CLSS"
_OFFSET = struct.Struct("<IQB")  # conn, offset, closed


def pack_state(machine_state: bytes, offsets: dict[int, tuple[int, bool]]) -> bytes:
    """Lockstep device state: the machine's, plus the primary's output offsets at the pause,
    from which the secondary's output streams restart after the commit."""
    parts = [_STATE.pack(_STATE_MAGIC, len(machine_state)), machine_state, struct.pack("<I", len(offsets))]
    parts += [_OFFSET.pack(c, o, int(closed)) for c, (o, closed) in sorted(offsets.items())]
    return b"".join(parts)


def unpack_state(data: bytes) -> tuple[bytes, dict[int, tuple[int, bool]]]:
    try:
        magic, n = _STATE.unpack_from(data)
        if magic != _STATE_MAGIC:
            raise ValueError("not a lockstep device state (is the primary in checkpoint mode?)")
        machine = data[_STATE.size : _STATE.size + n]
        pos = _STATE.size + n
        (count,) = struct.unpack_from("<I", data, pos)
        pos += 4
        offsets: dict[int, tuple[int, bool]] = {}
        for _ in range(count):
            conn, off, closed = _OFFSET.unpack_from(data, pos)
            offsets[conn] = (off, bool(closed))
            pos += _OFFSET.size
    except struct.error as exc:
        raise ValueError(f"truncated lockstep device state: {exc}") from exc
    if len(machine) != n or pos != len(data):
        raise ValueError("lockstep device state has the wrong length")
    return machine, offsets
