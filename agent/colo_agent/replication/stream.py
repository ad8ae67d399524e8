"""The pairing of two agents whose backend replicates itself (a migration stream), sans-IO.

QEMU's COLO carries the guest's state on its own connections; what the
agents still exchange is small, and goes over one authenticated control
connection (the same handshake and TLS as every replication connection)::

    secondary -> primary   STREAM_TARGET(term, address)   once, first
    both ways              HEARTBEAT(term, seq, acked)    every interval
    either                 GOODBYE                        orderly end

`address` is where the secondary's backend receives the stream (QEMU:
`HOST:MIGRATION_PORT:NBD_PORT`); the primary's engine hands it to
`MigrationStream.protect` unread. In the primary's heartbeats `acked_epoch`
counts the backend's checkpoints in this term: the secondary learns from it
that it holds a complete image (a promotion resumes from it) and of which
epoch, which is what the epoch floor is compared with.

`StreamSession` is one explicit `(state, event)` table for both roles; time
is an input (`next_deadline()` / `handle_timer(now)`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from colo_agent.replication.protocol import (
    Goodbye,
    GoodbyeReason,
    Heartbeat,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    Role,
    StreamTarget,
)
from colo_agent.replication.session import CONTROL, Action, Closed, PeerLost, Send, Yank, _Liveness

__all__ = ["StreamSession", "StreamState", "TargetKnown"]


@dataclass(frozen=True)
class TargetKnown:
    """Primary: the secondary's backend is ready to receive the stream at `address`."""

    address: str


class StreamState(enum.Enum):
    WAIT_TARGET = "waiting for the secondary's stream target"  # primary only
    PAIRED = "paired"
    ENDED = "ended"


class _E(enum.Enum):
    TARGET = "stream target"
    HEARTBEAT = "heartbeat"
    GOODBYE = "goodbye"
    TIMER = "timer"
    LOST = "connection lost"
    CLOSE = "close"


_MESSAGE_EVENTS: Final[dict[type, _E]] = {
    StreamTarget: _E.TARGET, Heartbeat: _E.HEARTBEAT, Goodbye: _E.GOODBYE,
}


