from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from colo_agent.engine.compare import Cause, Mark, OutputComparator


def _data(v) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join(r.data for r in v.releases)


def test_matching_output_is_released_at_once() -> None:
    c = OutputComparator(compare_timeout=0.1, max_queue=1 << 20)
    assert _data(c.primary_output(1, b"+OK\r\n", False, now=0.0, offset=0)) == b""
    v = c.secondary_output(0, 1, 0, b"+OK\r\n", False)
    assert _data(v) == b"+OK\r\n" and v.checkpoint is None and v.releases[0].on_match
    # The secondary may be first too.
    assert _data(c.secondary_output(0, 1, 5, b":1\r\n", False)) == b""
    assert _data(c.primary_output(1, b":1\r\n", False, now=0.0, offset=5)) == b":1\r\n"
    assert c.released_on_match == 9 and c.pending_bytes == 0


def test_mismatch_asks_for_a_checkpoint_and_holds_until_acknowledged() -> None:
    c = OutputComparator(compare_timeout=0.1, max_queue=1 << 20)
    c.primary_output(1, b"*2\r\n:1700000000\r\n", False, now=0.0, offset=0)
    v = c.secondary_output(0, 1, 0, b"*2\r\n:1700000001\r\n", False)
    assert v.checkpoint is Cause.MISMATCH and not v.releases
    # The forced checkpoint closes epoch 1 with everything the primary produced so far.
    later = c.primary_output(1, b"+PONG\r\n", False, now=0.01, offset=17)  # after that pause
    assert not later.releases
    v = c.acknowledged(Mark(1, {1: (len(b"*2\r\n:1700000000\r\n"), False)}))
    assert _data(v) == b"*2\r\n:1700000000\r\n" and not v.releases[0].on_match
    # The secondary, reset to the primary's state, produces the next reply the same way.
    v = c.secondary_output(1, 1, len(b"*2\r\n:1700000000\r\n"), b"+PONG\r\n", False)
    assert _data(v) == b"+PONG\r\n"


def test_unmatched_output_times_out() -> None:
    c = OutputComparator(compare_timeout=0.1, max_queue=1 << 20)
    c.primary_output(3, b"+OK\r\n", False, now=10.0, offset=0)
    assert c.next_deadline() == 10.1
    assert c.handle_timer(10.05).checkpoint is None
    assert c.handle_timer(10.1).checkpoint is Cause.TIMEOUT


def test_queue_limit_asks_for_a_checkpoint() -> None:
    c = OutputComparator(compare_timeout=1.0, max_queue=10)
    assert c.primary_output(1, b"x" * 11, False, now=0.0, offset=0).checkpoint is Cause.TIMEOUT


def test_output_of_a_later_generation_waits_for_its_acknowledgement() -> None:
    c = OutputComparator(compare_timeout=1.0, max_queue=1 << 20)
    c.primary_output(1, b"ab", False, now=0.0, offset=0)
    assert not c.secondary_output(1, 1, 0, b"ab", False).releases  # generation 1 not acked yet
    v = c.acknowledged(Mark(1, {}))
    assert _data(v) == b"ab" and v.releases[0].on_match
    assert not c.secondary_output(0, 1, 2, b"zz", False).releases  # stale generation: ignored


def test_repeated_output_below_an_acknowledged_offset_is_skipped() -> None:
    c = OutputComparator(compare_timeout=1.0, max_queue=1 << 20)
    c.primary_output(1, b"abcd", False, now=0.0, offset=0)
    assert _data(c.acknowledged(Mark(1, {1: (4, False)}))) == b"abcd"
    c.primary_output(1, b"ef", False, now=0.0, offset=4)
    # Reset to the mark at offset 2 (an older pause): bytes 2..4 come again, then new ones.
    c.acknowledged(Mark(2, {1: (2, False)}))
    assert _data(c.secondary_output(2, 1, 2, b"cdef", False)) == b"ef"


