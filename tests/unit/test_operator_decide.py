"""The reconcile decision over snapshots: creation, protection, failover, switchover, re-protection."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from typing import Any

from support.operator_world import (
    NOW,
    UNREACHABLE,
    agent,
    lost_primary_world,
    node,
    nodes,
    pod,
    protected_status,
    world,
)

from colo_agent.api.models import PeerState, Role
from colo_agent.constants import EXIT_NEVER_SERVED
from colo_operator import constants as c
from colo_operator.decide import (
    CheckpointAgent,
    CreatePod,
    DeletePod,
    DemoteAgent,
    EnsureObjects,
    LabelPod,
    Plan,
    PromoteAgent,
    Step,
    Transition,
    TransitionKind,
    decide,
)
from colo_operator.snapshot import LeaseView, NodeHealth, Snapshot


def cond(plan: Plan, kind: str) -> dict:
    return next(x for x in plan.status["conditions"] if x["type"] == kind)


def kinds(plan: Plan) -> list[type]:
    return [type(a) for a in plan.actions]


# --------------------------------------------------------------------------- creation


def test_new_vm_creates_base_objects_and_primary_first() -> None:
    plan = decide(world(status={}, pods=(), agents={}, lease=None))
    assert kinds(plan) == [EnsureObjects, CreatePod]
    create = plan.actions[1]
    assert isinstance(create, CreatePod)
    assert (create.name, create.role, create.peer, create.serial) == ("vm-0", "primary", None, 0)
    assert plan.status["phase"] == "Pending"
    assert plan.status["currentPrimary"] == plan.status["targetPrimary"] == "vm-0"
    assert plan.status["podSerial"] == 1
    assert cond(plan, "Ready")["status"] == "False"


def test_primary_created_by_an_interrupted_run_is_adopted_not_duplicated() -> None:
    s = world(status={"observedGeneration": 1}, pods=(pod("vm-0", "primary", None),), agents={})
    plan = decide(s)
    assert not any(isinstance(a, CreatePod) for a in plan.actions)
    assert plan.status["currentPrimary"] == "vm-0"
    assert plan.status["phase"] == "Pending"


def test_no_ready_node_for_the_primary_stays_pending_with_reason() -> None:
    s = world(status={}, pods=(), agents={}, node_views=nodes(node("n1", NodeHealth.NOT_READY)))
    plan = decide(s)
    assert not any(isinstance(a, CreatePod) for a in plan.actions)
    assert plan.status["phase"] == "Pending"
    assert cond(plan, "Ready")["reason"] == "NoSpareNode"
    assert "n1: NotReady" in plan.status["message"]


def test_serving_primary_gets_a_secondary_on_another_domain() -> None:
    st = protected_status(phase="Pending", podSerial=1, secondary={})
    s = world(
        status=st,
        pods=(pod("vm-0", "primary", "n1"),),
        agents={"vm-0": agent(Role.PRIMARY, peer=PeerState.NONE)},
    )
    plan = decide(s)
    (create,) = [a for a in plan.actions if isinstance(a, CreatePod)]
    assert create.role == "secondary" and create.name == "vm-1"
    assert create.peer == "10.0.0.10:7700"
    assert create.place.excluded_domains == ("n1",)
    assert set(create.place.candidates) == {"n2", "n3"}
    assert plan.status["phase"] == "Syncing"
    assert plan.status["podSerial"] == 2
    assert cond(plan, "Ready")["status"] == "True"


def test_secondary_during_first_sync_is_syncing_then_protected() -> None:
    syncing = world(
        status=protected_status(phase="Syncing", secondary={"pod": "vm-1", "synced": False}),
        agents={
            "vm-0": agent(Role.PRIMARY, synced=False, peer=PeerState.SYNCING),
            "vm-1": agent(Role.SECONDARY, synced=False, peer=PeerState.SYNCING, epoch=0),
        },
    )
    plan = decide(syncing)
    assert plan.status["phase"] == "Syncing"
    assert cond(plan, "Synced")["reason"] == "FirstSyncInProgress"
    protected = decide(world(status=plan.status))
    assert protected.status["phase"] == "Protected"
    assert cond(protected, "Protected")["status"] == "True"
    assert protected.status["secondary"]["synced"] is True
    assert any(e.reason == "PhaseProtected" for e in protected.events)


def test_protected_steady_state_does_nothing_and_keeps_transition_times() -> None:
    first = decide(world())
    assert first.actions == ()
    later = decide(world(status=first.status, now=NOW + dt.timedelta(seconds=30)))
    assert later.actions == ()
    assert cond(later, "Protected")["lastTransitionTime"] == cond(first, "Protected")["lastTransitionTime"]
    assert later.events == ()
    assert later.status["epoch"] == 5
    assert later.status["lastCheckpoint"]["pauseMs"] == 1.25


def test_spec_change_reapplies_base_objects() -> None:
    plan = decide(world(status=protected_status(observedGeneration=1), spec={}, now=NOW))
    assert EnsureObjects not in kinds(plan)
    s = world()
    s = replace(s, vm=replace(s.vm, generation=2))
    plan = decide(s)
    assert kinds(plan) == [EnsureObjects]
    assert plan.status["observedGeneration"] == 2


# --------------------------------------------------------------------------- placement failures


def test_no_spare_node_for_the_secondary_is_degraded_with_a_clear_message() -> None:
    st = protected_status(phase="Syncing", podSerial=1, secondary={})
    s = world(
        status=st,
        pods=(pod("vm-0", "primary", "n1"),),
        node_views=nodes(node("n1"), node("n2", NodeHealth.NOT_READY), node("n3", unschedulable=True)),
        agents={"vm-0": agent(Role.PRIMARY, peer=PeerState.NONE)},
    )
    plan = decide(s)
    assert not any(isinstance(a, CreatePod) for a in plan.actions)
    assert plan.status["phase"] == "Degraded"
    protected = cond(plan, "Protected")
    assert protected["reason"] == "NoSpareNode"
    assert "n2: NotReady" in protected["message"] and "n3: cordoned" in protected["message"]
    # The primary keeps serving.
    assert cond(plan, "Ready")["status"] == "True"


def test_unschedulable_secondary_pod_is_reported_as_no_spare_node() -> None:
    pending = pod("vm-1", "secondary", None, unschedulable=True, problem="0/3 nodes are available")
    s = world(
        status=protected_status(phase="Syncing"),
        pods=(pod("vm-0", "primary", "n1"), pending),
        agents={"vm-0": agent(Role.PRIMARY, peer=PeerState.NONE)},
    )
    plan = decide(s)
    assert plan.status["phase"] == "Degraded"
    assert cond(plan, "Protected")["reason"] == "NoSpareNode"
    assert "0/3 nodes" in cond(plan, "Protected")["message"]


# --------------------------------------------------------------------------- failover


def test_node_unknown_but_heartbeats_flowing_waits() -> None:
    s = world(
        node_views=nodes(node("n1", NodeHealth.UNKNOWN), node("n2"), node("n3")),
        agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.SECONDARY)},
    )
    plan = decide(s)
    assert plan.actions == ()
    assert "transition" not in plan.status
    assert plan.status["phase"] == "Protected"
    ready = cond(plan, "Ready")
    assert (ready["status"], ready["reason"]) == ("Unknown", "PrimaryUncertain")
    assert "still receives heartbeats" in ready["message"]


def test_node_unknown_and_secondary_unreachable_waits() -> None:
    s = world(
        node_views=nodes(node("n1", NodeHealth.UNKNOWN), node("n2"), node("n3")),
        agents={"vm-0": UNREACHABLE, "vm-1": UNREACHABLE},
    )
    plan = decide(s)
    assert plan.actions == () and "transition" not in plan.status
    assert cond(plan, "Ready")["status"] == "Unknown"


def test_operator_cut_off_from_a_primary_its_secondary_still_hears_waits() -> None:
    s = world(agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.SECONDARY)})
    plan = decide(s)
    assert plan.actions == () and "transition" not in plan.status


def test_lost_primary_records_the_pending_step_before_asking_anything() -> None:
    plan = decide(lost_primary_world())
    # No agent is asked yet; the lost primary only leaves the Service.
    assert plan.actions == (LabelPod("vm-0", "fenced"),)
    t = plan.status["transition"]
    assert (t["kind"], t["step"], t["from"], t["to"], t["term"]) == ("Failover", "Promote", "vm-0", "vm-1", 2)
    assert t["cause"] == "NodeUnknown" and t["fromNode"] == "n1"
    assert plan.status["targetPrimary"] == "vm-1" and plan.status["currentPrimary"] == "vm-0"
    assert plan.status["phase"] == "FailingOver"
    assert plan.again
    assert any(e.reason == "FailoverStarted" and e.type == "Warning" for e in plan.events)


def test_unreachable_agent_on_ready_node_with_peer_lost_fails_over() -> None:
    s = world(agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.SECONDARY, peer=PeerState.LOST)})
    assert decide(s).status["transition"]["cause"] == "AgentUnreachable"


def test_stale_heartbeat_counts_as_lost() -> None:
    s = world(
        node_views=nodes(node("n1", NodeHealth.NOT_READY), node("n2"), node("n3")),
        agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.SECONDARY, heartbeat_age_ms=900.0)},
    )
    assert decide(s).status["transition"]["cause"] == "NodeNotReady"


def test_deleted_primary_pod_fails_over_at_once() -> None:
    s = world(pods=(pod("vm-0", "primary", "n1", deleting=True), pod("vm-1", "secondary", "n2")))
    assert decide(s).status["transition"]["cause"] == "PodDeleted"


def test_full_failover_sequence_then_reprotection_away_from_both_nodes() -> None:
    start = decide(lost_primary_world())
    assert start.actions == (LabelPod("vm-0", "fenced"),)
    # Step 2: ask the secondary to take the Lease with term 2 and promote; once it answered,
    # move the Service to it and drop the lost pod, in the same plan.
    s = lost_primary_world(
        status=start.status,
        pods=(pod("vm-0", "fenced", "n1"), pod("vm-1", "secondary", "n2")),
        now=NOW + dt.timedelta(milliseconds=800),
    )
    done = decide(s)
    assert done.actions == (
        PromoteAgent("vm-1", 2),
        LabelPod("vm-1", c.ROLE_PRIMARY),
        DeletePod("vm-0", force=True, why="replaced by vm-1 in term 2"),
    )
    s = replace(s, agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.PRIMARY, term=2, peer=PeerState.NONE)},
                lease=LeaseView(holder="vm-1", term=2))
    st = done.status
    assert "transition" not in st
    assert (st["currentPrimary"], st["targetPrimary"], st["term"], st["failovers"]) == ("vm-1", "vm-1", 2, 1)
    assert st["lastFailover"]["durationMs"] == 800.0
    assert st["lastFailover"]["cause"] == "NodeUnknown"
    assert st["phase"] == "Degraded"
    assert any(e.reason == "Promoted" for e in done.events)
    # Step 4: re-protect. The lost node may come back: neither n1 nor n2 may take the secondary.
    after = replace(
        s,
        vm=replace(s.vm, status=st),
        pods=(pod("vm-1", "primary", "n2"),),
    )
    reprotect = decide(after)
    (create,) = [a for a in reprotect.actions if isinstance(a, CreatePod)]
    assert create.name == "vm-2" and create.role == "secondary"
    assert create.place.candidates == ("n3",)
    assert set(create.place.excluded_nodes) == {"n1", "n2"}
    assert create.peer == "10.0.0.11:7700"


def test_restart_mid_failover_resumes_without_promoting_twice() -> None:
    start = decide(lost_primary_world())
    # The promote call succeeded but the operator died before writing step Relabel.
    s = lost_primary_world(status=start.status, lease=LeaseView(holder="vm-1", term=2))
    s = replace(s, agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.PRIMARY, term=2)})
    plan = decide(s)
    assert not any(isinstance(a, PromoteAgent) for a in plan.actions)
    assert LabelPod("vm-1", c.ROLE_PRIMARY) in plan.actions
    assert plan.status["currentPrimary"] == "vm-1"


def test_transition_in_status_is_plain_strings_that_read_back_the_same() -> None:
    raw = decide(lost_primary_world()).status["transition"]
    # What an operator restarted mid-failover (of this or an earlier version) reads back.
    assert json.loads(json.dumps(raw)) == raw
    assert (raw["kind"], raw["step"]) == ("Failover", "Promote")
    t = Transition.from_status(raw, "vm-0", 99)
    assert (t.kind, t.step, t.term) == (TransitionKind.FAILOVER, Step.PROMOTE, 2)
    assert t.to_status() == raw


def test_transition_with_an_unknown_step_resumes_at_promote() -> None:
    start = decide(lost_primary_world())
    odd = {**start.status, "transition": {**start.status["transition"], "step": "Renamed", "kind": "Other"}}
    plan = decide(lost_primary_world(status=odd))
    assert plan.actions[0] == PromoteAgent("vm-1", 2)
    assert "transition" not in plan.status and plan.status["currentPrimary"] == "vm-1"


def test_relabel_step_without_a_promoted_agent_goes_back_to_promote() -> None:
    start = decide(lost_primary_world())
    # Step Relabel, as an earlier version recorded it after the promote call; the agent is
    # still secondary after all.
    relabel = {**start.status, "transition": {**start.status["transition"], "step": "Relabel"}}
    plan = decide(lost_primary_world(status=relabel))
    assert plan.actions == ()
    assert plan.status["transition"]["step"] == "Promote"
    again = decide(lost_primary_world(status=plan.status))
    assert again.actions[0] == PromoteAgent("vm-1", 2)


def test_lease_taken_by_someone_else_asks_for_a_higher_term() -> None:
    start = decide(lost_primary_world())
    plan = decide(lost_primary_world(status=start.status, lease=LeaseView(holder="intruder", term=4)))
    assert plan.actions[0] == PromoteAgent("vm-1", 5)


def test_failover_aborted_when_the_primary_comes_back_holding_the_lease() -> None:
    start = decide(lost_primary_world())
    plan = decide(world(status=start.status))
    assert "transition" not in plan.status
    assert plan.status["targetPrimary"] == "vm-0"
    assert any(e.reason == "FailoverAborted" for e in plan.events)
    assert not any(isinstance(a, PromoteAgent) for a in plan.actions)


def test_an_aborted_failover_puts_the_primary_back_into_the_service() -> None:
    start = decide(lost_primary_world())
    back = world(status=start.status, pods=(pod("vm-0", "fenced", "n1"), pod("vm-1", "secondary", "n2")))
    plan = decide(back)
    assert any(e.reason == "FailoverAborted" for e in plan.events)
    assert plan.actions == (LabelPod("vm-0", c.ROLE_PRIMARY),)


def test_a_serving_primary_without_the_primary_label_gets_it_back() -> None:
    # The label was taken at the start of a failover whose status write never landed.
    plan = decide(world(pods=(pod("vm-0", "fenced", "n1"), pod("vm-1", "secondary", "n2"))))
    assert "transition" not in plan.status
    assert plan.actions == (LabelPod("vm-0", c.ROLE_PRIMARY),)


def test_a_primary_that_only_looks_lost_keeps_its_label_while_the_verdict_waits() -> None:
    s = world(agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.SECONDARY, peer=PeerState.CONNECTED)})
    assert decide(s).actions == ()


def test_a_relabel_step_recorded_by_an_earlier_version_moves_the_service_without_promoting() -> None:
    start = decide(lost_primary_world())
    relabel = {**start.status, "transition": {**start.status["transition"], "step": "Relabel"}}
    s = lost_primary_world(status=relabel, lease=LeaseView(holder="vm-1", term=2))
    s = replace(s, agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.PRIMARY, term=2)})
    assert decide(s).actions == (
        LabelPod("vm-0", "fenced"),
        LabelPod("vm-1", c.ROLE_PRIMARY),
        DeletePod("vm-0", force=True, why="replaced by vm-1 in term 2"),
    )


def test_primary_lost_before_first_sync_is_failed_and_stays_failed() -> None:
    s = world(
        status=protected_status(phase="Syncing", secondary={"pod": "vm-1", "synced": False}),
        node_views=nodes(node("n1", NodeHealth.UNKNOWN), node("n2"), node("n3")),
        agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.SECONDARY, peer=PeerState.LOST, synced=False)},
    )
    plan = decide(s)
    assert plan.status["phase"] == "Failed"
    assert "never completed its first sync" in plan.status["message"]
    assert any(e.reason == "Unrecoverable" for e in plan.events)
    again = decide(world(status=plan.status))
    assert again.status["phase"] == "Failed" and again.actions == ()


def test_secondary_remembered_synced_stays_promotable_when_its_report_says_otherwise() -> None:
    s = lost_primary_world()
    s = replace(
        s, agents={"vm-0": UNREACHABLE, "vm-1": agent(Role.SECONDARY, peer=PeerState.LOST, synced=False)}
    )
    assert decide(s).status["transition"]["to"] == "vm-1"


def test_primary_lost_with_no_secondary_is_failed() -> None:
    s = world(
        status=protected_status(phase="Degraded", secondary={}),
        pods=(pod("vm-0", "primary", "n1", phase="Failed", problem="agent exited: Error"),),
        agents={},
    )
    plan = decide(s)
    assert plan.status["phase"] == "Failed"
    assert "agent exited: Error" in plan.status["message"]


# --------------------------------------------------------------------------- secondary loss


def test_lost_secondary_is_replaced() -> None:
    s = world(
        pods=(pod("vm-0", "primary", "n1"), pod("vm-1", "secondary", "n2", phase="Failed")),
        agents={"vm-0": agent(Role.PRIMARY, peer=PeerState.LOST, synced=False), "vm-1": UNREACHABLE},
    )
    plan = decide(s)
    assert kinds(plan) == [DeletePod]
    assert plan.status["phase"] == "Degraded"
    assert cond(plan, "Protected")["reason"] == "SecondaryLost"
    after = decide(replace(s, vm=replace(s.vm, status=plan.status), pods=(pod("vm-0", "primary", "n1"),)))
    (create,) = [a for a in after.actions if isinstance(a, CreatePod)]
    assert create.name == "vm-2"


def test_secondary_on_unknown_node_still_heard_by_primary_waits() -> None:
    s = world(
        node_views=nodes(node("n1"), node("n2", NodeHealth.UNKNOWN), node("n3")),
        agents={"vm-0": agent(Role.PRIMARY), "vm-1": UNREACHABLE},
    )
    plan = decide(s)
    assert plan.actions == ()
    assert cond(plan, "Protected")["status"] == "Unknown"


def test_no_reprotection_when_disabled() -> None:
    st = protected_status(phase="Degraded", secondary={}, podSerial=3, failovers=1)
    s = world(
        status=st,
        pods=(pod("vm-0", "primary", "n1"),),
        spec={"failover": {"autoReprotect": False}},
        agents={"vm-0": agent(Role.PRIMARY, peer=PeerState.NONE)},
    )
    plan = decide(s)
    assert not any(isinstance(a, CreatePod) for a in plan.actions)
    assert cond(plan, "Protected")["reason"] == "ReprotectDisabled"


def test_stray_pod_with_primary_label_is_deleted() -> None:
    stray = pod("vm-7", "primary", "n3")
    s = world(pods=(pod("vm-0", "primary", "n1"), pod("vm-1", "secondary", "n2"), stray))
    plan = decide(s)
    assert plan.actions == (DeletePod("vm-7", force=False, why="not a replica of this VM any more"),)


# --------------------------------------------------------------------------- planned switchover


def test_switchover_request_runs_checkpoint_demote_promote_relabel() -> None:
    s = world(annotations={c.ANNOTATION_SWITCHOVER: "2026-11-25T20:00:00Z"})
    start = decide(s)
    t = start.status["transition"]
    assert (t["kind"], t["step"], t["cause"]) == ("Switchover", "Checkpoint", "Switchover")
    assert start.actions == ()  # the primary stays in the Service until it is demoted
    assert start.status["switchoverHandled"] == "2026-11-25T20:00:00Z"
    assert cond(start, "Ready")["status"] == "True"  # the primary serves until demoted
    step2 = decide(replace(s, vm=replace(s.vm, status=start.status)))
    assert step2.actions == (CheckpointAgent("vm-0"), DemoteAgent("vm-0"))
    done = decide(replace(s, vm=replace(s.vm, status=step2.status)))
    assert done.actions == (
        PromoteAgent("vm-1", 2),
        LabelPod("vm-0", "fenced"),
        LabelPod("vm-1", c.ROLE_PRIMARY),
        DeletePod("vm-0", force=False, why="replaced by vm-1 in term 2"),
    )
    s4 = replace(
        s,
        agents={"vm-0": agent(Role.PRIMARY), "vm-1": agent(Role.PRIMARY, term=2)},
        lease=LeaseView(holder="vm-1", term=2),
    )
    assert done.status["failovers"] == 0  # a switchover is not a failover
    assert done.status["lastFailover"]["kind"] == "Switchover"
    # The request is handled once.
    again = decide(replace(s4, vm=replace(s4.vm, status=done.status), pods=(pod("vm-1", "primary", "n2"),)))
    assert "transition" not in again.status


def test_switchover_refused_without_a_synced_secondary() -> None:
    s = world(
        status=protected_status(phase="Syncing", secondary={"pod": "vm-1", "synced": False}),
        agents={"vm-0": agent(Role.PRIMARY, synced=False), "vm-1": agent(Role.SECONDARY, synced=False)},
        annotations={c.ANNOTATION_SWITCHOVER: "x"},
    )
    plan = decide(s)
    assert "transition" not in plan.status
    assert plan.status["switchoverHandled"] == "x"
    assert any(e.reason == "SwitchoverRefused" for e in plan.events)


def test_cordoned_primary_node_triggers_a_switchover() -> None:
    s = world(node_views=nodes(node("n1", unschedulable=True), node("n2"), node("n3")))
    t = decide(s).status["transition"]
    assert (t["kind"], t["cause"], t["to"]) == ("Switchover", "NodeDrain", "vm-1")


def test_cordoned_secondary_node_moves_the_secondary() -> None:
    s = world(node_views=nodes(node("n1"), node("n2", unschedulable=True), node("n3")))
    plan = decide(s)
    assert plan.actions == (DeletePod("vm-1", force=False, why=plan.actions[0].why),)
    assert "cordoned" in plan.status["message"]


def test_switchover_aborted_when_the_target_dies_before_demotion() -> None:
    start = decide(world(annotations={c.ANNOTATION_SWITCHOVER: "1"}))
    s = world(status=start.status, pods=(pod("vm-0", "primary", "n1"),))
    plan = decide(s)
    assert "transition" not in plan.status and plan.status["targetPrimary"] == "vm-0"
    assert any(e.reason == "SwitchoverAborted" for e in plan.events)


def test_switchover_whose_primary_dies_becomes_a_failover() -> None:
    start = decide(world(annotations={c.ANNOTATION_SWITCHOVER: "1"}))
    plan = decide(lost_primary_world(status=start.status))
    t = plan.status["transition"]
    assert (t["kind"], t["step"]) == ("Failover", "Promote")
    assert not any(isinstance(a, CheckpointAgent | DemoteAgent) for a in plan.actions)


def test_reprotection_avoids_a_silent_node_that_still_looks_ready() -> None:
    # The primary's agent went silent on n1; the node controller has not noticed yet.
    last = {"kind": "Failover", "cause": "AgentUnreachable", "from": "vm-0", "fromNode": "n1",
            "to": "vm-1", "time": "2026-11-25T19:59:58Z"}  # fmt: skip
    st = protected_status(currentPrimary="vm-1", targetPrimary="vm-1", secondary={}, lastFailover=last)
    s = world(status=st, pods=(pod("vm-1", "primary", "n2"),), agents={"vm-1": agent(Role.PRIMARY, term=2)})
    (create,) = [a for a in decide(s).actions if isinstance(a, CreatePod)]
    assert create.place.candidates == ("n3",)
    # Long after, or after a planned move, the node is fair game again.
    later = replace(s, now=NOW + dt.timedelta(minutes=10))
    (create,) = [a for a in decide(later).actions if isinstance(a, CreatePod)]
    assert set(create.place.candidates) == {"n1", "n3"}
    moved = {**st, "lastFailover": {**last, "cause": "Switchover"}}
    planned = world(status=moved, pods=s.pods, agents=s.agents)
    (create,) = [a for a in decide(planned).actions if isinstance(a, CreatePod)]
    assert set(create.place.candidates) == {"n1", "n3"}


def test_primary_that_never_served_is_replaced_a_few_times_then_failed() -> None:
    st = {"observedGeneration": 1, "phase": "Pending", "currentPrimary": "vm-0", "targetPrimary": "vm-0",
          "podSerial": 1, "term": 0, "primary": {"pod": "vm-0"}}  # fmt: skip
    crashed = (pod("vm-0", "primary", "n1", phase="Failed", problem="agent exited: Error"),)
    plan = decide(world(status=st, pods=crashed, agents={}))
    assert plan.actions == (DeletePod("vm-0", force=False, why=plan.actions[0].why),)
    assert "currentPrimary" not in plan.status and plan.status["primaryRestarts"] == 1
    assert plan.status["phase"] == "Pending" and any(e.reason == "PrimaryRestarted" for e in plan.events)
    # The next pass creates a fresh primary under a new name.
    again = decide(world(status=plan.status, pods=(), agents={}))
    (create,) = [a for a in again.actions if isinstance(a, CreatePod)]
    assert create.name == "vm-1" and create.role == "primary"
    # A primary that keeps failing makes the VM Failed eventually.
    exhausted = decide(world(status={**st, "primaryRestarts": 3}, pods=crashed, agents={}))
    assert exhausted.status["phase"] == "Failed"


def test_a_syncing_primary_whose_agent_says_no_client_reached_it_is_replaced() -> None:
    # It serves alone while its first secondary syncs, so only its agent can say nobody came:
    # exit status 3. Before, any primary past Pending that died made the VM Failed for good.
    st = {"observedGeneration": 1, "phase": "Syncing", "currentPrimary": "vm-0", "targetPrimary": "vm-0",
          "podSerial": 2, "term": 1, "primary": {"pod": "vm-0"}, "secondary": {"pod": "vm-1"}}  # fmt: skip
    syncing = agent(Role.SECONDARY, synced=False, peer=PeerState.LOST, heartbeat_age_ms=None)
    for code, restarted in ((EXIT_NEVER_SERVED, True), (1, False), (137, False), (None, False)):
        died = pod("vm-0", "primary", "n1", phase="Failed", problem="agent exited: Error", exit_code=code)
        plan = decide(world(status=st, pods=(died, pod("vm-1", "secondary", "n2")), agents={"vm-1": syncing}))
        assert (plan.status["phase"] == "Pending") is restarted, code
        assert (plan.status["phase"] == "Failed") is not restarted, code
        if restarted:
            assert DeletePod("vm-0", force=False, why=plan.actions[0].why) in plan.actions
            assert plan.status["primaryRestarts"] == 1
            # The next pass starts over: the secondary of the old guest goes too.
            again = decide(world(status=plan.status, pods=(pod("vm-1", "secondary", "n2"),), agents={}))
            assert any(isinstance(x, DeletePod) and x.name == "vm-1" for x in again.actions)
            assert any(isinstance(x, CreatePod) and x.role == "primary" for x in again.actions)


def test_promotable_secondary_stays_promotable_through_a_wait() -> None:
    """The agent reports synced=false once it lost its primary; status must not forget it was synced."""
    lonely = agent(Role.SECONDARY, synced=False, heartbeat_age_ms=None)
    # The primary's agent went silent; its node still looks Ready: wait.
    waiting = decide(world(agents={"vm-0": UNREACHABLE, "vm-1": lonely}))
    assert waiting.actions == () and "transition" not in waiting.status
    assert waiting.status["secondary"]["synced"] is True
    # Then its node goes Unknown: two silent signals, promote the remembered-synced secondary.
    s = world(
        status=waiting.status,
        node_views=nodes(node("n1", NodeHealth.UNKNOWN), node("n2"), node("n3")),
        agents={"vm-0": UNREACHABLE, "vm-1": lonely},
    )
    t = decide(s).status["transition"]
    assert (t["kind"], t["to"], t["cause"]) == ("Failover", "vm-1", "NodeUnknown")


# --------------------------------------------------------------------------- stop and start

HALTED = {"runStrategy": "Halted"}


def test_halting_deletes_both_pods_and_forgets_the_run() -> None:
    plan = decide(world(spec=HALTED))
    assert [a.name for a in plan.actions if isinstance(a, DeletePod)] == ["vm-0", "vm-1"]
    assert not any(isinstance(a, CreatePod | PromoteAgent) for a in plan.actions)
    st = plan.status
    assert st["phase"] == "Stopped" and st["stoppedFrom"] == "Protected"
    assert "currentPrimary" not in st and "epoch" not in st and st["primary"] == st["secondary"] == {}
    assert cond(plan, "Ready")["reason"] == "Stopped" and cond(plan, "Protected")["status"] == "False"
    assert any(e.reason == "Stopping" for e in plan.events)


def test_halting_mid_failover_drops_the_transition() -> None:
    start = decide(lost_primary_world())
    plan = decide(lost_primary_world(status=start.status, spec=HALTED))
    assert "transition" not in plan.status and plan.status["phase"] == "Stopped"
    assert not any(isinstance(a, PromoteAgent) for a in plan.actions)


def test_a_stopped_vm_stays_stopped_without_acting_again() -> None:
    stopped = decide(world(spec=HALTED)).status
    terminating = tuple(
        pod(n, r, nd, deleting=True) for n, r, nd in (("vm-0", "primary", "n1"), ("vm-1", "secondary", "n2"))
    )
    plan = decide(world(status=stopped, pods=terminating, agents={}, spec=HALTED))
    assert plan.actions == () and plan.status["stoppedFrom"] == "Protected"
    assert "terminating" in plan.status["message"]
    gone = decide(world(status=plan.status, pods=(), agents={}, spec=HALTED))
    assert gone.actions == () and gone.status["phase"] == "Stopped" and not gone.events


def test_starting_waits_for_old_pods_then_boots_a_fresh_primary() -> None:
    stopped = decide(world(spec=HALTED)).status
    terminating = (pod("vm-0", "primary", "n1", deleting=True),)
    waiting = decide(world(status=stopped, pods=terminating, agents={}))
    assert waiting.actions == () and waiting.status["phase"] == "Stopped"
    plan = decide(world(status=waiting.status, pods=(), agents={}))
    (create,) = [a for a in plan.actions if isinstance(a, CreatePod)]
    # Names never repeat: the fresh primary continues the serial.
    assert (create.role, create.name) == ("primary", "vm-2")
    assert plan.status["phase"] == "Pending" and "stoppedFrom" not in plan.status
    assert [e.type for e in plan.events if e.reason == "Starting"] == ["Normal"]
    assert not any(e.reason == "StateLost" for e in plan.events)


def test_a_failed_vm_restarts_through_halted_with_an_event_that_its_state_was_lost() -> None:
    failed = protected_status(phase="Failed", message="primary lost, no secondary")
    sticky = decide(world(status=failed, pods=(), agents={}))
    assert sticky.status["phase"] == "Failed" and sticky.actions == ()
    stopped = decide(world(status=failed, pods=(), agents={}, spec=HALTED))
    assert stopped.status["stoppedFrom"] == "Failed"
    plan = decide(world(status=stopped.status, pods=(), agents={}))
    assert [type(a) for a in plan.actions if isinstance(a, CreatePod)] == [CreatePod]
    (lost,) = [e for e in plan.events if e.reason == "StateLost"]
    assert lost.type == "Warning" and "state was lost" in lost.message


# --------------------------------------------------------------------------- rolling update


def rollout_world(primary: str | None, secondary: str | None, **kw: Any) -> Snapshot:
    pods = (
        pod("vm-0", "primary", "n1", template=primary),
        pod("vm-1", "secondary", "n2", template=secondary),
    )
    return replace(world(pods=pods, **kw), template="new")


def test_up_to_date_pods_change_nothing_and_say_so() -> None:
    plan = decide(rollout_world("new", "new"))
    assert plan.actions == () and plan.status["upToDate"] == "2/2"
    assert (cond(plan, "UpToDate")["status"], cond(plan, "UpToDate")["reason"]) == ("True", "UpToDate")


def test_a_changed_template_replaces_the_secondary_first() -> None:
    plan = decide(rollout_world("old", "old"))
    assert plan.actions == (DeletePod("vm-1", force=False, why=plan.actions[0].why),)
    assert plan.status["phase"] == "Syncing" and plan.status["upToDate"] == "0/2"
    assert (cond(plan, "UpToDate")["status"], cond(plan, "UpToDate")["reason"]) == ("False", "Updating")
    assert "transition" not in plan.status
    # Its replacement is created from the new template by the usual path.
    after = decide(replace(rollout_world("old", None), pods=(pod("vm-0", "primary", "n1", template="old"),)))
    assert [a.role for a in after.actions if isinstance(a, CreatePod)] == ["secondary"]


def test_a_synced_updated_secondary_takes_over_by_switchover() -> None:
    plan = decide(rollout_world("old", "new"))
    t = plan.status["transition"]
    assert (t["kind"], t["cause"], t["step"], t["to"]) == ("Switchover", "Upgrade", "Checkpoint", "vm-1")
    assert plan.status["upToDate"] == "1/2"


def test_an_updated_secondary_still_syncing_is_waited_for() -> None:
    s = rollout_world("old", "new", status=protected_status(phase="Syncing", secondary={"pod": "vm-1"}))
    s = replace(s, agents={"vm-0": agent(Role.PRIMARY), "vm-1": agent(Role.SECONDARY, synced=False)})
    plan = decide(s)
    assert plan.actions == () and "transition" not in plan.status
    assert plan.status["phase"] == "Syncing"


def test_manual_strategy_waits_for_kubectl_colo_upgrade() -> None:
    manual = {"updateStrategy": "Manual"}
    pending = decide(rollout_world("old", "old", spec=manual))
    assert pending.actions == ()
    assert cond(pending, "UpToDate")["reason"] == "UpdatePending"
    assert "kubectl colo upgrade vm" in cond(pending, "UpToDate")["message"]
    asked = rollout_world("old", "old", spec=manual, annotations={c.ANNOTATION_UPGRADE: "t1"})
    plan = decide(asked)
    assert [a.name for a in plan.actions if isinstance(a, DeletePod)] == ["vm-1"]
    assert (plan.status["upgradeHandled"], plan.status["approvedTemplate"]) == ("t1", "new")
    # The approval holds for that template only: a newer one waits again.
    newer = replace(rollout_world("old", "old", spec=manual, annotations={c.ANNOTATION_UPGRADE: "t1"}),
                    template="newer")  # fmt: skip
    newer = replace(newer, vm=replace(newer.vm, status=plan.status))
    assert decide(newer).actions == ()
