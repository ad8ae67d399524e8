"""The agent's control API contract, version `v1`: what the operator and the agent exchange.

This module is the only part of the agent the operator imports, so it depends on
the standard library alone and never connects, logs or reads the clock. Every
document is a frozen dataclass with `to_dict()`/`to_json()` and
`from_dict()`/`from_json()`; JSON keys are camelCase. Parsing validates every
field and raises `ModelError` naming the field (`peer.state`) and what is wrong
with it, so a malformed document never turns into an `AttributeError` deep in a
caller.

Compatibility rules within `v1`: a reader ignores keys it does not know (a newer
agent may add fields), and a writer never removes or retypes a field. Anything
else is a new API version. Every response carries `apiVersion`; a reader checks
it first (`check_api_version`) and refuses versions it does not speak with
`VersionMismatch`, before looking at any other field.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from colo_agent.api.reader import Reader, kind_of

API_VERSION = "v1"
# Versions this module can read. A reader speaking several versions would list them here.
SUPPORTED_API_VERSIONS: frozenset[str] = frozenset({API_VERSION})
# Also sent as a response header, so a client can check the version of any
# response, even one whose body is not ours (a proxy's error page).
API_VERSION_HEADER = "X-Colo-Api-Version"

# `GET /v1/status` as a long poll (optional query parameters; an agent that predates them
# answers at once): answer once the peer is not `connected` or its last heartbeat is older
# than `heartbeatWithinMs`, or after `waitMs` (at most MAX_STATUS_WAIT_MS), whichever first.
STATUS_WAIT_MS = "waitMs"
STATUS_HEARTBEAT_WITHIN_MS = "heartbeatWithinMs"
MAX_STATUS_WAIT_MS = 30_000


class ModelError(ValueError):
    """A document does not match the contract. `field` is the dotted path of the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


class VersionMismatch(ModelError):
    """The peer speaks an API version this side does not."""

    def __init__(self, got: object) -> None:
        self.got = got
        spoken = ", ".join(sorted(SUPPORTED_API_VERSIONS))
        super().__init__("apiVersion", f"{got!r} is not a version this side speaks ({spoken})")


