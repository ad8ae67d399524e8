from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from colo_agent.engine.output import OutputGate


def test_output_is_released_only_when_its_epoch_is_acknowledged() -> None:
    gate = OutputGate()
    gate.hold(1, b"+OK\r\n", False)
    e1 = gate.seal()
    gate.hold(1, b":1\r\n", False)
    assert gate.release_through(e1 - 1) == []
    released = gate.release_through(e1)
    assert [c.data for c in released] == [b"+OK\r\n"]
    assert gate.held_bytes == len(b":1\r\n")
    e2 = gate.seal()
    assert [c.data for c in gate.release_through(e2)] == [b":1\r\n"]
    assert gate.held_bytes == 0


@given(st.lists(st.tuples(st.integers(1, 4), st.binary(max_size=8), st.booleans()), max_size=60),
       st.data())
def test_release_keeps_order_and_never_jumps_an_epoch(events, data) -> None:  # type: ignore[no-untyped-def]
    gate = OutputGate()
    produced: list[tuple[int, bytes, int]] = []
    released: list[tuple[int, bytes, int]] = []
    acked = 0
    for conn, payload, seal in events:
        produced.append((conn, payload, gate.open_epoch))
        gate.hold(conn, payload, False)
        if seal:
            sealed = gate.seal()
            if data.draw(st.booleans()):
                acked = sealed
                for c in gate.release_through(acked):
                    released.append((c.conn, c.data, c.epoch))
                    assert c.epoch <= acked
    assert released == produced[: len(released)]
    assert all(epoch > acked for _, _, epoch in produced[len(released):])


def test_drop_connection_forgets_its_output_only() -> None:
    gate = OutputGate()
    gate.hold(1, b"a", False)
    gate.hold(2, b"bb", False)
    gate.drop_connection(1)
    assert gate.held_bytes == 2
    assert [c.conn for c in gate.release_all()] == [2]


def test_hold_is_safe_from_another_thread() -> None:
    gate = OutputGate()

    def produce() -> None:
        for i in range(2000):
            gate.hold(7, bytes([i % 256]), False)

    t = threading.Thread(target=produce)
    t.start()
    sealed = [gate.seal() for _ in range(50)]
    t.join()
    chunks = gate.release_all()
    assert len(chunks) == 2000
    assert [c.data[0] for c in chunks] == [i % 256 for i in range(2000)]
    assert [c.epoch for c in chunks] == sorted(c.epoch for c in chunks)
    assert sealed == list(range(1, 51))


def test_hold_says_when_an_epoch_starts_waiting() -> None:
    gate = OutputGate()
    assert gate.hold(1, b"a", False) is True
    assert gate.hold(2, b"b", False) is False
    gate.seal()
    assert gate.hold(1, b"c", False) is True
    gate.seal()
    gate.release_all()
    assert gate.hold(1, b"d", False) is True
