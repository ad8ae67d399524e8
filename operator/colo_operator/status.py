"""ColoVM status per Kubernetes API conventions: phase, typed conditions, figures, events.

Everything here is pure: it takes the previous status and what is true now
and returns the next status, keeping `lastTransitionTime` of conditions whose
status did not change, plus the events that the change deserves.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from colo_agent.api.models import AgentStatus

from .snapshot import parse_time


class Phase(enum.StrEnum):
    PENDING = "Pending"  # no primary serving yet
    SYNCING = "Syncing"  # primary serving, a secondary is doing its first sync
    PROTECTED = "Protected"  # primary serving, secondary synced
    DEGRADED = "Degraded"  # primary serving, no usable secondary
    FAILING_OVER = "FailingOver"  # a failover or switchover is in progress
    FAILED = "Failed"  # the VM's state is lost
    STOPPED = "Stopped"  # runStrategy Halted: no agent pods, no guest state


class ConditionType(enum.StrEnum):
    READY = "Ready"  # a primary serves clients
    PROTECTED = "Protected"  # losing the primary's node loses nothing
    SYNCED = "Synced"  # the secondary holds a complete committed image
    UP_TO_DATE = "UpToDate"  # every agent pod runs the desired pod template


class Reason(enum.StrEnum):
    # Ready
    PRIMARY_SERVING = "PrimaryServing"
    PRIMARY_STARTING = "PrimaryStarting"
    PRIMARY_UNCERTAIN = "PrimaryUncertain"
    PRIMARY_LOST = "PrimaryLost"
    PROMOTING = "Promoting"
    # Protected / Synced
    SECONDARY_SYNCED = "SecondarySynced"
    FIRST_SYNC = "FirstSyncInProgress"
    SECONDARY_STARTING = "SecondaryStarting"
    SECONDARY_UNCERTAIN = "SecondaryUncertain"
    SECONDARY_LOST = "SecondaryLost"
    NO_SECONDARY = "NoSecondary"
    NO_SPARE_NODE = "NoSpareNode"
    REPROTECT_DISABLED = "ReprotectDisabled"
    PEER_LOST = "PeerLost"
    # Any
    FAILING_OVER = "FailingOver"
    SWITCHING_OVER = "SwitchingOver"
    UNRECOVERABLE = "Unrecoverable"
    INVALID_SPEC = "InvalidSpec"
    STOPPED = "Stopped"
    # UpToDate
    UP_TO_DATE = "UpToDate"
    UPDATING = "Updating"
    UPDATE_PENDING = "UpdatePending"


@dataclass(frozen=True, slots=True)
class Condition:
    type: ConditionType
    status: str  # "True", "False", "Unknown"
    reason: Reason
    message: str = ""


def true(kind: ConditionType, reason: Reason, message: str = "") -> Condition:
    return Condition(kind, "True", reason, message)


def false(kind: ConditionType, reason: Reason, message: str = "") -> Condition:
    return Condition(kind, "False", reason, message)


def unknown(kind: ConditionType, reason: Reason, message: str = "") -> Condition:
    return Condition(kind, "Unknown", reason, message)


@dataclass(frozen=True, slots=True)
class EventNote:
    type: str  # Normal or Warning
    reason: str
    message: str


def timestamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def timestamp_ms(when: dt.datetime) -> str:
    """With milliseconds: failover durations are computed from these, and whole seconds would skew them."""
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def merge_conditions(
    previous: object, new: Sequence[Condition], now: dt.datetime, generation: int
) -> list[dict[str, Any]]:
    """Conditions as API dicts; a condition whose status is unchanged keeps its lastTransitionTime."""
    before: dict[str, Mapping[str, Any]] = {}
    if isinstance(previous, list):
        before = {str(c.get("type")): c for c in previous if isinstance(c, Mapping)}
    out = []
    for cond in new:
        old = before.get(cond.type.value)
        since = old.get("lastTransitionTime") if old and old.get("status") == cond.status else None
        out.append(
            {
                "type": cond.type.value,
                "status": cond.status,
                "reason": cond.reason.value,
                "message": cond.message,
                "lastTransitionTime": since or timestamp(now),
                "observedGeneration": generation,
            }
        )
    return out


def transition_events(previous: Mapping[str, Any], new: Mapping[str, Any]) -> list[EventNote]:
    """One event per phase change and per condition whose status changed."""
    notes: list[EventNote] = []
    old_phase, new_phase = previous.get("phase"), new.get("phase")
    if new_phase != old_phase:
        bad = new_phase in (Phase.DEGRADED, Phase.FAILING_OVER, Phase.FAILED)
        message = f"phase {old_phase or '(none)'} -> {new_phase}"
        if new.get("message"):
            message += f": {new['message']}"
        notes.append(EventNote("Warning" if bad else "Normal", f"Phase{new_phase}", message))
    before = {c.get("type"): c for c in previous.get("conditions") or () if isinstance(c, Mapping)}
    for cond in new.get("conditions") or ():
        old = before.get(cond["type"])
        if old is not None and old.get("status") == cond["status"] and old.get("reason") == cond["reason"]:
            continue
        if old is None and cond["status"] != "True":
            continue  # a fresh VM is not news for every False condition
        notes.append(
            EventNote(
                "Normal" if cond["status"] == "True" else "Warning",
                cond["reason"],
                f"{cond['type']}={cond['status']}: {cond['message']}".rstrip(": "),
            )
        )
    return notes


# --------------------------------------------------------------------------- figures from the agents

# Figures alone are written at most this often; anything else is written at once.
FIGURES_PERIOD_S = 5.0
_FIGURE_KEYS = ("epoch", "lastCheckpoint", "checkpoints", "stream")


def figures(previous: Mapping[str, Any], primary: AgentStatus | None, now: dt.datetime) -> dict[str, Any]:
    """`epoch`, `lastCheckpoint`, `checkpoints` and, for a backend that replicates itself
    (QEMU), `stream` from the primary agent's report.

    Without a report the previous figures stay (the last thing known is more
    useful than nothing; `observedAt` tells how old it is).
    """
    out = {k: previous[k] for k in _FIGURE_KEYS if k in previous}
    if primary is None:
        return out
    out["epoch"] = primary.last_acked_epoch
    if primary.stream is not None:
        # QEMU's migration state (colo while protected), its channels (1: single-stream) and
        # the checkpoints colo-compare forced because the guests' outputs differed.
        out["stream"] = primary.stream.to_dict()
    else:
        out.pop("stream", None)
    last = primary.last_checkpoint
    if last is not None:
        before = previous.get("lastCheckpoint") or {}
        same = isinstance(before, Mapping) and before.get("epoch") == last.epoch
        out["lastCheckpoint"] = {
            "epoch": last.epoch,
            "pauseMs": round(last.pause_ms, 3),
            "pages": last.pages,
            "bytes": last.bytes,
            "durationMs": round(last.duration_ms, 3),
            "cause": last.cause,
            "observedAt": (before.get("observedAt") if same else None) or timestamp(now),
        }
        if primary.ack_age_ms is not None:
            # As measured by the primary when sampled (checkpoints.sampledAt): the LAG figure.
            out["lastCheckpoint"]["ackAgeMs"] = round(primary.ack_age_ms, 1)
    total = primary.totals.checkpoints
    sample = previous.get("checkpoints") or {}
    prev_total = sample.get("total") if isinstance(sample, Mapping) else None
    prev_time = parse_time(sample.get("sampledAt")) if isinstance(sample, Mapping) else None
    rate = sample.get("perSecond", 0.0) if isinstance(sample, Mapping) else 0.0
    if isinstance(prev_total, int) and prev_time is not None:
        elapsed = (now - prev_time).total_seconds()
        if elapsed >= 0.5:
            # A restarted agent counts from zero again: no negative rates.
            rate = max(0, total - prev_total) / elapsed
    out["checkpoints"] = {
        "total": total,
        "perSecond": round(float(rate), 2),
        "bytes": primary.totals.bytes,
        "sampledAt": timestamp(now),
    }
    return out


def should_write(previous: Mapping[str, Any], new: Mapping[str, Any], now: dt.datetime) -> bool:
    """Write at once when anything but the figures changed; figures alone every FIGURES_PERIOD_S."""
    strip = {k: v for k, v in new.items() if k not in _FIGURE_KEYS}
    if strip != {k: v for k, v in previous.items() if k not in _FIGURE_KEYS}:
        return True
    if all(new.get(k) == previous.get(k) for k in _FIGURE_KEYS):
        return False
    sample = previous.get("checkpoints")
    last = parse_time(sample.get("sampledAt")) if isinstance(sample, Mapping) else None
    return last is None or (now - last).total_seconds() >= FIGURES_PERIOD_S
