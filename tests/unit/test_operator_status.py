"""Status helpers: conditions, events, figures and write throttling."""

from __future__ import annotations

import datetime as dt

from support.operator_world import NOW, agent

from colo_agent.api.models import Role
from colo_operator.status import (
    ConditionType,
    Reason,
    figures,
    merge_conditions,
    should_write,
    transition_events,
    true,
)

LATER = NOW + dt.timedelta(seconds=10)


def test_transition_time_kept_while_status_holds_and_moved_when_it_changes() -> None:
    first = merge_conditions(None, [true(ConditionType.READY, Reason.PRIMARY_SERVING, "a")], NOW, 1)
    assert first[0]["lastTransitionTime"] == "2026-11-25T20:00:00Z"
    same = merge_conditions(first, [true(ConditionType.READY, Reason.PRIMARY_SERVING, "b")], LATER, 2)
    assert same[0]["lastTransitionTime"] == "2026-11-25T20:00:00Z" and same[0]["observedGeneration"] == 2
    from colo_operator.status import false

    flipped = merge_conditions(same, [false(ConditionType.READY, Reason.PRIMARY_LOST)], LATER, 2)
    assert flipped[0]["lastTransitionTime"] == "2026-11-25T20:00:10Z"


def test_events_for_phase_and_condition_changes_only() -> None:
    before = {
        "phase": "Protected",
        "conditions": [{"type": "Ready", "status": "True", "reason": "PrimaryServing"}],
    }
    after = {
        "phase": "FailingOver",
        "message": "node lost",
        "conditions": [{"type": "Ready", "status": "False", "reason": "PrimaryLost", "message": "node lost"}],
    }
    notes = transition_events(before, after)
    assert [(n.type, n.reason) for n in notes] == [
        ("Warning", "PhaseFailingOver"),
        ("Warning", "PrimaryLost"),
    ]
    assert "Protected -> FailingOver: node lost" in notes[0].message
    assert transition_events(after, after) == []


def test_figures_and_rate() -> None:
    first = figures({}, agent(Role.PRIMARY, epoch=5, checkpoints=50).status, NOW)
    assert first["epoch"] == 5 and first["lastCheckpoint"]["observedAt"] == "2026-11-25T20:00:00Z"
    second = figures(first, agent(Role.PRIMARY, epoch=105, checkpoints=150).status, LATER)
    assert second["checkpoints"]["perSecond"] == 10.0
    assert second["lastCheckpoint"]["observedAt"] == "2026-11-25T20:00:10Z"
    # An agent restart resets its counters: no negative rate.
    third = figures(
        second, agent(Role.PRIMARY, epoch=1, checkpoints=3).status, LATER + dt.timedelta(seconds=1)
    )
    assert third["checkpoints"]["perSecond"] == 0.0
    # Without a report the last figures stay.
    assert figures(second, None, LATER) == second


def test_figures_alone_are_written_at_most_every_few_seconds() -> None:
    old = {"phase": "Protected", **figures({}, agent(Role.PRIMARY, epoch=5).status, NOW)}
    soon = {
        "phase": "Protected",
        **figures(old, agent(Role.PRIMARY, epoch=9).status, NOW + dt.timedelta(seconds=1)),
    }
    assert not should_write(old, soon, NOW + dt.timedelta(seconds=1))
    assert should_write(old, soon, NOW + dt.timedelta(seconds=6))
    assert should_write(old, {**soon, "phase": "Degraded"}, NOW + dt.timedelta(seconds=1))
    assert not should_write(old, dict(old), NOW + dt.timedelta(seconds=60))


def test_the_primarys_ack_age_is_kept_with_the_sample_it_was_measured_in() -> None:
    from dataclasses import replace

    report = replace(agent(Role.PRIMARY, epoch=5).status, ack_age_ms=42.25)
    out = figures({}, report, NOW)
    assert out["lastCheckpoint"]["ackAgeMs"] == 42.2 or out["lastCheckpoint"]["ackAgeMs"] == 42.3
    assert out["checkpoints"]["sampledAt"] == "2026-11-25T20:00:00Z"
    # An agent that does not report it (older, or a secondary) leaves it out.
    assert "ackAgeMs" not in figures({}, agent(Role.PRIMARY, epoch=5).status, NOW)["lastCheckpoint"]


def test_a_qemu_primarys_stream_figures_are_kept_and_a_micro_vm_primary_has_none() -> None:
    from dataclasses import replace

    from colo_agent.api.models import StreamFiguresStatus

    report = replace(agent(Role.PRIMARY, epoch=5).status, stream=StreamFiguresStatus("colo", 1, 3))
    out = figures({}, report, NOW)
    assert out["stream"] == {"state": "colo", "channels": 1, "mismatches": 3}
    # A new primary without a stream (the micro-VM's roles) does not inherit the old figures.
    assert "stream" not in figures(out, agent(Role.PRIMARY, epoch=6).status, LATER)
    # Without a report the last figures stay, as the others do.
    assert figures(out, None, LATER)["stream"] == out["stream"]
    # A change of the stream alone is a figure: written at most every few seconds.
    more = figures(out, replace(report, stream=StreamFiguresStatus("colo", 1, 4)), NOW)
    assert not should_write({"phase": "Protected", **out}, {"phase": "Protected", **more}, NOW)
