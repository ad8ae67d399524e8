"""The frame codec: round trips, and every defect is a typed error that leaves
the decoder as it was."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colo_agent.replication import protocol as p

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
text = st.text(max_size=40)
counts = st.lists(u64, max_size=8).map(tuple)


@st.composite
def pages(draw: st.DrawFn) -> p.Pages:
    n = draw(st.integers(1, 6))
    idx = np.array(sorted(draw(st.sets(st.integers(0, 10_000), min_size=n, max_size=n))), dtype=np.int64)
    seed = draw(st.integers(0, 2**32 - 1))
    data = np.random.default_rng(seed).integers(0, 256, size=n * p.PAGE_SIZE, dtype=np.uint8)
    kind = draw(st.sampled_from([p.MessageType.PAGES, p.MessageType.SYNC_PAGES]))
    return p.Pages(kind, draw(u64), draw(u64), draw(u32), draw(u16), idx, data)


messages = st.one_of(
    st.builds(
        p.Hello, u16, st.text(min_size=1, max_size=30).filter(lambda s: len(s.encode()) <= 253),
        st.sampled_from(p.Role), st.sampled_from(p.ChannelKind), u16, st.integers(1, p.MAX_CHANNELS),
        u64, u64, u64, u64, st.binary(min_size=16, max_size=16),
    ),
    st.builds(p.AuthChallenge, st.binary(min_size=16, max_size=16)),
    st.builds(p.AuthResponse, st.binary(min_size=32, max_size=32)),
    st.builds(p.AuthOk, st.binary(min_size=32, max_size=32), u64, u64, u64),
    st.builds(p.Refused, st.sampled_from(p.RefuseReason), text),
    st.builds(p.SyncBegin, u64, u64),
    st.builds(p.SyncEnd, u64, u32, counts),
    st.builds(p.CheckpointBegin, u64, u64, u32, u16, u64),
    st.builds(p.DeviceState, u64, u64, u32, st.binary(max_size=300)),
    st.builds(p.CheckpointEnd, u64, u64, u32, u64, counts),
    st.builds(p.Ack, u64, u64),
    st.builds(p.Nack, u64, u64, u32, st.sampled_from(p.NackReason), text),
    st.builds(p.Heartbeat, u64, u64, u64),
    st.builds(p.Goodbye, st.sampled_from(p.GoodbyeReason), text),
    st.builds(p.StreamTarget, u64, st.text(min_size=1, max_size=60)),
    st.builds(p.MirrorInput, u64, u32, st.binary(max_size=300)),
    st.builds(p.MirrorOutput, u64, u32, u64, st.binary(max_size=300), st.booleans()),
    pages(),
)


def same(a: p.Message, b: p.Message) -> bool:
    if isinstance(a, p.Pages):
        assert isinstance(b, p.Pages)
        return (
            (a.kind, a.term, a.epoch, a.attempt, a.channel) == (b.kind, b.term, b.epoch, b.attempt, b.channel)
            and np.array_equal(a.indices, b.indices)
            and bytes(p.byte_view(a.data)) == bytes(p.byte_view(b.data))
        )
    return a == b


def encode(msgs: list[p.Message]) -> bytes:
    return p.encode_all(p.FrameEncoder(), msgs)


def snapshot(dec: p.FrameDecoder) -> tuple[bytes, int, bool]:
    return bytes(dec._buf), dec._seq, dec.expecting_payload


@given(st.lists(messages, min_size=1, max_size=6), st.integers(1, 5000))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_in_any_chunking(msgs: list[p.Message], chunk: int) -> None:
    wire = encode(msgs)
    dec = p.FrameDecoder()
    out: list[p.Message] = []
    for i in range(0, len(wire), chunk):
        dec.receive(wire[i : i + chunk])
    out = p.drain(dec)
    assert len(out) == len(msgs)
    assert all(same(a, b) for a, b in zip(msgs, out, strict=True))
    assert dec.next_event() is p.NEED_DATA
    dec.eof()


def test_page_data_is_received_in_place_without_copies() -> None:
    idx = np.array([3, 4, 7], dtype=np.int64)
    src = np.random.default_rng(1).integers(0, 256, size=(3, p.PAGE_SIZE), dtype=np.uint8)
    wire = encode([p.Pages(p.MessageType.PAGES, 1, 2, 0, 0, idx, src)])
    dec = p.FrameDecoder()
    pos = 0
    # The transport reads exactly `wanted()` bytes until the header is parsed.
    while True:
        n = dec.wanted()
        dec.receive(wire[pos : pos + n])
        pos += n
        ev = dec.next_event()
        if ev is not p.NEED_DATA:
            break
    assert isinstance(ev, p.PagesHeader)
    assert list(ev.indices) == [3, 4, 7] and ev.data_length == 3 * p.PAGE_SIZE
    dest = np.zeros((3, p.PAGE_SIZE), dtype=np.uint8)
    dec.begin_payload(dest)
    assert dec.wanted() == len(wire) - pos  # nothing was over-read into a scratch buffer
    buf = dec.payload_buffer()
    buf[:] = wire[pos:]  # what recv_into would do
    dec.payload_written(len(buf))
    done = dec.next_event()
    assert isinstance(done, p.PagesComplete) and done.count == 3 and not done.discarded
    assert np.array_equal(dest, src)


def test_discarded_payload_is_checked_and_skipped() -> None:
    idx = np.array([1], dtype=np.int64)
    wire = encode([p.Pages(p.MessageType.PAGES, 1, 1, 0, 0, idx, bytes(p.PAGE_SIZE)), p.Ack(1, 1)])
    dec = p.FrameDecoder()
    dec.receive(wire)
    assert isinstance(dec.next_event(), p.PagesHeader)
    dec.begin_payload(None)
    done = dec.next_event()
    assert isinstance(done, p.PagesComplete) and done.discarded
    assert dec.next_event() == p.Ack(1, 1)


def test_corrupted_page_data_is_a_resumable_error_and_the_stream_goes_on() -> None:
    idx = np.array([1, 2], dtype=np.int64)
    frame = p.Pages(p.MessageType.PAGES, 1, 1, 0, 0, idx, bytes(2 * p.PAGE_SIZE))
    wire = bytearray(encode([frame, p.Ack(1, 1)]))
    wire[p.HEADER_SIZE + p.PAGES_META.size + 16 + 5000] ^= 0x40
    dec = p.FrameDecoder()
    dec.receive(wire)
    assert isinstance(dec.next_event(), p.PagesHeader)
    dec.begin_payload(bytearray(2 * p.PAGE_SIZE))
    with pytest.raises(p.RemoteProtocolError, match="checksum") as err:
        dec.next_event()
    assert err.value.resumable
    assert dec.next_event() == p.Ack(1, 1)


@given(st.lists(messages, min_size=1, max_size=3), st.data())
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_any_bit_flip_is_a_typed_error(msgs: list[p.Message], data: st.DataObject) -> None:
    wire = bytearray(encode(msgs))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    dec = p.FrameDecoder()
    dec.receive(wire)
    with pytest.raises(p.RemoteProtocolError):
        p.drain(dec)
        dec.eof()


@given(st.lists(messages, min_size=1, max_size=4), st.data())
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_truncation_needs_data_and_fails_at_eof(msgs: list[p.Message], data: st.DataObject) -> None:
    wire = encode(msgs)
    cut = data.draw(st.integers(0, len(wire) - 1))
    dec = p.FrameDecoder()
    dec.receive(wire[:cut])
    got = p.drain(dec)
    assert len(got) < len(msgs)
    assert dec.next_event() is p.NEED_DATA
    boundary = cut in {len(encode(msgs[:k])) for k in range(len(msgs) + 1)}
    if boundary:
        dec.eof()
    else:
        with pytest.raises(p.RemoteProtocolError, match="middle of a frame"):
            dec.eof()


@given(st.lists(messages, min_size=2, max_size=4), st.data())
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_reordered_or_dropped_frames_are_refused(msgs: list[p.Message], data: st.DataObject) -> None:
    enc = p.FrameEncoder()
    frames = [encode_one(enc, m) for m in msgs]
    i = data.draw(st.integers(1, len(frames) - 1))
    if data.draw(st.booleans()):
        frames[0], frames[i] = frames[i], frames[0]  # reorder
    else:
        del frames[i - 1]  # drop one
    dec = p.FrameDecoder()
    dec.receive(b"".join(frames))
    with pytest.raises(p.RemoteProtocolError, match="out of sequence"):
        p.drain(dec)


def encode_one(enc: p.FrameEncoder, msg: p.Message) -> bytes:
    return p.encode_all(enc, [msg])


@given(st.integers(0, 255).filter(lambda t: t not in {int(m) for m in p.MessageType}), st.binary(max_size=64))
def test_unknown_type_is_refused_and_the_decoder_is_intact(mtype: int, payload: bytes) -> None:
    head = p.HEADER.pack(p.MAGIC, p.WIRE_VERSION, mtype, 0, len(payload), 0)
    wire = head + struct.pack("<Q", p._frame_checksum(head, 0)) + payload
    dec = p.FrameDecoder()
    dec.receive(wire)
    before = snapshot(dec)
    for _ in range(2):  # the same error again: nothing was consumed
        with pytest.raises(p.RemoteProtocolError, match="unknown frame type"):
            dec.next_event()
        assert snapshot(dec) == before


def test_other_wire_version_is_named_in_the_error() -> None:
    wire = bytearray(encode([p.Ack(1, 1)]))
    wire[4] = 9
    dec = p.FrameDecoder()
    dec.receive(wire)
    with pytest.raises(p.RemoteProtocolError, match="unsupported wire version 9"):
        dec.next_event()


def test_oversized_length_is_refused_before_buffering() -> None:
    head = p.HEADER.pack(p.MAGIC, p.WIRE_VERSION, p.MessageType.DEVICE_STATE, 0, 2**31, 0)
    dec = p.FrameDecoder()
    dec.receive(head + bytes(8))
    with pytest.raises(p.RemoteProtocolError, match="exceeds"):
        dec.next_event()


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_fuzz_random_bytes_never_crash(blob: bytes) -> None:
    dec = p.FrameDecoder()
    dec.receive(blob)
    try:
        p.drain(dec)
        dec.eof()
    except p.RemoteProtocolError:
        pass


@given(st.lists(messages, max_size=3), st.binary(min_size=1, max_size=200), st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_garbage_spliced_into_valid_stream(
    msgs: list[p.Message], junk: bytes, data: st.DataObject
) -> None:
    wire = encode(msgs)
    at = data.draw(st.integers(0, len(wire)))
    dec = p.FrameDecoder()
    dec.receive(wire[:at] + junk + wire[at:])
    try:
        p.drain(dec)
        dec.eof()
    except p.RemoteProtocolError:
        pass


def test_local_misuse_is_a_local_error() -> None:
    enc = p.FrameEncoder()
    with pytest.raises(p.LocalProtocolError):
        enc.encode(p.AuthChallenge(b"short"))
    with pytest.raises(p.LocalProtocolError):
        enc.encode_pages(p.Pages(p.MessageType.PAGES, 1, 1, 0, 0, np.array([1]), bytes(10)))
    with pytest.raises(p.LocalProtocolError):
        enc.encode_pages(p.Pages(p.MessageType.ACK, 1, 1, 0, 0, np.array([1]), bytes(p.PAGE_SIZE)))
    dec = p.FrameDecoder()
    with pytest.raises(p.LocalProtocolError):
        dec.begin_payload(bytearray(10))
    dec.receive(encode([p.Pages(p.MessageType.PAGES, 1, 1, 0, 0, np.array([1]), bytes(p.PAGE_SIZE))]))
    assert isinstance(dec.next_event(), p.PagesHeader)
    with pytest.raises(p.LocalProtocolError, match="begin_payload"):
        dec.next_event()
    with pytest.raises(p.LocalProtocolError, match="writable"):
        dec.begin_payload(bytearray(7))
    with pytest.raises(p.LocalProtocolError, match="read-only"):
        dec.begin_payload(bytes(p.PAGE_SIZE))


def test_semantic_payload_defects_are_remote_errors() -> None:
    enc = p.FrameEncoder()
    # A NACK whose reason code is unknown, with a valid checksum.
    payload = struct.pack("<QQIH", 1, 1, 0, 999) + struct.pack("<H", 0)
    head = p.HEADER.pack(p.MAGIC, p.WIRE_VERSION, p.MessageType.NACK, 0, len(payload), 0)
    wire = head + struct.pack("<Q", p._frame_checksum(head, xxhash.xxh3_64_intdigest(payload))) + payload
    dec = p.FrameDecoder()
    dec.receive(wire)
    with pytest.raises(p.RemoteProtocolError, match="unknown NackReason 999"):
        dec.next_event()
    assert enc.seq == 0


def _frame(mtype: p.MessageType, payload: bytes, seq: int = 0) -> bytes:
    """One frame with a valid checksum around whatever payload."""
    head = p.HEADER.pack(p.MAGIC, p.WIRE_VERSION, mtype, 0, len(payload), seq)
    return head + struct.pack("<Q", p._frame_checksum(head, xxhash.xxh3_64_intdigest(payload))) + payload


def test_stream_target_carries_the_backend_address_unread() -> None:
    dec = p.FrameDecoder()
    dec.receive(encode([p.StreamTarget(7, "10.0.0.5:7713:7714"), p.StreamTarget(7, "[fd00::5]:1:2")]))
    assert p.drain(dec) == [p.StreamTarget(7, "10.0.0.5:7713:7714"), p.StreamTarget(7, "[fd00::5]:1:2")]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", "STREAM_TARGET: truncated"),
        (struct.pack("<Q", 3)[:5], "STREAM_TARGET: truncated"),
        (struct.pack("<Q", 3), "truncated text length"),
        (struct.pack("<QH", 3, 0), "empty address"),
        (struct.pack("<QH", 3, 9) + b"short", "does not fit"),
        (struct.pack("<QH", 3, 2) + b"\xff\xfe", "not UTF-8"),
        (struct.pack("<QH", 3, 1) + b"a" + b"extra", "trailing bytes"),
    ],
)
def test_stream_target_defects_are_remote_errors_that_leave_the_decoder_intact(
    payload: bytes, error: str
) -> None:
    dec = p.FrameDecoder()
    dec.receive(_frame(p.MessageType.STREAM_TARGET, payload))
    before = snapshot(dec)
    with pytest.raises(p.RemoteProtocolError, match=error):
        dec.next_event()
    assert snapshot(dec) == before


def test_stream_target_misuse_is_a_local_error() -> None:
    enc = p.FrameEncoder()
    with pytest.raises(p.LocalProtocolError, match="stream target"):
        enc.encode(p.StreamTarget(1, ""))
    with pytest.raises(p.LocalProtocolError, match="stream target"):
        enc.encode(p.StreamTarget(1, "x" * (p.MAX_TEXT + 1)))
    with pytest.raises(p.LocalProtocolError, match="term"):
        enc.encode(p.StreamTarget(-1, "a:1:2"))
    assert enc.seq == 0


@pytest.mark.parametrize(
    ("mtype", "payload", "error"),
    [
        (p.MessageType.MIRROR_INPUT, bytes(11), "MIRROR_INPUT: truncated"),
        (p.MessageType.MIRROR_OUTPUT, bytes(20), "MIRROR_OUTPUT: truncated"),
        (p.MessageType.MIRROR_OUTPUT, struct.pack("<QIQB", 1, 2, 3, 2) + b"x", "closed flag is 2"),
    ],
)
def test_malformed_mirror_frames_are_remote_errors_and_consume_nothing(
    mtype: p.MessageType, payload: bytes, error: str
) -> None:
    dec = p.FrameDecoder()
    dec.receive(_frame(mtype, payload))
    before = snapshot(dec)
    with pytest.raises(p.RemoteProtocolError, match=error):
        dec.next_event()
    assert snapshot(dec) == before


def test_mirror_frames_share_the_connection_numbering() -> None:
    """After the handshake the mirror connection goes on with the same frame numbers:
    a mirror frame that skips one is refused like any other."""
    enc = p.FrameEncoder()
    wire = p.encode_all(enc, [p.AuthChallenge(bytes(16)), p.MirrorInput(1, 7, b"ping")])
    dec = p.FrameDecoder()
    dec.receive(wire)
    assert p.drain(dec) == [p.AuthChallenge(bytes(16)), p.MirrorInput(1, 7, b"ping")]
    dec.receive(_frame(p.MessageType.MIRROR_OUTPUT, struct.pack("<QIQB", 1, 2, 3, 0), seq=3))
    with pytest.raises(p.RemoteProtocolError, match="out of sequence"):
        dec.next_event()


def test_mirror_input_larger_than_a_control_frame_is_a_local_error() -> None:
    with pytest.raises(p.LocalProtocolError, match="too large"):
        p.FrameEncoder().encode(p.MirrorInput(1, 0, bytes(p.MAX_CONTROL_PAYLOAD)))


def _uncovered_pages_wire(data: bytes, *, cover: bool) -> tuple[bytes, p.Pages]:
    idx = np.array([2, 5], dtype=np.int64)
    frame = p.Pages(p.MessageType.PAGES, 1, 3, 0, 1, idx, data)
    return encode_one(p.FrameEncoder(cover_page_data=cover), frame), frame


def test_over_tls_page_data_is_outside_the_payload_hash_and_still_lands() -> None:
    data = np.random.default_rng(2).integers(0, 256, 2 * p.PAGE_SIZE, dtype=np.uint8).tobytes()
    wire, frame = _uncovered_pages_wire(data, cover=False)
    expected = p.pages_payload_hash(1, 3, 0, 1, frame.indices, data, cover_page_data=False)
    assert expected != p.pages_payload_hash(1, 3, 0, 1, frame.indices, data)
    for discard in (False, True):
        dec = p.FrameDecoder(cover_page_data=False)
        dec.receive(wire)
        assert isinstance(dec.next_event(), p.PagesHeader)
        dest = bytearray(2 * p.PAGE_SIZE)
        dec.begin_payload(None if discard else dest)
        done = dec.next_event()
        assert isinstance(done, p.PagesComplete) and done.payload_hash == expected
        assert done.discarded is discard and bytes(dest) == (bytes(len(dest)) if discard else data)


def test_over_tls_the_indices_are_still_checked() -> None:
    wire = bytearray(_uncovered_pages_wire(bytes(2 * p.PAGE_SIZE), cover=False)[0])
    wire[p.HEADER_SIZE + p.PAGES_META.size + 8] ^= 0x01  # the second index: 5 -> 4
    dec = p.FrameDecoder(cover_page_data=False)
    dec.receive(wire)
    assert isinstance(dec.next_event(), p.PagesHeader)
    dec.begin_payload(bytearray(2 * p.PAGE_SIZE))
    with pytest.raises(p.RemoteProtocolError, match="checksum"):
        dec.next_event()


def test_a_version_1_primary_pairs_with_this_version_over_tls_page_data_still_checked() -> None:
    # A rolling update replaces the secondary first: it reads the old primary's frames, which
    # cover page data (version 1), and a flipped page byte is still a checksum failure.
    data = np.random.default_rng(3).integers(0, 256, 2 * p.PAGE_SIZE, dtype=np.uint8).tobytes()
    wire, frame = _uncovered_pages_wire(data, cover=True)
    assert wire[4] == 1
    dec = p.FrameDecoder(cover_page_data=False)
    dec.receive(wire)
    assert isinstance(dec.next_event(), p.PagesHeader)
    dest = bytearray(2 * p.PAGE_SIZE)
    dec.begin_payload(dest)
    done = dec.next_event()
    assert isinstance(done, p.PagesComplete) and bytes(dest) == data
    assert done.payload_hash == p.pages_payload_hash(1, 3, 0, 1, frame.indices, data)
    flipped = bytearray(wire)
    flipped[-1] ^= 0x01
    dec = p.FrameDecoder(cover_page_data=False)
    dec.receive(flipped)
    assert isinstance(dec.next_event(), p.PagesHeader)
    dec.begin_payload(bytearray(2 * p.PAGE_SIZE))
    with pytest.raises(p.RemoteProtocolError, match="checksum"):
        dec.next_event()


def test_control_frames_say_version_1_so_a_version_1_peer_reads_them() -> None:
    for cover in (True, False):
        assert p.FrameEncoder(cover_page_data=cover).encode(p.Ack(1, 1))[4] == 1
    assert _uncovered_pages_wire(bytes(2 * p.PAGE_SIZE), cover=False)[0][4] == 2


def test_uncovered_page_data_on_a_clear_connection_is_refused() -> None:
    wire, _ = _uncovered_pages_wire(b"\x07" * (2 * p.PAGE_SIZE), cover=False)
    dec = p.FrameDecoder(cover_page_data=True)
    dec.receive(wire)
    with pytest.raises(p.RemoteProtocolError, match="without TLS"):
        dec.next_event()
