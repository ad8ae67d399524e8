"""The stream pairing's state machine (`replication.stream`), time as an input."""

from __future__ import annotations

import pytest

from colo_agent.replication import protocol as p
from colo_agent.replication.session import CONTROL, Closed, PeerLost, Send, Yank
from colo_agent.replication.stream import StreamSession, StreamState, TargetKnown

HB, TIMEOUT = 0.1, 0.5


def pair(now: float = 0.0) -> tuple[StreamSession, StreamSession]:
    primary = StreamSession(p.Role.PRIMARY, 3, now, heartbeat_interval=HB, heartbeat_timeout=TIMEOUT,
                            target_timeout=2.0)
    secondary = StreamSession(p.Role.SECONDARY, 3, now, heartbeat_interval=HB, heartbeat_timeout=TIMEOUT,
                              target="10.0.0.2:7713:7714")
    return primary, secondary


def sent(actions: list[object]) -> list[p.Message]:
    return [a.message for a in actions if isinstance(a, Send) and a.channel == CONTROL]


def test_the_secondary_announces_its_target_and_the_primary_learns_it() -> None:
    primary, secondary = pair()
    first = sent(secondary.start())
    assert first == [p.StreamTarget(3, "10.0.0.2:7713:7714")]
    assert primary.state is StreamState.WAIT_TARGET
    assert primary.receive(first[0], 0.01) == [TargetKnown("10.0.0.2:7713:7714")]
    assert primary.state is StreamState.PAIRED and primary.target == "10.0.0.2:7713:7714"


def test_heartbeats_carry_the_primarys_checkpoints_to_the_secondary() -> None:
    primary, secondary = pair()
    primary.receive(sent(secondary.start())[0], 0.0)
    primary.report(41)
    primary.report(40)  # a count never goes back
    beats = sent(primary.handle_timer(0.0))
    assert beats == [p.Heartbeat(3, 1, 41)]
    assert secondary.receive(beats[0], 0.01) == []
    assert secondary.checkpoints == 41
    assert sent(primary.handle_timer(0.05)) == []  # not due yet
    assert sent(primary.handle_timer(0.1)) == [p.Heartbeat(3, 2, 41)]


def test_silence_past_the_timeout_loses_the_peer_and_yanks() -> None:
    primary, secondary = pair()
    primary.receive(sent(secondary.start())[0], 0.0)
    assert primary.next_deadline() == 0.0
    primary.handle_timer(0.0)
    assert [type(a) for a in primary.handle_timer(0.49)] == [Send]  # alive until the timeout
    out = primary.handle_timer(0.5)
    assert [type(a) for a in out] == [Yank, PeerLost]
    assert primary.state is StreamState.ENDED and primary.next_deadline() is None
    assert "no word from the peer" in (primary.failure or "")
    assert primary.handle_timer(9.0) == []  # ended stays ended


def test_a_secondary_that_never_says_where_to_stream_is_given_up() -> None:
    primary, _ = pair()
    for t in (0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8):
        primary.receive(p.Heartbeat(3, 1, 0), t)  # alive, but no target
        primary.handle_timer(t)
    assert primary.next_deadline() is not None and primary.next_deadline() <= 2.0  # type: ignore[operator]
    out = primary.handle_timer(2.0)
    assert PeerLost("the secondary announced no stream target in time") in out


def test_goodbye_and_close_end_the_pairing_in_order() -> None:
    primary, secondary = pair()
    primary.receive(sent(secondary.start())[0], 0.0)
    out = secondary.close("promoted")
    assert sent(out) == [p.Goodbye(p.GoodbyeReason.SHUTDOWN, "promoted")]
    assert isinstance(out[-1], Closed)
    bye = primary.receive(sent(out)[0], 0.1)
    assert bye == [Closed("secondary said goodbye (shutdown): promoted")]
    assert primary.state is StreamState.ENDED


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (p.Heartbeat(2, 1, 0), "heartbeat of term 2"),
        (p.StreamTarget(4, "a:1:2"), "stream target of term 4"),
        (p.Ack(3, 1), "Ack has no place"),
    ],
)
def test_a_wrong_term_or_foreign_message_is_the_peers_error(message: p.Message, error: str) -> None:
    primary, _ = pair()
    with pytest.raises(p.RemoteProtocolError, match=error):
        primary.receive(message, 0.0)


def test_a_second_target_or_one_from_the_primary_is_refused() -> None:
    primary, secondary = pair()
    target = sent(secondary.start())[0]
    primary.receive(target, 0.0)
    with pytest.raises(p.RemoteProtocolError, match="unexpected stream target while paired"):
        primary.receive(target, 0.0)
    with pytest.raises(p.RemoteProtocolError, match="unexpected stream target"):
        secondary.receive(target, 0.0)


def test_a_primary_count_that_goes_back_is_refused() -> None:
    _, secondary = pair()
    secondary.receive(p.Heartbeat(3, 1, 9), 0.0)
    with pytest.raises(p.RemoteProtocolError, match="went back from 9 to 8"):
        secondary.receive(p.Heartbeat(3, 2, 8), 0.1)


def test_roles_and_targets_must_agree() -> None:
    with pytest.raises(p.LocalProtocolError):
        StreamSession(p.Role.PRIMARY, 1, 0.0, heartbeat_interval=HB, heartbeat_timeout=TIMEOUT, target="x")
    with pytest.raises(p.LocalProtocolError):
        StreamSession(p.Role.SECONDARY, 1, 0.0, heartbeat_interval=HB, heartbeat_timeout=TIMEOUT)
