"""The device state of a lockstep checkpoint: the machine's, plus the output offsets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from colo_agent.engine.lockstep import pack_state, unpack_state


@given(st.binary(max_size=100), st.dictionaries(st.integers(1, 2**32 - 1),
                                                 st.tuples(st.integers(0, 2**63), st.booleans())))
def test_lockstep_state_round_trip(machine: bytes, offsets: dict[int, tuple[int, bool]]) -> None:
    assert unpack_state(pack_state(machine, offsets)) == (machine, offsets)


def test_checkpoint_state_is_not_mistaken_for_lockstep() -> None:
    with pytest.raises(ValueError, match="lockstep"):
        unpack_state(b"COLO" + bytes(40))


small_offsets = st.dictionaries(st.integers(1, 9), st.tuples(st.integers(0, 99), st.booleans()), max_size=3)


@given(st.binary(max_size=40), small_offsets, st.data())
def test_a_truncated_or_padded_state_is_a_value_error(
    machine: bytes, offsets: dict[int, tuple[int, bool]], data: st.DataObject
) -> None:
    blob = pack_state(machine, offsets)
    cut = data.draw(st.integers(0, len(blob) - 1))
    for bad in (blob[:cut], blob + b"\0"):
        with pytest.raises(ValueError):
            unpack_state(bad)
