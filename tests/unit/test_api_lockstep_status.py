from __future__ import annotations

import json

from colo_agent.api.models import (
    AgentStatus,
    GuestStatus,
    LockstepFigures,
    PeerState,
    PeerStatus,
    ReplicationMode,
    Role,
)


def _status(lockstep: LockstepFigures | None) -> AgentStatus:
    return AgentStatus(role=Role.PRIMARY, term=3, last_acked_epoch=9, mode=ReplicationMode.LOCKSTEP,
                       peer=PeerStatus(PeerState.CONNECTED), guest=GuestStatus("running", "tcg", 64 << 20),
                       lockstep=lockstep)


def test_lockstep_figures_round_trip() -> None:
    st = _status(LockstepFigures(released_on_match_bytes=500, released_on_ack_bytes=7, queue_bytes=3))
    doc = json.loads(st.to_json())
    assert doc["lockstep"] == {"releasedOnMatchBytes": 500, "releasedOnAckBytes": 7, "queueBytes": 3}
    assert AgentStatus.from_json(st.to_json()) == st


def test_status_without_lockstep_has_no_such_key_and_older_readers_parse_it() -> None:
    st = _status(None)
    assert "lockstep" not in json.loads(st.to_json())
    assert AgentStatus.from_json(st.to_json()).lockstep is None