class Role(enum.StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class ReplicationMode(enum.StrEnum):
    CHECKPOINT = "checkpoint"
    LOCKSTEP = "lockstep"


class PeerState(enum.StrEnum):
    CONNECTED = "connected"  # epochs flowing, acknowledged
    SYNCING = "syncing"  # first sync (pre-copy) in progress
    LOST = "lost"  # heartbeat timed out or connection failed; not protected
    NONE = "none"  # no peer configured or none has joined yet


class CheckpointCause(enum.StrEnum):
    """Why a checkpoint was taken. Readers accept any other non-empty string too:
    a newer agent may add causes, and a cause only ever labels figures."""

    INTERVAL = "interval"
    DIRTY_THRESHOLD = "dirty-threshold"
    MISMATCH = "mismatch"  # lockstep: outputs differed
    TIMEOUT = "timeout"  # lockstep: output unmatched too long, or too much of it
    REQUESTED = "requested"  # POST /v1/checkpoint
    OUTPUT = "output"  # checkpoint mode: output waited for an epoch
    INITIAL_SYNC = "initial-sync"


class GuestState(enum.StrEnum):
    """Known guest states; as with causes, readers accept other non-empty strings."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


# --------------------------------------------------------------------------- parsing helpers

def _reader(document: object) -> Reader:
    return Reader(document, "", ModelError)


def _load(data: str | bytes | bytearray) -> object:
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise ModelError("", f"body is not UTF-8: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ModelError("", f"body is not valid JSON: {exc.msg} at {where}") from None
    except RecursionError:
        raise ModelError("", "body is not valid JSON: nested too deeply") from None


def _dump(document: Mapping[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


def check_api_version(document: object) -> None:
    """Raise `VersionMismatch` unless `document` (a parsed response) is in a version we speak."""
    if not isinstance(document, Mapping):
        raise ModelError("", f"expected an object, got {kind_of(document)}")
    if "apiVersion" not in document:
        raise ModelError("apiVersion", "is required")
    version = document["apiVersion"]
    # Compared as a string: a list or object here must be refused, not crash a set lookup.
    if not isinstance(version, str) or version not in SUPPORTED_API_VERSIONS:
        raise VersionMismatch(version)


_M = TypeVar("_M", bound="_Document")


class _Document:
    """JSON round trip shared by every top-level document."""

    # Whether the document carries `apiVersion` (responses do; a request body does not need to).
    _versioned: ClassVar[bool] = True

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        return _dump(self.to_dict())

    @classmethod
    def _parse(cls: type[_M], reader: Reader) -> _M:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[_M], document: object) -> _M:
        if cls._versioned:
            check_api_version(document)
        return cls._parse(_reader(document))

    @classmethod
    def from_json(cls: type[_M], data: str | bytes | bytearray) -> _M:
        return cls.from_dict(_load(data))


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class PeerStatus:
    state: PeerState
    # The peer's replication address (HOST:PORT) when known.
    address: str | None = None
    # Age of the last heartbeat received from the peer, by the agent's monotonic clock.
    last_heartbeat_age_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "address": self.address,
            "lastHeartbeatAgeMs": self.last_heartbeat_age_ms,
        }

    @classmethod
    def _parse(cls, r: Reader) -> PeerStatus:
        return cls(
            state=r.choice("state", PeerState),
            address=r.optional_string("address"),
            last_heartbeat_age_ms=r.optional_number("lastHeartbeatAgeMs"),
        )


@dataclass(frozen=True, slots=True)
class CheckpointFigures:
    """One checkpoint, from pause to acknowledgement."""

    epoch: int
    pause_ms: float  # guest paused: dirty collection, staging copy, device state
    pages: int
    bytes: int  # payload bytes on the wire (pages and device state)
    duration_ms: float  # pause start to acknowledgement
    cause: str  # a CheckpointCause value, or a newer one

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "pauseMs": self.pause_ms,
            "pages": self.pages,
            "bytes": self.bytes,
            "durationMs": self.duration_ms,
            "cause": self.cause,
        }

    @classmethod
    def _parse(cls, r: Reader) -> CheckpointFigures:
        return cls(
            epoch=r.integer("epoch", minimum=1),
            pause_ms=r.number("pauseMs"),
            pages=r.integer("pages"),
            bytes=r.integer("bytes"),
            duration_ms=r.number("durationMs"),
            cause=r.string("cause"),
        )


@dataclass(frozen=True, slots=True)
class Totals:
    """Counters since the agent started."""

    checkpoints: int = 0
    pages: int = 0
    bytes: int = 0
    failovers: int = 0  # promotions this agent went through
    checkpoints_by_cause: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoints": self.checkpoints,
            "pages": self.pages,
            "bytes": self.bytes,
            "failovers": self.failovers,
            "checkpointsByCause": dict(self.checkpoints_by_cause),
        }

    @classmethod
    def _parse(cls, r: Reader) -> Totals:
        return cls(
            checkpoints=r.integer("checkpoints"),
            pages=r.integer("pages"),
            bytes=r.integer("bytes"),
            failovers=r.integer("failovers"),
            checkpoints_by_cause=r.counts("checkpointsByCause"),
        )


@dataclass(frozen=True, slots=True)
class GuestStatus:
    state: str  # a GuestState value, or a newer one
    accel: str  # "kvm", "tcg", ...
    memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "accel": self.accel, "memoryBytes": self.memory_bytes}

    @classmethod
    def _parse(cls, r: Reader) -> GuestStatus:
        return cls(state=r.string("state"), accel=r.string("accel"), memory_bytes=r.integer("memoryBytes"))


@dataclass(frozen=True, slots=True)
class LockstepFigures:
    """Lockstep mode, primary: how output left, and what waits for the secondary."""

    released_on_match_bytes: int = 0  # both guests produced it
    released_on_ack_bytes: int = 0  # its epoch was acknowledged (mismatch, timeout, or a periodic checkpoint)
    queue_bytes: int = 0  # unmatched output held right now

    def to_dict(self) -> dict[str, Any]:
        return {
            "releasedOnMatchBytes": self.released_on_match_bytes,
            "releasedOnAckBytes": self.released_on_ack_bytes,
            "queueBytes": self.queue_bytes,
        }

    @classmethod
    def _parse(cls, r: Reader) -> LockstepFigures:
        return cls(
            released_on_match_bytes=r.integer("releasedOnMatchBytes"),
            released_on_ack_bytes=r.integer("releasedOnAckBytes"),
            queue_bytes=r.integer("queueBytes"),
        )


@dataclass(frozen=True, slots=True)
class StreamFiguresStatus:
    """A backend that replicates itself (QEMU's COLO), primary: its replication now."""

    state: str  # the backend's own word (QEMU: query-migrate's status, `colo` while protected)
    # Connections the stream uses; 1 is single-stream (QEMU 10.0 cannot combine multifd with COLO).
    channels: int = 1
    mismatches: int = 0  # checkpoints forced because the guests' outputs differed

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "channels": self.channels, "mismatches": self.mismatches}

    @classmethod
    def _parse(cls, r: Reader) -> StreamFiguresStatus:
        return cls(state=r.string("state"), channels=r.integer("channels"),
                   mismatches=r.integer("mismatches"))


@dataclass(frozen=True, slots=True)
class AgentStatus(_Document):
    """`GET /v1/status`."""

    role: Role
    # The fencing generation this agent knows: the Lease's term it holds (primary)
    # or last saw (secondary). 0 before any primary took the Lease.
    term: int
    # Last epoch the secondary acknowledged in `term` (0: none yet). Epochs restart at 1 every term.
    last_acked_epoch: int
    mode: ReplicationMode
    peer: PeerStatus
    guest: GuestStatus
    totals: Totals = field(default_factory=Totals)
    last_checkpoint: CheckpointFigures | None = None
    # Secondary: holds a complete committed image (promotable). Primary: its
    # secondary is synced, i.e. the VM is protected.
    synced: bool = False
    lockstep: LockstepFigures | None = None  # lockstep mode only (added within v1)
    # Primary: milliseconds since its last acknowledged epoch (since it became primary before
    # the first one); how much guest execution a failover now would roll back. None on a
    # secondary. (Added within v1.)
    ack_age_ms: float | None = None
    # Whether a failover could happen now: protected (primary) or promotable (secondary), and
    # the arbiter answers. False through an API server outage, when protected VMs keep serving
    # but nobody can take the Lease. None from agents that do not say. (Added within v1.)
    failover_possible: bool | None = None
    # A primary whose backend replicates itself (the qemu backend). (Added within v1.)
    stream: StreamFiguresStatus | None = None
    api_version: str = API_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = self._to_dict()
        if self.lockstep is not None:
            out["lockstep"] = self.lockstep.to_dict()
        if self.stream is not None:
            out["stream"] = self.stream.to_dict()
        if self.ack_age_ms is not None:
            out["ackAgeMs"] = self.ack_age_ms
        if self.failover_possible is not None:
            out["failoverPossible"] = self.failover_possible
        return out

    def _to_dict(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "role": self.role.value,
            "term": self.term,
            "lastAckedEpoch": self.last_acked_epoch,
            "mode": self.mode.value,
            "peer": self.peer.to_dict(),
            "lastCheckpoint": None if self.last_checkpoint is None else self.last_checkpoint.to_dict(),
            "totals": self.totals.to_dict(),
            "guest": self.guest.to_dict(),
            "synced": self.synced,
        }

    @classmethod
    def _parse(cls, r: Reader) -> AgentStatus:
        last = r.optional_child("lastCheckpoint")
        lockstep = r.optional_child("lockstep")
        stream = r.optional_child("stream")
        return cls(
            lockstep=None if lockstep is None else LockstepFigures._parse(lockstep),
            stream=None if stream is None else StreamFiguresStatus._parse(stream),
            ack_age_ms=r.optional_number("ackAgeMs"),
            failover_possible=r.boolean("failoverPossible") if r.has("failoverPossible") else None,
            api_version=r.string("apiVersion"),
            role=r.choice("role", Role),
            term=r.integer("term"),
            last_acked_epoch=r.integer("lastAckedEpoch"),
            mode=r.choice("mode", ReplicationMode),
            peer=PeerStatus._parse(r.child("peer")),
            last_checkpoint=None if last is None else CheckpointFigures._parse(last),
            totals=Totals._parse(r.child("totals")),
            guest=GuestStatus._parse(r.child("guest")),
            synced=r.boolean("synced"),
        )


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class PromoteRequest(_Document):
    """`POST /v1/promote` body: take the arbiter with `term` (strictly higher than the current one)."""

    _versioned: ClassVar[bool] = False

    term: int

    def __post_init__(self) -> None:
        if isinstance(self.term, bool) or not isinstance(self.term, int) or self.term < 1:
            raise ModelError("term", f"must be an integer >= 1, got {self.term!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"term": self.term}

    @classmethod
    def _parse(cls, r: Reader) -> PromoteRequest:
        return cls(term=r.integer("term", minimum=1))


@dataclass(frozen=True, slots=True)
class PromoteResult(_Document):
    """`POST /v1/promote` response: the agent is now primary in `term`."""

    role: Role
    term: int
    # The acknowledged epoch the guest resumed from (checkpoint mode), 0 for lockstep
    # (the running guest continues) or when the agent was already primary.
    resumed_from_epoch: int = 0
    api_version: str = API_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "role": self.role.value,
            "term": self.term,
            "resumedFromEpoch": self.resumed_from_epoch,
        }

    @classmethod
    def _parse(cls, r: Reader) -> PromoteResult:
        return cls(
            api_version=r.string("apiVersion"),
            role=r.choice("role", Role),
            term=r.integer("term", minimum=1),
            resumed_from_epoch=r.integer("resumedFromEpoch"),
        )


@dataclass(frozen=True, slots=True)
class CheckpointResult(_Document):
    """`POST /v1/checkpoint` response: `epoch` of `term` is acknowledged by the secondary."""

    term: int
    epoch: int
    api_version: str = API_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"apiVersion": self.api_version, "term": self.term, "epoch": self.epoch}

    @classmethod
    def _parse(cls, r: Reader) -> CheckpointResult:
        return cls(
            api_version=r.string("apiVersion"),
            term=r.integer("term"),
            epoch=r.integer("epoch", minimum=1),
        )


