"""The replication wire protocol, sans-IO: bytes in, messages out, and back.

Every connection between a primary and a secondary agent carries a stream of
frames::

    offset size field
    0      4    magic     b"COLO"
    4      1    version   WIRE_VERSION
    5      1    type      MessageType
    6      2    flags     reserved, must be 0
    8      4    length    payload bytes that follow the header
    12     4    seq       frame number on this connection, from 0
    16     8    checksum  xxh3_64(header[0:16] + le64(xxh3_64(payload)))

All integers are little-endian. The checksum hashes the payload first and the
header fields plus that payload hash second, so the payload hash of a PAGES
frame is available on its own: the epoch digest in CHECKPOINT_END is the sum
of the payload hashes of the epoch's PAGES and DEVICE_STATE frames, which both
sides get for free, in any order the channels deliver them. `seq` makes a
dropped, duplicated or reordered frame on one connection a protocol error.

Over TLS the page data of PAGES and SYNC_PAGES is left out of their payload
hash (`cover_page_data=False` on both ends): every TLS record's AEAD tag
already authenticates it, and hashing it again would cost as much CPU as the
socket copy. The fixed part and the indices stay covered, so the epoch digest
still checks which pages arrived. A corrupted record fails the connection
instead of a checksum (there is nothing to resume: the peer is lost).

PAGES and SYNC_PAGES carry most of the bytes. Their payload is a fixed part,
`count` page indices (int64) and `count` pages of data; `count` follows from
the length, so the decoder knows where the data goes before any of it
arrives. `FrameDecoder.next_event` then returns a `PagesHeader`; the caller
hands it the destination with `begin_payload`, the transport receives the
page data straight into `payload_buffer()` with `recv_into`, and the next
`next_event` verifies the checksum and returns `PagesComplete` (or raises).
No per-page Python object exists on that path.

Lockstep's mirror connection speaks the same frames after its handshake:
MIRROR_INPUT (primary -> secondary, client input as the primary's guest
received it) and MIRROR_OUTPUT (secondary -> primary, its guest's output),
numbered on from the handshake's frames.

Nothing here reads a clock, touches a socket or imports asyncio.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias, TypeGuard

import numpy as np
import numpy.typing as npt
import xxhash

from colo_agent.constants import MAX_CHANNELS as MAX_CHANNELS
from colo_agent.constants import PAGE_SIZE as PAGE_SIZE

MAGIC: Final = b"COLO"
WIRE_VERSION: Final = 2  # 2: page data outside the payload hash over TLS
# The oldest version this side still reads. A frame's version byte is the oldest
# version that reads it the same way: only PAGES/SYNC_PAGES over TLS say 2, so an
# agent of this version pairs with one of version 1 either way round in clear,
# and over TLS as the secondary of a version-1 primary (the order of a rolling
# update: the secondary is replaced first).
OLDEST_WIRE_VERSION: Final = 1
# The semantic protocol version a HELLO announces; bumped when messages change
# meaning while the frame layout stays.
PROTOCOL_VERSION: Final = 1

HEADER = struct.Struct("<4sBBHII")  # magic, version, type, flags, length, seq
HEADER_SIZE: Final = HEADER.size + 8  # + checksum
_CHECKSUM = struct.Struct("<Q")

# A frame larger than this is refused before it is buffered: a corrupted
# length must not make us allocate gigabytes.
MAX_BATCH_PAGES: Final = 1024
PAGES_META = struct.Struct("<QQIHH")  # term, epoch (or sync round), attempt, channel, reserved
_PAGE_ENTRY: Final = 8 + PAGE_SIZE  # one index + one page
MAX_CONTROL_PAYLOAD: Final = 1 << 20
MAX_PAYLOAD: Final = PAGES_META.size + MAX_BATCH_PAGES * _PAGE_ENTRY
NONCE_SIZE: Final = 16
MAC_SIZE: Final = 32
MAX_TEXT: Final = 1024


class ProtocolError(Exception):
    """Base of the two protocol errors; `reason` is a one-line explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of place.

    `resumable` is True when the offending frame was consumed whole and the
    stream is positioned at the next frame (a PAGES payload that failed its
    checksum): the epoch it belonged to is lost, the connection is not. Any
    other remote error leaves the connection unusable.
    """

    def __init__(self, reason: str, *, resumable: bool = False) -> None:
        super().__init__(reason)
        self.resumable = resumable


class LocalProtocolError(ProtocolError):
    """Our own side misused the API (a bug here, never the peer's fault)."""


class MessageType(enum.IntEnum):
    HELLO = 1
    AUTH_CHALLENGE = 2
    AUTH_RESPONSE = 3
    AUTH_OK = 4
    REFUSED = 5
    SYNC_BEGIN = 10
    SYNC_PAGES = 11
    SYNC_END = 12
    CHECKPOINT_BEGIN = 20
    PAGES = 21
    DEVICE_STATE = 22
    CHECKPOINT_END = 23
    ACK = 24
    NACK = 25
    HEARTBEAT = 30
    GOODBYE = 31
    STREAM_TARGET = 40
    MIRROR_INPUT = 41
    MIRROR_OUTPUT = 42


class Role(enum.IntEnum):
    PRIMARY = 1
    SECONDARY = 2


class ChannelKind(enum.IntEnum):
    CONTROL = 0
    DATA = 1
    HEARTBEAT = 2
    # Lockstep: client input mirrored to the secondary (MIRROR_INPUT) and its
    # guest's output sent back (MIRROR_OUTPUT).
    MIRROR = 3


class RefuseReason(enum.IntEnum):
    BAD_VERSION = 1
    BAD_AUTH = 2
    UNKNOWN_VM = 3
    BAD_ROLE = 4
    BAD_CHANNEL = 5
    STALE_TERM = 6
    BUSY = 7
    PROTOCOL = 8


class NackReason(enum.IntEnum):
    CORRUPT_FRAME = 1
    DIGEST_MISMATCH = 2
    CACHE_OVERFLOW = 3
    BAD_DEVICE_STATE = 4


class GoodbyeReason(enum.IntEnum):
    SHUTDOWN = 0
    PROTOCOL_ERROR = 1
    PEER_LOST = 2
    PROMOTED = 3
    RESYNC = 4


# -- messages -----------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """First frame of every connection, from the side that connects.

    `session` groups the control, data and heartbeat connections of one
    pairing. `page_count` is the guest's RAM in pages; `cache_pages` is what
    the sender can hold per epoch (0 from a primary).
    """

    version: int
    vm: str
    role: Role
    kind: ChannelKind
    index: int
    channels: int
    session: int
    term: int
    page_count: int
    cache_pages: int
    nonce: bytes


@dataclass(frozen=True)
class AuthChallenge:
    nonce: bytes


@dataclass(frozen=True)
class AuthResponse:
    mac: bytes


@dataclass(frozen=True)
class AuthOk:
    """The server accepts; it proves it knows the secret too (mutual auth)."""

    mac: bytes
    term: int
    page_count: int
    cache_pages: int


@dataclass(frozen=True)
class Refused:
    reason: RefuseReason
    text: str


@dataclass(frozen=True)
class SyncBegin:
    term: int
    page_count: int


@dataclass(frozen=True)
class SyncEnd:
    term: int
    rounds: int
    counts: tuple[int, ...]  # SYNC_PAGES pages per data channel over the whole sync


@dataclass(frozen=True)
class CheckpointBegin:
    term: int
    epoch: int
    attempt: int
    channels: int
    pages: int


@dataclass(frozen=True, eq=False)
class Pages:
    """A batch of pages. `kind` is PAGES (an epoch) or SYNC_PAGES (first sync,
    where `epoch` is the pre-copy round). `data` holds `len(indices)` pages.

    `payload_hash` may be given when the sender already computed it (the
    session does, for the digest); the encoder computes it otherwise.
    """

    kind: MessageType
    term: int
    epoch: int
    attempt: int
    channel: int
    indices: npt.NDArray[np.int64]
    data: memoryview | npt.NDArray[np.uint8]
    payload_hash: int | None = None

    @property
    def count(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class DeviceState:
    term: int
    epoch: int
    attempt: int
    data: bytes


@dataclass(frozen=True)
class CheckpointEnd:
    term: int
    epoch: int
    attempt: int
    digest: int
    counts: tuple[int, ...]  # pages per data channel


@dataclass(frozen=True)
class Ack:
    term: int
    epoch: int


@dataclass(frozen=True)
class Nack:
    term: int
    epoch: int
    attempt: int
    reason: NackReason
    text: str


@dataclass(frozen=True)
class Heartbeat:
    term: int
    seq: int
    acked_epoch: int


@dataclass(frozen=True)
class Goodbye:
    reason: GoodbyeReason
    text: str


@dataclass(frozen=True)
class StreamTarget:
    """Secondary -> primary, once, for a backend that replicates itself (a migration stream):
    where the secondary's backend receives the stream. `address` is in the backend's own form
    (QEMU: `HOST:MIGRATION_PORT:NBD_PORT`); the engine passes it on unread."""

    term: int
    address: str


@dataclass(frozen=True)
class MirrorInput:
    """Lockstep, primary -> secondary: a batch the primary published in its guest's
    RX ring, at ring `position` (modulo 2**32), as raw ring bytes."""

    term: int
    position: int
    data: bytes


@dataclass(frozen=True)
class MirrorOutput:
    """Lockstep, secondary -> primary: output of the secondary's guest on client
    connection `conn`, at absolute stream `offset`, produced since the commit of
    epoch `generation`."""

    generation: int
    conn: int
    offset: int
    data: bytes
    closed: bool


Message: TypeAlias = (
    Hello | AuthChallenge | AuthResponse | AuthOk | Refused | SyncBegin | SyncEnd | CheckpointBegin
    | Pages | DeviceState | CheckpointEnd | Ack | Nack | Heartbeat | Goodbye | StreamTarget
    | MirrorInput | MirrorOutput
)


# -- decoder events that are not whole messages ---------------------------------


@dataclass(frozen=True, eq=False)
class PagesHeader:
    """The metadata of a PAGES/SYNC_PAGES frame; its page data follows.

    Call `FrameDecoder.begin_payload` with a destination of `data_length`
    bytes (or None to discard), then feed it; `PagesComplete` follows.
    """

    kind: MessageType
    term: int
    epoch: int
    attempt: int
    channel: int
    indices: npt.NDArray[np.int64]

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def data_length(self) -> int:
        return len(self.indices) * PAGE_SIZE


@dataclass(frozen=True)
class PagesComplete:
    """The page data of the last `PagesHeader` arrived and its checksum holds."""

    kind: MessageType
    term: int
    epoch: int
    attempt: int
    channel: int
    count: int
    payload_hash: int
    discarded: bool


class NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

Event: TypeAlias = Message | PagesHeader | PagesComplete


def is_message(ev: Event) -> TypeGuard[Message]:
    """A whole message, not one of the two halves of a page batch."""
    return not isinstance(ev, PagesHeader | PagesComplete)


# -- payload codecs -------------------------------------------------------------


_HELLO = struct.Struct("<HBBHHQQQQ16s")
_AUTH_OK = struct.Struct("<32sQQQ")
_U16 = struct.Struct("<H")
_SYNC_BEGIN = struct.Struct("<QQ")
_SYNC_END = struct.Struct("<QIH")
_BEGIN = struct.Struct("<QQIHQ")
_EPOCH_KEY = struct.Struct("<QQI")
_END = struct.Struct("<QQIQH")
_ACK = struct.Struct("<QQ")
_NACK = struct.Struct("<QQIH")
_HEARTBEAT = struct.Struct("<QQQ")
_U64 = struct.Struct("<Q")
_MIRROR_INPUT = struct.Struct("<QI")  # term, ring position
_MIRROR_OUTPUT = struct.Struct("<QIQB")  # generation, connection, offset, closed
_U64_MAX: Final = (1 << 64) - 1


def _text(data: str) -> bytes:
    raw = data.encode("utf-8")
    if len(raw) > MAX_TEXT:
        raw = raw[:MAX_TEXT].decode("utf-8", "ignore").encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _read_text(payload: memoryview, offset: int, what: str) -> tuple[str, int]:
    if len(payload) < offset + 2:
        raise RemoteProtocolError(f"{what}: truncated text length")
    (n,) = _U16.unpack_from(payload, offset)
    offset += 2
    if n > MAX_TEXT or len(payload) < offset + n:
        raise RemoteProtocolError(f"{what}: text of {n} bytes does not fit the payload")
    try:
        text = bytes(payload[offset : offset + n]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what}: text is not UTF-8 ({exc.reason})") from None
    return text, offset + n


def _counts(counts: tuple[int, ...]) -> bytes:
    return b"".join(_U64.pack(c) for c in counts)


def _read_counts(payload: memoryview, offset: int, n: int, what: str) -> tuple[tuple[int, ...], int]:
    if n > MAX_CHANNELS:
        raise RemoteProtocolError(f"{what}: {n} channels exceeds the limit of {MAX_CHANNELS}")
    end = offset + 8 * n
    if len(payload) < end:
        raise RemoteProtocolError(f"{what}: truncated per-channel counts")
    return tuple(struct.unpack_from(f"<{n}Q", payload, offset)), end


def _enum(cls: type[enum.IntEnum], value: int, what: str) -> enum.IntEnum:
    try:
        return cls(value)
    except ValueError:
        raise RemoteProtocolError(f"{what}: unknown {cls.__name__} {value}") from None


def _check_u(value: int, bits: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise LocalProtocolError(f"{what} must be an integer in [0, 2**{bits}), got {value!r}")


def encode_payload(msg: Message) -> tuple[MessageType, bytes]:
    """Payload bytes of every message except `Pages` (see `FrameEncoder`)."""
    if isinstance(msg, Hello):
        return MessageType.HELLO, _hello_payload(msg)
    if isinstance(msg, AuthChallenge):
        if len(msg.nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
        return MessageType.AUTH_CHALLENGE, bytes(msg.nonce)
    if isinstance(msg, AuthResponse):
        if len(msg.mac) != MAC_SIZE:
            raise LocalProtocolError(f"MAC must be {MAC_SIZE} bytes")
        return MessageType.AUTH_RESPONSE, bytes(msg.mac)
    if isinstance(msg, AuthOk):
        if len(msg.mac) != MAC_SIZE:
            raise LocalProtocolError(f"MAC must be {MAC_SIZE} bytes")
        return MessageType.AUTH_OK, _AUTH_OK.pack(msg.mac, msg.term, msg.page_count, msg.cache_pages)
    if isinstance(msg, Refused):
        return MessageType.REFUSED, _U16.pack(msg.reason) + _text(msg.text)
    if isinstance(msg, SyncBegin):
        return MessageType.SYNC_BEGIN, _SYNC_BEGIN.pack(msg.term, msg.page_count)
    if isinstance(msg, SyncEnd):
        _check_counts(msg.counts)
        return MessageType.SYNC_END, _SYNC_END.pack(msg.term, msg.rounds, len(msg.counts)) + _counts(
            msg.counts
        )
    if isinstance(msg, CheckpointBegin):
        return MessageType.CHECKPOINT_BEGIN, _BEGIN.pack(
            msg.term, msg.epoch, msg.attempt, msg.channels, msg.pages
        )
    if isinstance(msg, DeviceState):
        if len(msg.data) > MAX_CONTROL_PAYLOAD - _EPOCH_KEY.size:
            raise LocalProtocolError(f"device state of {len(msg.data)} bytes is too large")
        return MessageType.DEVICE_STATE, _EPOCH_KEY.pack(msg.term, msg.epoch, msg.attempt) + bytes(msg.data)
    if isinstance(msg, CheckpointEnd):
        _check_counts(msg.counts)
        return MessageType.CHECKPOINT_END, _END.pack(
            msg.term, msg.epoch, msg.attempt, msg.digest, len(msg.counts)
        ) + _counts(msg.counts)
    if isinstance(msg, Ack):
        return MessageType.ACK, _ACK.pack(msg.term, msg.epoch)
    if isinstance(msg, Nack):
        return MessageType.NACK, _NACK.pack(msg.term, msg.epoch, msg.attempt, msg.reason) + _text(msg.text)
    if isinstance(msg, Heartbeat):
        return MessageType.HEARTBEAT, _HEARTBEAT.pack(msg.term, msg.seq, msg.acked_epoch)
    if isinstance(msg, Goodbye):
        return MessageType.GOODBYE, _U16.pack(msg.reason) + _text(msg.text)
    if isinstance(msg, StreamTarget):
        return MessageType.STREAM_TARGET, _stream_target_payload(msg)
    if isinstance(msg, MirrorInput):
        _check_u(msg.term, 64, "term")
        head = _MIRROR_INPUT.pack(msg.term, msg.position & 0xFFFFFFFF)
        return MessageType.MIRROR_INPUT, head + bytes(msg.data)
    if isinstance(msg, MirrorOutput):
        return MessageType.MIRROR_OUTPUT, _mirror_output_payload(msg)
    if isinstance(msg, Pages):
        raise LocalProtocolError("Pages frames are encoded by FrameEncoder.encode_pages")
    raise LocalProtocolError(f"not a protocol message: {msg!r}")


def _hello_payload(msg: Hello) -> bytes:
    vm = msg.vm.encode("utf-8")
    if not vm or len(vm) > 253:
        raise LocalProtocolError("VM identity must be 1..253 bytes of UTF-8")
    if len(msg.nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
    if not 1 <= msg.channels <= MAX_CHANNELS:
        raise LocalProtocolError(f"channels must be 1..{MAX_CHANNELS}")
    return _HELLO.pack(
        msg.version, msg.role, msg.kind, msg.index, msg.channels, msg.session, msg.term,
        msg.page_count, msg.cache_pages, msg.nonce,
    ) + _U16.pack(len(vm)) + vm


def _stream_target_payload(msg: StreamTarget) -> bytes:
    _check_u(msg.term, 64, "term")
    if not msg.address or len(msg.address.encode("utf-8")) > MAX_TEXT:
        raise LocalProtocolError(f"a stream target must be 1..{MAX_TEXT} bytes of UTF-8")
    return _U64.pack(msg.term) + _text(msg.address)


def _mirror_output_payload(msg: MirrorOutput) -> bytes:
    for value, bits, what in (
        (msg.generation, 64, "generation"), (msg.conn, 32, "connection"), (msg.offset, 64, "offset"),
    ):
        _check_u(value, bits, what)
    head = _MIRROR_OUTPUT.pack(msg.generation, msg.conn, msg.offset, int(msg.closed))
    return head + bytes(msg.data)


def _check_counts(counts: tuple[int, ...]) -> None:
    if len(counts) > MAX_CHANNELS:
        raise LocalProtocolError(f"at most {MAX_CHANNELS} channels")
    for c in counts:
        _check_u(c, 64, "page count")


def decode_payload(mtype: MessageType, payload: memoryview) -> Message:
    """Inverse of `encode_payload`; raises RemoteProtocolError on any defect."""
    decoder = _DECODERS.get(mtype)
    if decoder is None:
        raise LocalProtocolError(f"{mtype.name} has no plain payload decoder")
    try:
        return decoder(payload)
    except struct.error as exc:  # pragma: no cover - every length is checked first
        raise RemoteProtocolError(f"{mtype.name}: {exc}") from None


def _decode_hello(payload: memoryview) -> Hello:
    if len(payload) < _HELLO.size + 2:
        raise RemoteProtocolError("HELLO: truncated")
    (version, role, kind, index, channels, session, term, page_count, cache_pages, nonce) = (
        _HELLO.unpack_from(payload)
    )
    vm, end = _read_text(payload, _HELLO.size, "HELLO")
    _expect_end(payload, end, "HELLO")
    if not vm:
        raise RemoteProtocolError("HELLO: empty VM identity")
    if not 1 <= channels <= MAX_CHANNELS:
        raise RemoteProtocolError(f"HELLO: {channels} channels is outside 1..{MAX_CHANNELS}")
    return Hello(
        version, vm, Role(_enum(Role, role, "HELLO")), ChannelKind(_enum(ChannelKind, kind, "HELLO")),
        index, channels, session, term, page_count, cache_pages, nonce,
    )


def _decode_auth_challenge(payload: memoryview) -> AuthChallenge:
    _expect_len(payload, NONCE_SIZE, "AUTH_CHALLENGE")
    return AuthChallenge(bytes(payload))


def _decode_auth_response(payload: memoryview) -> AuthResponse:
    _expect_len(payload, MAC_SIZE, "AUTH_RESPONSE")
    return AuthResponse(bytes(payload))


def _decode_auth_ok(payload: memoryview) -> AuthOk:
    _expect_len(payload, _AUTH_OK.size, "AUTH_OK")
    mac, term, page_count, cache_pages = _AUTH_OK.unpack_from(payload)
    return AuthOk(mac, term, page_count, cache_pages)


def _coded_text(payload: memoryview, what: str) -> tuple[int, str]:
    """The (code, text) payload of REFUSED and GOODBYE."""
    if len(payload) < 2:
        raise RemoteProtocolError(f"{what}: truncated")
    (code,) = _U16.unpack_from(payload)
    text, end = _read_text(payload, 2, what)
    _expect_end(payload, end, what)
    return code, text


def _decode_refused(payload: memoryview) -> Refused:
    code, text = _coded_text(payload, "REFUSED")
    return Refused(RefuseReason(_enum(RefuseReason, code, "REFUSED")), text)


def _decode_goodbye(payload: memoryview) -> Goodbye:
    code, text = _coded_text(payload, "GOODBYE")
    return Goodbye(GoodbyeReason(_enum(GoodbyeReason, code, "GOODBYE")), text)


def _decode_sync_begin(payload: memoryview) -> SyncBegin:
    _expect_len(payload, _SYNC_BEGIN.size, "SYNC_BEGIN")
    return SyncBegin(*_SYNC_BEGIN.unpack_from(payload))


def _decode_sync_end(payload: memoryview) -> SyncEnd:
    if len(payload) < _SYNC_END.size:
        raise RemoteProtocolError("SYNC_END: truncated")
    term, rounds, n = _SYNC_END.unpack_from(payload)
    counts, end = _read_counts(payload, _SYNC_END.size, n, "SYNC_END")
    _expect_end(payload, end, "SYNC_END")
    return SyncEnd(term, rounds, counts)


def _decode_checkpoint_begin(payload: memoryview) -> CheckpointBegin:
    _expect_len(payload, _BEGIN.size, "CHECKPOINT_BEGIN")
    term, epoch, attempt, channels, pages = _BEGIN.unpack_from(payload)
    return CheckpointBegin(term, epoch, attempt, channels, pages)


def _decode_device_state(payload: memoryview) -> DeviceState:
    if len(payload) < _EPOCH_KEY.size:
        raise RemoteProtocolError("DEVICE_STATE: truncated")
    term, epoch, attempt = _EPOCH_KEY.unpack_from(payload)
    return DeviceState(term, epoch, attempt, bytes(payload[_EPOCH_KEY.size :]))


def _decode_checkpoint_end(payload: memoryview) -> CheckpointEnd:
    if len(payload) < _END.size:
        raise RemoteProtocolError("CHECKPOINT_END: truncated")
    term, epoch, attempt, digest, n = _END.unpack_from(payload)
    counts, end = _read_counts(payload, _END.size, n, "CHECKPOINT_END")
    _expect_end(payload, end, "CHECKPOINT_END")
    return CheckpointEnd(term, epoch, attempt, digest, counts)


def _decode_ack(payload: memoryview) -> Ack:
    _expect_len(payload, _ACK.size, "ACK")
    return Ack(*_ACK.unpack_from(payload))


def _decode_nack(payload: memoryview) -> Nack:
    if len(payload) < _NACK.size:
        raise RemoteProtocolError("NACK: truncated")
    term, epoch, attempt, code = _NACK.unpack_from(payload)
    text, end = _read_text(payload, _NACK.size, "NACK")
    _expect_end(payload, end, "NACK")
    return Nack(term, epoch, attempt, NackReason(_enum(NackReason, code, "NACK")), text)


def _decode_heartbeat(payload: memoryview) -> Heartbeat:
    _expect_len(payload, _HEARTBEAT.size, "HEARTBEAT")
    return Heartbeat(*_HEARTBEAT.unpack_from(payload))


def _decode_stream_target(payload: memoryview) -> StreamTarget:
    if len(payload) < _U64.size:
        raise RemoteProtocolError("STREAM_TARGET: truncated")
    (term,) = _U64.unpack_from(payload)
    address, end = _read_text(payload, _U64.size, "STREAM_TARGET")
    _expect_end(payload, end, "STREAM_TARGET")
    if not address:
        raise RemoteProtocolError("STREAM_TARGET: empty address")
    return StreamTarget(term, address)


def _decode_mirror_input(payload: memoryview) -> MirrorInput:
    if len(payload) < _MIRROR_INPUT.size:
        raise RemoteProtocolError("MIRROR_INPUT: truncated")
    term, position = _MIRROR_INPUT.unpack_from(payload)
    return MirrorInput(term, position, bytes(payload[_MIRROR_INPUT.size :]))


def _decode_mirror_output(payload: memoryview) -> MirrorOutput:
    if len(payload) < _MIRROR_OUTPUT.size:
        raise RemoteProtocolError("MIRROR_OUTPUT: truncated")
    generation, conn, offset, closed = _MIRROR_OUTPUT.unpack_from(payload)
    if closed > 1:
        raise RemoteProtocolError(f"MIRROR_OUTPUT: closed flag is {closed}")
    return MirrorOutput(generation, conn, offset, bytes(payload[_MIRROR_OUTPUT.size :]), bool(closed))


_DECODERS: Final[dict[MessageType, Callable[[memoryview], Message]]] = {
    MessageType.HELLO: _decode_hello,
    MessageType.AUTH_CHALLENGE: _decode_auth_challenge,
    MessageType.AUTH_RESPONSE: _decode_auth_response,
    MessageType.AUTH_OK: _decode_auth_ok,
    MessageType.REFUSED: _decode_refused,
    MessageType.SYNC_BEGIN: _decode_sync_begin,
    MessageType.SYNC_END: _decode_sync_end,
    MessageType.CHECKPOINT_BEGIN: _decode_checkpoint_begin,
    MessageType.DEVICE_STATE: _decode_device_state,
    MessageType.CHECKPOINT_END: _decode_checkpoint_end,
    MessageType.ACK: _decode_ack,
    MessageType.NACK: _decode_nack,
    MessageType.HEARTBEAT: _decode_heartbeat,
    MessageType.GOODBYE: _decode_goodbye,
    MessageType.STREAM_TARGET: _decode_stream_target,
    MessageType.MIRROR_INPUT: _decode_mirror_input,
    MessageType.MIRROR_OUTPUT: _decode_mirror_output,
}


def _expect_len(payload: memoryview, n: int, what: str) -> None:
    if len(payload) != n:
        raise RemoteProtocolError(f"{what}: payload is {len(payload)} bytes, expected {n}")


def _expect_end(payload: memoryview, end: int, what: str) -> None:
    if len(payload) != end:
        raise RemoteProtocolError(f"{what}: {len(payload) - end} trailing bytes")


def pages_payload_hash(
    term: int, epoch: int, attempt: int, channel: int,
    indices: npt.NDArray[np.int64], data: memoryview | npt.NDArray[np.uint8],
    *, cover_page_data: bool = True,
) -> int:
    """xxh3_64 of a PAGES/SYNC_PAGES payload, as the frame checksum and the epoch
    digest use it (the frame type is covered by the header part of the checksum).
    Without `cover_page_data` (over TLS) the page data is left out."""
    h = xxhash.xxh3_64()
    h.update(PAGES_META.pack(term, epoch, attempt, channel, 0))
    h.update(_as_index_bytes(indices))
    if cover_page_data:
        h.update(byte_view(data))
    return h.intdigest()


def _as_index_bytes(indices: npt.NDArray[np.int64]) -> memoryview:
    arr = np.ascontiguousarray(indices, dtype="<i8")
    return arr.data.cast("B")


def byte_view(buf: memoryview | bytearray | bytes | npt.NDArray[np.uint8]) -> memoryview:
    """A flat unsigned-byte view of a C-contiguous buffer, without copying."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise LocalProtocolError("page data must be C-contiguous")
        view = buf.data
    else:
        view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _frame_checksum(header16: bytes, payload_hash: int) -> int:
    return xxhash.xxh3_64_intdigest(header16 + _U64.pack(payload_hash))


class FrameEncoder:
    """Turns messages into frames for one connection (it numbers them).

    `cover_page_data=False` (a TLS connection) leaves page data out of the
    payload hash; the decoder at the other end must agree.
    """

    def __init__(self, *, cover_page_data: bool = True) -> None:
        self._seq = 0
        self.cover_page_data = cover_page_data

    @property
    def seq(self) -> int:
        """Number the next frame will carry."""
        return self._seq

    def _header(self, mtype: MessageType, length: int, payload_hash: int, version: int = 1) -> bytes:
        head = HEADER.pack(MAGIC, version, mtype, 0, length, self._seq)
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return head + _CHECKSUM.pack(_frame_checksum(head, payload_hash))

    def encode(self, msg: Message) -> bytes:
        """One frame as bytes (for `Pages`, use `encode_pages`)."""
        mtype, payload = encode_payload(msg)
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError(f"{mtype.name} payload of {len(payload)} bytes is too large")
        return self._header(mtype, len(payload), xxhash.xxh3_64_intdigest(payload)) + payload

    def encode_pages(self, msg: Pages) -> tuple[list[bytes | memoryview], int]:
        """A PAGES/SYNC_PAGES frame as buffers for `sendmsg`, and its payload hash.

        The page data is not copied: the last buffer is `msg.data` itself.
        """
        if msg.kind not in (MessageType.PAGES, MessageType.SYNC_PAGES):
            raise LocalProtocolError(f"Pages.kind must be PAGES or SYNC_PAGES, not {msg.kind!r}")
        count = len(msg.indices)
        if not 1 <= count <= MAX_BATCH_PAGES:
            raise LocalProtocolError(f"a batch holds 1..{MAX_BATCH_PAGES} pages, not {count}")
        data = byte_view(msg.data)
        if data.nbytes != count * PAGE_SIZE:
            raise LocalProtocolError(
                f"{count} pages need {count * PAGE_SIZE} bytes of data, got {data.nbytes}"
            )
        for value, bits, what in (
            (msg.term, 64, "term"), (msg.epoch, 64, "epoch"), (msg.attempt, 32, "attempt"),
            (msg.channel, 16, "channel"),
        ):
            _check_u(value, bits, what)
        meta = PAGES_META.pack(msg.term, msg.epoch, msg.attempt, msg.channel, 0)
        index_bytes = _as_index_bytes(msg.indices)
        payload_hash = msg.payload_hash
        if payload_hash is None:
            payload_hash = pages_payload_hash(
                msg.term, msg.epoch, msg.attempt, msg.channel, msg.indices, data,
                cover_page_data=self.cover_page_data,
            )  # fmt: skip
        length = PAGES_META.size + count * _PAGE_ENTRY
        head = self._header(msg.kind, length, payload_hash, 1 if self.cover_page_data else 2)
        return [head + meta + bytes(index_bytes), data], payload_hash


_PAGES_KINDS: Final = (MessageType.PAGES, MessageType.SYNC_PAGES)
_KNOWN_TYPES: Final = frozenset(int(t) for t in MessageType)


@dataclass
class _Payload:
    header: PagesHeader
    prefix_hash: xxhash.xxh3_64
    dest: memoryview | None = None
    filled: int = 0
    discard: bool = False
    head16: bytes = b""
    expected: int = 0
    checksum: int = 0
    covered: bool = True  # page data is part of the payload hash


@dataclass
class FrameDecoder:
    """Turns the bytes of one connection into events.

    `receive(data)` buffers; `next_event()` returns one event or `NEED_DATA`.
    A defect raises `RemoteProtocolError` without consuming the frame (except
    a resumable checksum failure of page data, see `RemoteProtocolError`),
    so the decoder is never half-updated.

    `cover_page_data=False` (a TLS connection): page data is not part of the
    payload hash, as its encoder left it out.
    """

    max_payload: int = MAX_PAYLOAD
    cover_page_data: bool = True
    _buf: bytearray = field(default_factory=bytearray)
    _seq: int = 0
    _payload: _Payload | None = None
    _scratch: bytearray = field(default_factory=lambda: bytearray(1 << 16))

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer (page data goes to the destination, if one is set)."""
        view = memoryview(data).cast("B")
        p = self._payload
        if p is not None and p.dest is not None and not p.discard and not self._buf:
            take = min(len(view), p.expected - p.filled)
            p.dest[p.filled : p.filled + take] = view[:take]
            self._hash_data(p, view[:take])
            p.filled += take
            view = view[take:]
        if len(view):
            self._buf += view

    @property
    def expecting_payload(self) -> bool:
        """True between a `PagesHeader` and its `PagesComplete`."""
        return self._payload is not None

    def wanted(self) -> int:
        """Bytes to read next so as not to read past where page data starts.

        Reading exactly this many (or, in payload mode, into `payload_buffer()`)
        lets a transport receive page data into its destination with no copy.
        """
        if self._payload is not None:
            return max(self._payload.expected - self._payload.filled, 0)
        have = len(self._buf)
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        _, _, mtype, _, length, _ = HEADER.unpack_from(self._buf)
        if mtype in _PAGES_KINDS and length >= PAGES_META.size:
            count = (length - PAGES_META.size) // _PAGE_ENTRY
            need = HEADER_SIZE + PAGES_META.size + 8 * count
        else:
            need = HEADER_SIZE + length
        return max(need - have, 0)

    def begin_payload(self, dest: memoryview | bytearray | npt.NDArray[np.uint8] | None) -> None:
        """Say where the page data of the pending `PagesHeader` goes (None: discard it).

        Bytes already buffered move into `dest` now.
        """
        p = self._payload
        if p is None or p.dest is not None or p.discard:
            raise LocalProtocolError("begin_payload is only valid once, right after a PagesHeader")
        if dest is None:
            p.discard = True
        else:
            view = byte_view(dest)
            if view.readonly or view.nbytes != p.expected:
                raise LocalProtocolError(
                    f"destination must be {p.expected} writable bytes, got {view.nbytes}"
                    + (" (read-only)" if view.readonly else "")
                )
            p.dest = view
        if self._buf:
            pending = bytes(self._buf)
            self._buf.clear()
            if p.discard:
                take = min(len(pending), p.expected - p.filled)
                self._hash_data(p, pending[:take])
                p.filled += take
                self._buf += pending[take:]
            else:
                self.receive(pending)

    def payload_buffer(self) -> memoryview:
        """Where a transport should `recv_into` the page data (empty when complete)."""
        p = self._payload
        if p is None or (p.dest is None and not p.discard):
            raise LocalProtocolError("no page data is expected (call begin_payload after a PagesHeader)")
        remaining = p.expected - p.filled
        if p.discard:
            return memoryview(self._scratch)[: min(remaining, len(self._scratch))]
        assert p.dest is not None
        return p.dest[p.filled :]

    def payload_written(self, n: int) -> None:
        """`n` bytes were received into `payload_buffer()`."""
        p = self._payload
        if p is None or n < 0 or p.filled + n > p.expected:
            raise LocalProtocolError(f"payload_written({n}) does not fit the expected page data")
        # Hashed as it arrives, while it is still in the CPU's cache: a whole
        # batch hashed at its end would be read back from memory.
        if p.discard:
            self._hash_data(p, memoryview(self._scratch)[:n])
        else:
            assert p.dest is not None
            self._hash_data(p, p.dest[p.filled : p.filled + n])
        p.filled += n

    def next_event(self) -> Event | NeedData:
        if self._payload is not None:
            return self._finish_payload()
        if len(self._buf) < HEADER_SIZE:
            self._check_partial_header()
            return NEED_DATA
        magic, version, mtype_raw, flags, length, seq = HEADER.unpack_from(self._buf)
        self._check_header(magic, version, mtype_raw, flags, length, seq)
        mtype = MessageType(mtype_raw)
        (checksum,) = _CHECKSUM.unpack_from(self._buf, HEADER.size)
        head16 = bytes(self._buf[: HEADER.size])
        if mtype in _PAGES_KINDS:
            return self._pages_header(mtype, length, head16, checksum, covered=version == 1)
        if len(self._buf) < HEADER_SIZE + length:
            return NEED_DATA
        payload = memoryview(self._buf)[HEADER_SIZE : HEADER_SIZE + length]
        try:
            if _frame_checksum(head16, xxhash.xxh3_64_intdigest(payload)) != checksum:
                raise RemoteProtocolError(f"{mtype.name} frame {seq}: checksum mismatch")
            msg = decode_payload(mtype, payload)
        finally:
            payload.release()
        del self._buf[: HEADER_SIZE + length]
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return msg

    def eof(self) -> None:
        """The peer closed the connection: fine between frames, an error inside one."""
        if self._payload is not None or self._buf:
            raise RemoteProtocolError("connection closed in the middle of a frame")

    def _check_partial_header(self) -> None:
        # Fail early on garbage rather than waiting for a full header.
        n = min(len(self._buf), 4)
        if bytes(self._buf[:n]) != MAGIC[:n]:
            raise RemoteProtocolError(f"bad frame magic {bytes(self._buf[:n])!r}")

    def _check_header(
        self, magic: bytes, version: int, mtype: int, flags: int, length: int, seq: int
    ) -> None:
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad frame magic {magic!r}")
        if not OLDEST_WIRE_VERSION <= version <= WIRE_VERSION:
            raise RemoteProtocolError(
                f"unsupported wire version {version} "
                f"(this side reads {OLDEST_WIRE_VERSION} to {WIRE_VERSION})"
            )
        if version >= 2 and mtype in _PAGES_KINDS and self.cover_page_data:
            raise RemoteProtocolError("page data outside the payload hash on a connection without TLS")
        if mtype not in _KNOWN_TYPES:
            raise RemoteProtocolError(f"unknown frame type {mtype}")
        if flags != 0:
            raise RemoteProtocolError(f"unknown frame flags {flags:#x}")
        if seq != self._seq:
            raise RemoteProtocolError(
                f"frame {seq} out of sequence (expected {self._seq}): dropped or reordered"
            )
        limit = self.max_payload if mtype in _PAGES_KINDS else MAX_CONTROL_PAYLOAD
        if length > limit:
            raise RemoteProtocolError(f"{MessageType(mtype).name} frame of {length} bytes exceeds {limit}")

    def _pages_header(
        self, mtype: MessageType, length: int, head16: bytes, checksum: int, *, covered: bool
    ) -> Event | NeedData:
        body = length - PAGES_META.size
        if body <= 0 or body % _PAGE_ENTRY:
            raise RemoteProtocolError(f"{mtype.name}: length {length} is not a whole number of pages")
        count = body // _PAGE_ENTRY
        if count > MAX_BATCH_PAGES:
            raise RemoteProtocolError(f"{mtype.name}: batch of {count} pages exceeds {MAX_BATCH_PAGES}")
        meta_end = HEADER_SIZE + PAGES_META.size + 8 * count
        if len(self._buf) < meta_end:
            return NEED_DATA
        term, epoch, attempt, channel, reserved = PAGES_META.unpack_from(self._buf, HEADER_SIZE)
        if reserved:
            raise RemoteProtocolError(f"{mtype.name}: reserved field is {reserved}")
        indices = np.frombuffer(self._buf, dtype="<i8", count=count, offset=HEADER_SIZE + PAGES_META.size)
        indices = indices.astype(np.int64, copy=True)
        hasher = xxhash.xxh3_64()
        hasher.update(memoryview(self._buf)[HEADER_SIZE:meta_end])
        header = PagesHeader(mtype, term, epoch, attempt, channel, indices)
        # Frame accepted structurally: consume it and expect its page data.
        del self._buf[:meta_end]
        self._payload = _Payload(
            header, hasher, head16=head16, expected=count * PAGE_SIZE, checksum=checksum, covered=covered
        )
        return header

    def _hash_data(self, p: _Payload, data: bytes | memoryview) -> None:
        if p.covered:
            p.prefix_hash.update(data)

    def _finish_payload(self) -> Event | NeedData:
        p = self._payload
        assert p is not None
        if p.dest is None and not p.discard:
            raise LocalProtocolError("call begin_payload after a PagesHeader before asking for more events")
        if p.discard and p.filled < p.expected and self._buf:
            take = min(len(self._buf), p.expected - p.filled)
            self._hash_data(p, memoryview(self._buf)[:take])
            del self._buf[:take]
            p.filled += take
        if p.filled < p.expected:
            return NEED_DATA
        payload_hash = p.prefix_hash.intdigest()
        h = p.header
        self._payload = None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        if _frame_checksum(p.head16, payload_hash) != p.checksum:
            raise RemoteProtocolError(
                f"{h.kind.name} frame (term {h.term}, epoch {h.epoch}, channel {h.channel}): "
                "checksum mismatch in page data",
                resumable=True,
            )
        return PagesComplete(h.kind, h.term, h.epoch, h.attempt, h.channel, h.count, payload_hash, p.discard)


def encode_all(encoder: FrameEncoder, messages: list[Message]) -> bytes:
    """Frames for several messages, as one byte string (tests, small control traffic)."""
    out = bytearray()
    for msg in messages:
        if isinstance(msg, Pages):
            bufs, _ = encoder.encode_pages(msg)
            for b in bufs:
                out += b
        else:
            out += encoder.encode(msg)
    return bytes(out)


def drain(decoder: FrameDecoder) -> list[Message]:
    """Every complete message buffered in `decoder`; page data lands in new buffers.

    A convenience for tests and tools; transports use the `PagesHeader`
    protocol to receive page data in place.
    """
    out: list[Message] = []
    pending: PagesHeader | None = None
    dest: bytearray | None = None
    while True:
        ev = decoder.next_event()
        if ev is NEED_DATA:
            return out
        if isinstance(ev, PagesHeader):
            pending, dest = ev, bytearray(ev.data_length)
            decoder.begin_payload(dest)
        elif isinstance(ev, PagesComplete):
            assert pending is not None and dest is not None
            out.append(
                Pages(ev.kind, ev.term, ev.epoch, ev.attempt, ev.channel, pending.indices, memoryview(dest),
                      ev.payload_hash)
            )
            pending = dest = None
        else:
            assert not isinstance(ev, NeedData)
            out.append(ev)
