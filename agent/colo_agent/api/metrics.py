"""The agent's Prometheus metrics, and the totals `GET /v1/status` reports from the same counts.

The engine owns one `AgentMetrics` and tells it what happened (`checkpoint_acknowledged`,
`failed_over`, ...); the control API serves the registry at `/metrics` and the
totals in the status document, so the two can never disagree.

Series carry no per-VM labels: one agent process protects one VM, and the
scrape (a PodMonitor) attaches pod and namespace. `colo_agent_info` says which
VM and pod this is, in the usual info-metric style.

Every labelled counter has each of its known label values from the start, at
zero, so `rate()` and `increase()` see the first increment (a series that
appears with its first increment has no earlier sample to compare with).
The registry also carries the process and Python collectors
(`process_resident_memory_bytes`, `process_cpu_seconds_total`, ...).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter as CountBy
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from colo_agent.api.models import API_VERSION, CheckpointCause, CheckpointFigures, Role, Totals

# A checkpoint pause is a memory copy of the dirty set: tens of microseconds to
# tens of milliseconds. The buckets must resolve the sub-millisecond end.
PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Pause start to acknowledgement: bounded by the network and the checkpoint interval.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class AgentMetrics:
    """Every metric of one agent, registered in `registry` (never the global one, so tests
    and several agents in one process do not collide)."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self._clock = clock
        # Monotonic time of the last acknowledged epoch (or of becoming primary); None on a secondary.
        self._ack_since: float | None = None
        self._lock = threading.Lock()
        self._checkpoints = 0
        self._pages = 0
        self._bytes = 0
        self._failovers = 0
        self._by_cause: CountBy[str] = CountBy()
        self._released_on_match = 0
        self._released_on_ack = 0
        self.info = Info("colo_agent", "Which VM and pod this agent is.", registry=registry)
        self._checkpoint_metrics(registry)
        self._state_metrics(registry)
        self._output_metrics(registry)
        self.ack_age_seconds.set_function(self._ack_age)
        # Known label values from the start, at zero.
        for cause in CheckpointCause:
            self.checkpoints.labels(cause=cause.value)
        for how in ("match", "ack"):
            self.lockstep_released_bytes.labels(how=how)
        # Process figures (memory, CPU, file descriptors) and the Python runtime's, in this registry.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def _checkpoint_metrics(self, registry: CollectorRegistry) -> None:
        self.checkpoints = Counter(
            "colo_checkpoints",
            "Checkpoints acknowledged by the secondary, by what triggered them.",
            ["cause"],
            registry=registry,
        )
        self.pause_seconds = Histogram(
            "colo_checkpoint_pause_seconds",
            "Time the guest was paused to take a checkpoint.",
            buckets=PAUSE_BUCKETS,
            registry=registry,
        )
        self.duration_seconds = Histogram(
            "colo_checkpoint_duration_seconds",
            "Time from a checkpoint's pause to its acknowledgement.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.pages = Counter(
            "colo_checkpoint_pages", "Guest pages sent in acknowledged checkpoints.", registry=registry
        )
        self.bytes = Counter(
            "colo_checkpoint_bytes",
            "Payload bytes (pages and device state) of acknowledged checkpoints.",
            registry=registry,
        )

    def _state_metrics(self, registry: CollectorRegistry) -> None:
        self.last_acked_epoch = Gauge(
            "colo_last_acked_epoch",
            "Last epoch acknowledged by the secondary in the current term.",
            registry=registry,
        )
        self.term = Gauge("colo_term", "Fencing term this agent holds or last saw.", registry=registry)
        self.role = Enum(
            "colo_role", "Role of this agent.", states=[r.value for r in Role], registry=registry
        )
        self.peer_up = Gauge(
            "colo_peer_up", "1 while the peer's heartbeat is within its timeout.", registry=registry
        )
        self.synced = Gauge(
            "colo_synced",
            "1 when the VM is protected (primary) or promotable (secondary).",
            registry=registry,
        )
        self.failovers = Counter("colo_failovers", "Promotions this agent went through.", registry=registry)
        self.lease_valid = Gauge(
            "colo_lease_valid",
            "1 while this agent holds a valid arbiter lease and may release output.",
            registry=registry,
        )
        self.failover_possible = Gauge(
            "colo_failover_possible",
            "1 while a failover could happen now: the VM is protected (primary) or promotable "
            "(secondary) and this agent reaches the arbiter. 0 during an arbiter (API server) "
            "outage: protected VMs keep serving, but nobody can take the lease.",
            registry=registry,
        )
        self.ack_age_seconds = Gauge(
            "colo_ack_age_seconds",
            "Primary: seconds since the last acknowledged epoch (since becoming primary before the "
            "first): how much guest execution a failover now would roll back. NaN on a secondary.",
            registry=registry,
        )

    def _output_metrics(self, registry: CollectorRegistry) -> None:
        self.output_held_bytes = Gauge(
            "colo_output_held_bytes",
            "Guest output waiting for its epoch's acknowledgement before release.",
            registry=registry,
        )
        self.lockstep_released_bytes = Counter(
            "colo_lockstep_released_bytes",
            "Lockstep: output bytes released because both guests produced them (match) or because "
            "their epoch was acknowledged (ack).",
            ["how"],
            registry=registry,
        )

    def _ack_age(self) -> float:
        since = self._ack_since
        return math.nan if since is None else max(0.0, self._clock() - since)

    def ack_age_ms(self) -> float | None:
        """Milliseconds since the last acknowledged epoch on a primary; None on a secondary."""
        age = self._ack_age()
        return None if math.isnan(age) else round(age * 1000.0, 3)

    def lockstep_released(self, nbytes: int, *, on_match: bool) -> None:
        self.lockstep_released_bytes.labels(how="match" if on_match else "ack").inc(nbytes)
        with self._lock:
            if on_match:
                self._released_on_match += nbytes
            else:
                self._released_on_ack += nbytes

    @property
    def released_bytes(self) -> tuple[int, int]:
        """(on match, on ack) since start."""
        with self._lock:
            return self._released_on_match, self._released_on_ack

    def describe(self, *, vm: str, identity: str, mode: str, accel: str) -> None:
        self.info.info(
            {"vm": vm, "identity": identity, "mode": mode, "accel": accel, "api_version": API_VERSION}
        )

    def checkpoint_acknowledged(self, figures: CheckpointFigures) -> None:
        with self._lock:
            self._checkpoints += 1
            self._pages += figures.pages
            self._bytes += figures.bytes
            self._by_cause[figures.cause] += 1
        self.checkpoints.labels(cause=figures.cause).inc()
        self.pause_seconds.observe(figures.pause_ms / 1000.0)
        self.duration_seconds.observe(figures.duration_ms / 1000.0)
        self.pages.inc(figures.pages)
        self.bytes.inc(figures.bytes)
        self.last_acked_epoch.set(figures.epoch)
        self._ack_since = self._clock()

    def failed_over(self) -> None:
        with self._lock:
            self._failovers += 1
        self.failovers.inc()

    def set_role(self, role: Role, term: int) -> None:
        self.role.state(role.value)
        self.term.set(term)
        # A new primary has nothing acknowledged yet: its age counts from now.
        self._ack_since = self._clock() if role is Role.PRIMARY else None

    def new_term(self, term: int) -> None:
        # Epochs restart at 1 in every term.
        self.term.set(term)
        self.last_acked_epoch.set(0)

    def set_peer(self, *, up: bool, synced: bool) -> None:
        self.peer_up.set(1 if up else 0)
        self.synced.set(1 if synced else 0)

    def set_output_held(self, nbytes: int) -> None:
        self.output_held_bytes.set(nbytes)

    def set_lease_valid(self, valid: bool) -> None:
        self.lease_valid.set(1 if valid else 0)

    def totals(self) -> Totals:
        with self._lock:
            return Totals(
                checkpoints=self._checkpoints,
                pages=self._pages,
                bytes=self._bytes,
                failovers=self._failovers,
                checkpoints_by_cause=dict(self._by_cause),
            )