@dataclass(frozen=True, slots=True)
class DemoteResult(_Document):
    """`POST /v1/demote` response: the agent no longer releases output.

    `role` stays `primary` (it still runs the guest and keeps its state for a
    switchover) until the operator replaces it; `releasing` is False from now on.
    """

    role: Role
    term: int
    releasing: bool = False
    api_version: str = API_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "role": self.role.value,
            "term": self.term,
            "releasing": self.releasing,
        }

    @classmethod
    def _parse(cls, r: Reader) -> DemoteResult:
        return cls(
            api_version=r.string("apiVersion"),
            role=r.choice("role", Role),
            term=r.integer("term"),
            releasing=r.boolean("releasing"),
        )


# --------------------------------------------------------------------------- errors


class ErrorReason(enum.StrEnum):
    """Machine-readable reason of an error response; `error` carries the human message."""

    BAD_REQUEST = "BadRequest"  # 400: malformed body or parameters
    UNAUTHORIZED = "Unauthorized"  # 401: no bearer token
    FORBIDDEN = "Forbidden"  # 403: wrong bearer token
    NOT_FOUND = "NotFound"  # 404
    METHOD_NOT_ALLOWED = "MethodNotAllowed"  # 405
    STALE_TERM = "StaleTerm"  # 409: promote term not above the current one
    WRONG_ROLE = "WrongRole"  # 409: e.g. checkpoint asked of a secondary
    CONFLICT = "Conflict"  # 409: arbiter held by someone else, ...
    NOT_READY = "NotReady"  # 503: e.g. a secondary not synced yet, no peer to checkpoint to
    UNAVAILABLE = "Unavailable"  # 503: arbiter unreachable, engine stopping
    INTERNAL = "Internal"  # 500


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Document):
    """Body of every 4xx/5xx response of the control API."""

    error: str
    reason: str  # an ErrorReason value, or a newer one
    api_version: str = API_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"apiVersion": self.api_version, "error": self.error, "reason": self.reason}

    @classmethod
    def _parse(cls, r: Reader) -> ErrorResponse:
        return cls(api_version=r.string("apiVersion"), error=r.string("error"), reason=r.string("reason"))


class ControlError(Exception):
    """Raised by the agent engine to refuse a control request; the server maps it to a response.

    Subclasses fix the HTTP status and reason so the engine speaks in domain
    terms and never in HTTP.
    """

    status: ClassVar[int] = 409
    reason: ClassVar[ErrorReason] = ErrorReason.CONFLICT

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=self.message, reason=self.reason.value)


class StaleTerm(ControlError):
    """A promotion asked for a term not higher than the one this agent knows."""

    reason = ErrorReason.STALE_TERM


class WrongRole(ControlError):
    reason = ErrorReason.WRONG_ROLE


class ArbiterConflict(ControlError):
    """The arbiter could not be taken (held and still valid, or lost a compare-and-swap)."""

    reason = ErrorReason.CONFLICT


class NotReady(ControlError):
    status = 503
    reason = ErrorReason.NOT_READY


class Unavailable(ControlError):
    status = 503
    reason = ErrorReason.UNAVAILABLE