class StreamSession:
    """One side of a stream pairing.

    Primary: `StreamSession(Role.PRIMARY, term, now, ...)`, then feed it the
    secondary's messages; `TargetKnown` says where to stream. `report(n)`
    sets the checkpoint count its heartbeats carry. Secondary:
    `StreamSession(Role.SECONDARY, term, now, ..., target=address)`;
    `start()` returns the STREAM_TARGET to send; `checkpoints` is the
    primary's last reported count.
    """

    def __init__(
        self, role: Role, term: int, now: float, *, heartbeat_interval: float, heartbeat_timeout: float,
        target: str | None = None, target_timeout: float | None = None,
    ) -> None:
        if (role is Role.SECONDARY) != (target is not None):
            raise LocalProtocolError("a secondary announces a stream target; a primary receives one")
        self.role = role
        self.term = term
        self.target = target
        self.checkpoints = 0
        self.failure: str | None = None
        self._live = _Liveness(heartbeat_interval, heartbeat_timeout, now)
        # A secondary's backend is ready before it dials; waiting longer than this is a stuck peer.
        self._target_due = None if target_timeout is None else now + target_timeout
        self.state = StreamState.WAIT_TARGET if role is Role.PRIMARY else StreamState.PAIRED
        S = StreamState
        self._table: dict[tuple[StreamState, _E], Callable[..., StreamState]] = {
            (S.WAIT_TARGET, _E.TARGET): self._on_target,
            (S.WAIT_TARGET, _E.HEARTBEAT): self._on_heartbeat,
            (S.PAIRED, _E.HEARTBEAT): self._on_heartbeat,
            (S.WAIT_TARGET, _E.GOODBYE): self._on_goodbye,
            (S.PAIRED, _E.GOODBYE): self._on_goodbye,
            (S.WAIT_TARGET, _E.TIMER): self._on_timer,
            (S.PAIRED, _E.TIMER): self._on_timer,
            (S.WAIT_TARGET, _E.LOST): self._on_lost,
            (S.PAIRED, _E.LOST): self._on_lost,
            (S.WAIT_TARGET, _E.CLOSE): self._on_close,
            (S.PAIRED, _E.CLOSE): self._on_close,
            (S.ENDED, _E.TIMER): self._stay,
            (S.ENDED, _E.LOST): self._stay,
            (S.ENDED, _E.CLOSE): self._stay,
            (S.ENDED, _E.HEARTBEAT): self._stay,
            (S.ENDED, _E.GOODBYE): self._stay,
            (S.ENDED, _E.TARGET): self._stay,
        }

    def _dispatch(self, event: _E, *args: object) -> list[Action | TargetKnown]:
        handler = self._table.get((self.state, event))
        if handler is None:
            raise RemoteProtocolError(
                f"{self.role.name.lower()}: unexpected {event.value} while {self.state.value}")
        out: list[Action | TargetKnown] = []
        self.state = handler(out, *args)
        return out

    # -- inputs -------------------------------------------------------------------------

    @property
    def last_heard(self) -> float:
        return self._live.last_heard

    def start(self) -> list[Action | TargetKnown]:
        """Secondary: what to send first."""
        if self.target is None:
            raise LocalProtocolError("only a secondary announces a stream target")
        return [Send(CONTROL, StreamTarget(self.term, self.target))]

    def report(self, checkpoints: int) -> None:
        """Primary: the backend's checkpoints in this term so far (heartbeats carry it)."""
        self.checkpoints = max(self.checkpoints, checkpoints)

    def receive(self, message: Message, now: float) -> list[Action | TargetKnown]:
        event = _MESSAGE_EVENTS.get(type(message))
        if event is None:
            raise RemoteProtocolError(f"{type(message).__name__} has no place in a stream pairing")
        self._live.heard(now)
        return self._dispatch(event, message)

    def connection_lost(self, reason: str) -> list[Action | TargetKnown]:
        return self._dispatch(_E.LOST, reason)

    def close(self, reason: str = "shutting down") -> list[Action | TargetKnown]:
        return self._dispatch(_E.CLOSE, reason)

    def next_deadline(self) -> float | None:
        if self.state is StreamState.ENDED:
            return None
        due = self._live.deadline()
        if self.state is StreamState.WAIT_TARGET and self._target_due is not None:
            due = min(due, self._target_due)
        return due

    def handle_timer(self, now: float) -> list[Action | TargetKnown]:
        return self._dispatch(_E.TIMER, now)

    # -- handlers -----------------------------------------------------------------------

    def _on_target(self, out: list[Action | TargetKnown], msg: StreamTarget) -> StreamState:
        if self.role is not Role.PRIMARY:
            raise RemoteProtocolError("a primary sent a stream target")
        self._check_term(msg.term, "stream target")
        self.target = msg.address
        out.append(TargetKnown(msg.address))
        return StreamState.PAIRED

    def _on_heartbeat(self, out: list[Action | TargetKnown], hb: Heartbeat) -> StreamState:
        self._check_term(hb.term, "heartbeat")
        if self.role is Role.SECONDARY:
            if hb.acked_epoch < self.checkpoints:
                raise RemoteProtocolError(
                    f"the primary's checkpoint count went back from {self.checkpoints} to {hb.acked_epoch}")
            self.checkpoints = hb.acked_epoch
        return self.state

    def _on_goodbye(self, out: list[Action | TargetKnown], bye: Goodbye) -> StreamState:
        peer = "secondary" if self.role is Role.PRIMARY else "primary"
        out.append(Closed(f"{peer} said goodbye ({bye.reason.name.lower()}): {bye.text}"))
        return StreamState.ENDED

    def _on_timer(self, out: list[Action | TargetKnown], now: float) -> StreamState:
        if self._live.lost(now):
            return self._fail(out, f"no word from the peer for {now - self._live.last_heard:.3f}s")
        if self.state is StreamState.WAIT_TARGET and self._target_due is not None and now >= self._target_due:
            return self._fail(out, "the secondary announced no stream target in time")
        if self._live.due(now):
            out.append(Send(CONTROL, Heartbeat(self.term, self._live.seq, self.checkpoints)))
        return self.state

    def _on_lost(self, out: list[Action | TargetKnown], reason: str) -> StreamState:
        return self._fail(out, f"connection lost: {reason}")

    def _on_close(self, out: list[Action | TargetKnown], reason: str) -> StreamState:
        out.append(Send(CONTROL, Goodbye(GoodbyeReason.SHUTDOWN, reason)))
        out.append(Closed(reason))
        return StreamState.ENDED

    def _stay(self, out: list[Action | TargetKnown], *args: object) -> StreamState:
        return self.state

    def _fail(self, out: list[Action | TargetKnown], reason: str) -> StreamState:
        self.failure = reason
        out.append(Yank(reason))
        out.append(PeerLost(reason))
        return StreamState.ENDED

    def _check_term(self, term: int, what: str) -> None:
        if term != self.term:
            raise RemoteProtocolError(f"{what} of term {term} in a pairing of term {self.term}")
