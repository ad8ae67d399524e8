from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from colo_agent.replication.mirror import (
    Input,
    MirrorDecoder,
    MirrorProtocolError,
    Output,
    encode,
    pack_state,
    unpack_state,
)

messages = st.one_of(
    st.builds(Input, st.integers(0, 2**63), st.integers(0, 2**32 - 1), st.binary(max_size=300)),
    st.builds(Output, st.integers(0, 2**63), st.integers(0, 2**32 - 1), st.integers(0, 2**63),
              st.binary(max_size=300), st.booleans()),
)


@given(st.lists(messages, max_size=10), st.integers(1, 64))
def test_round_trip_in_any_split(msgs, step) -> None:  # type: ignore[no-untyped-def]
    wire = b"".join(encode(m) for m in msgs)
    dec = MirrorDecoder()
    out = []
    for i in range(0, len(wire), step):
        dec.receive(wire[i : i + step])
        while (m := dec.next_message()) is not None:
            out.append(m)
    assert out == msgs


@given(messages, st.data())
def test_any_corruption_is_a_protocol_error_or_waits(msg, data) -> None:  # type: ignore[no-untyped-def]
    wire = bytearray(encode(msg))
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] ^= data.draw(st.integers(1, 255))
    dec = MirrorDecoder()
    dec.receive(bytes(wire))
    try:
        got = dec.next_message()
    except MirrorProtocolError:
        return
    # Only a corrupted length can make it wait; nothing corrupt is ever delivered.
    assert got is None and i in range(8, 12)


def test_unknown_type_is_refused() -> None:
    wire = bytearray(encode(Input(1, 0, b"x")))
    wire[5] = 9
    dec = MirrorDecoder()
    dec.receive(bytes(wire))
    with pytest.raises(MirrorProtocolError, match="unknown mirror message type 9"):
        dec.next_message()


@given(st.binary(max_size=100), st.dictionaries(st.integers(1, 2**32 - 1),
                                                 st.tuples(st.integers(0, 2**63), st.booleans())))
def test_lockstep_state_round_trip(machine, offsets) -> None:  # type: ignore[no-untyped-def]
    assert unpack_state(pack_state(machine, offsets)) == (machine, offsets)


def test_checkpoint_state_is_not_mistaken_for_lockstep() -> None:
    with pytest.raises(ValueError, match="lockstep"):
        unpack_state(b"COLO" + bytes(40))