def test_close_is_released_when_both_closed() -> None:
    c = OutputComparator(compare_timeout=1.0, max_queue=1 << 20)
    c.primary_output(5, b"-ERR Protocol error\r\n", True, now=0.0, offset=0)
    v = c.secondary_output(0, 5, 0, b"-ERR Protocol error\r\n", True)
    assert v.releases[-1].closed and _data(v) == b"-ERR Protocol error\r\n"


@given(st.lists(st.binary(min_size=1, max_size=6), max_size=20), st.data())
@settings(max_examples=200)
def test_identical_streams_in_any_interleaving_release_everything_in_order(chunks, data) -> None:  # type: ignore[no-untyped-def]
    c = OutputComparator(compare_timeout=1.0, max_queue=1 << 20)
    p = list(chunks)
    s = list(chunks)
    pri_off = sec_off = 0
    out = b""
    while p or s:
        if p and (not s or data.draw(st.booleans())):
            chunk = p.pop(0)
            v = c.primary_output(1, chunk, False, now=0.0, offset=pri_off)
            pri_off += len(chunk)
        else:
            chunk = s.pop(0)
            v = c.secondary_output(0, 1, sec_off, chunk, False)
            sec_off += len(chunk)
        assert v.checkpoint is None
        out += _data(v)
    assert out == b"".join(chunks)


@given(st.binary(min_size=1, max_size=20), st.binary(min_size=1, max_size=20))
def test_nothing_is_released_on_match_beyond_the_common_prefix(a: bytes, b: bytes) -> None:
    c = OutputComparator(compare_timeout=1.0, max_queue=1 << 20)
    out = _data(c.primary_output(1, a, False, now=0.0, offset=0))
    out += _data(c.secondary_output(0, 1, 0, b, False))
    assert a.startswith(out) and b.startswith(out)


def test_acknowledgement_releases_only_what_was_produced_before_its_pause() -> None:
    # A comparator made for a later pairing: the connection had produced 1000 bytes before
    # it (released through the gate); these 5 came after the pause the mark describes.
    c = OutputComparator(compare_timeout=0.1, max_queue=1 << 20)
    c.primary_output(7, b"+OK\r\n", False, now=0.0, offset=1000)
    v = c.acknowledged(Mark(3, {7: (1000, False)}))
    assert not v.releases and c.pending_bytes == 5
    # They leave once the secondary, restarted at offset 1000, produced the same bytes...
    v = c.secondary_output(3, 7, 1000, b"+OK\r\n", False)
    assert _data(v) == b"+OK\r\n" and v.releases[0].on_match
    # ...and the streams stay lined up: a different reply is a mismatch, not a match.
    c.primary_output(7, b":1\r\n", False, now=0.0, offset=1005)
    v = c.secondary_output(3, 7, 1005, b":2\r\n", False)
    assert v.checkpoint is Cause.MISMATCH and not v.releases


def test_acknowledgement_releases_the_pending_bytes_below_its_mark_and_no_more() -> None:
    c = OutputComparator(compare_timeout=0.1, max_queue=1 << 20)
    c.primary_output(7, b"+OK\r\n+OK\r\n", False, now=0.0, offset=995)  # the pause fell at 1000
    v = c.acknowledged(Mark(3, {7: (1000, False)}))
    assert _data(v) == b"+OK\r\n" and not v.releases[0].on_match
    assert c.pending_bytes == 5
    # A mark beyond everything seen releases what is pending, and later output lines up there.
    v = c.acknowledged(Mark(4, {7: (1200, False)}))
    assert _data(v) == b"+OK\r\n" and c.pending_bytes == 0
    c.primary_output(7, b"+OK\r\n", False, now=0.0, offset=1200)
    assert _data(c.secondary_output(4, 7, 1200, b"+OK\r\n", False)) == b"+OK\r\n"


def test_a_connection_of_the_mark_lines_up_when_the_secondary_speaks_first() -> None:
    c = OutputComparator(compare_timeout=0.1, max_queue=1 << 20)
    c.acknowledged(Mark(2, {9: (40, False)}))
    v = c.secondary_output(2, 9, 40, b"+OK\r\n", False)
    assert v.checkpoint is None and not v.releases
    assert _data(c.primary_output(9, b"+OK\r\n", False, now=0.0, offset=40)) == b"+OK\r\n"
