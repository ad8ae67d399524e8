"""The operator's Prometheus metrics.

The handlers tell `OperatorMetrics` what happened: how long a reconcile pass
took and whether it failed, and the status each pass wrote; transitions and
phases are read off those statuses (a completed failover or switchover shows
up as a new `status.lastFailover`), so nothing in the decisions knows about
metrics. Served on `--metrics-port` (default 9090) at `/metrics`.

Labelled series whose values are known in advance exist from the start at
zero (every phase, every transition kind and cause), so `increase()` and
alerts see the first event.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .decide import TransitionKind
from .failover import Cause
from .status import Phase

VMKey = tuple[str, str]

RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Failovers take from a few hundred milliseconds (switchover) to tens of seconds (a node lost
# with a long grace period); the buckets resolve the sub-3-second goal.
FAILOVER_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0)


class ReconcileError:
    """Values of `colo_operator_reconcile_errors_total{reason}`."""

    ACTION = "action"  # a Kubernetes or agent call of the plan failed; retried next pass
    EXCEPTION = "exception"  # the pass itself raised
    INVALID_SPEC = "invalid-spec"  # the ColoVM's spec could not be parsed
    ALL = (ACTION, EXCEPTION, INVALID_SPEC)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        registry = self.registry
        self._lock = threading.Lock()
        self._phases: dict[VMKey, str] = {}
        self._last_transition: dict[VMKey, object] = {}

        self.reconcile_seconds = Histogram(
            "colo_operator_reconcile_duration_seconds",
            "Time of one reconcile pass of one ColoVM (read the world, decide, apply, write status).",
            buckets=RECONCILE_BUCKETS,
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "colo_operator_reconcile_errors",
            "Reconcile passes that failed, by reason (action, exception, invalid-spec).",
            ["reason"],
            registry=registry,
        )
        self.transitions = Counter(
            "colo_operator_transitions",
            "Completed failovers and switchovers, by kind and cause.",
            ["kind", "cause"],
            registry=registry,
        )
        self.failover_seconds = Histogram(
            "colo_operator_failover_duration_seconds",
            "Time from the start of a failover or switchover to the new primary serving, by kind.",
            ["kind"],
            buckets=FAILOVER_BUCKETS,
            registry=registry,
        )
        self.vms = Gauge(
            "colo_operator_vms", "ColoVMs this operator reconciles, by phase.", ["phase"], registry=registry
        )
        self.vm_phase = Gauge(
            "colo_operator_vm_phase",
            "1 for the phase each ColoVM is in, 0 for the others (kube-state-metrics style).",
            ["namespace", "name", "phase"],
            registry=registry,
        )
        for reason in ReconcileError.ALL:
            self.reconcile_errors.labels(reason=reason)
        for kind in TransitionKind:
            self.failover_seconds.labels(kind=kind.value)
            for cause in Cause:
                self.transitions.labels(kind=kind.value, cause=cause.value)
        for phase in Phase:
            self.vms.labels(phase=phase.value).set(0)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def reconcile_failed(self, reason: str) -> None:
        self.reconcile_errors.labels(reason=reason).inc()

    def observe_status(self, key: VMKey, previous: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """The status a pass wrote (`new`) over the one it read (`previous`)."""
        last = new.get("lastFailover")
        with self._lock:
            if key not in self._last_transition:
                # Transitions completed before this operator started were counted by its predecessor.
                before = previous.get("lastFailover")
                self._last_transition[key] = _identity(before) if isinstance(before, Mapping) else None
            counted = self._last_transition[key]
            if isinstance(last, Mapping) and _identity(last) != counted:
                self._last_transition[key] = _identity(last)
                kind = TransitionKind.parse(last.get("kind")).value
                self.transitions.labels(kind=kind, cause=str(last.get("cause") or "Unknown")).inc()
                duration = last.get("durationMs")
                if isinstance(duration, int | float) and not isinstance(duration, bool) and duration >= 0:
                    self.failover_seconds.labels(kind=kind).observe(duration / 1000.0)
            phase = new.get("phase")
            if isinstance(phase, str) and phase:
                self._set_phase(key, phase)

    def forget(self, key: VMKey) -> None:
        """The ColoVM is gone: drop its series and its phase from the totals."""
        with self._lock:
            self._last_transition.pop(key, None)
            old = self._phases.pop(key, None)
            if old is None:
                return
            for phase in {p.value for p in Phase} | {old}:
                with contextlib.suppress(KeyError):
                    self.vm_phase.remove(key[0], key[1], phase)
            self._count_phases()

    def _set_phase(self, key: VMKey, phase: str) -> None:
        if self._phases.get(key) == phase:
            return
        self._phases[key] = phase
        for known in {p.value for p in Phase} | {phase}:
            self.vm_phase.labels(namespace=key[0], name=key[1], phase=known).set(1 if known == phase else 0)
        self._count_phases()

    def _count_phases(self) -> None:
        counts = {p.value: 0 for p in Phase}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.vms.labels(phase=phase).set(count)


def _identity(record: Mapping[str, Any]) -> object:
    return (record.get("time"), record.get("kind"), record.get("from"), record.get("to"))
