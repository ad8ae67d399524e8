"""The operator's metrics: series present from the start, transitions read off the statuses the
reconcile passes write, phases per VM and in total."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from colo_operator.metrics import OperatorMetrics, ReconcileError

KEY = ("ns", "vm")
FAILOVER = {"kind": "Failover", "cause": "NodeNotReady", "durationMs": 1850.0, "time": "2026-11-25T20:00:01Z",
            "from": "vm-0", "to": "vm-1"}  # fmt: skip


def sample(m: OperatorMetrics, metric: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(metric, labels)


def test_every_known_series_exists_at_zero_from_the_start() -> None:
    m = OperatorMetrics(CollectorRegistry())
    for reason in ReconcileError.ALL:
        assert sample(m, "colo_operator_reconcile_errors_total", reason=reason) == 0.0
    assert sample(m, "colo_operator_transitions_total", kind="Failover", cause="NodeNotReady") == 0.0
    assert sample(m, "colo_operator_transitions_total", kind="Switchover", cause="NodeDrain") == 0.0
    assert sample(m, "colo_operator_failover_duration_seconds_count", kind="Failover") == 0.0
    assert sample(m, "colo_operator_vms", phase="Protected") == 0.0
    assert sample(m, "colo_operator_vms", phase="Stopped") == 0.0
    text = generate_latest(m.registry).decode()
    assert "process_resident_memory_bytes" in text
    assert "colo_operator_reconcile_duration_seconds_bucket" in text


def test_a_completed_failover_is_counted_once_with_its_duration() -> None:
    m = OperatorMetrics(CollectorRegistry())
    before = {"phase": "FailingOver", "failovers": 0}
    after = {"phase": "Degraded", "failovers": 1, "lastFailover": FAILOVER}
    m.observe_status(KEY, before, after)
    # The next passes see the same record (and a status write may have failed and be redone).
    m.observe_status(KEY, before, after)
    m.observe_status(KEY, after, {**after, "phase": "Protected"})
    assert sample(m, "colo_operator_transitions_total", kind="Failover", cause="NodeNotReady") == 1.0
    assert sample(m, "colo_operator_failover_duration_seconds_count", kind="Failover") == 1.0
    assert sample(m, "colo_operator_failover_duration_seconds_sum", kind="Failover") == 1.85
    assert sample(m, "colo_operator_failover_duration_seconds_bucket", kind="Failover", le="2.0") == 1.0
    assert sample(m, "colo_operator_failover_duration_seconds_bucket", kind="Failover", le="1.5") == 0.0
    switch = {**FAILOVER, "kind": "Switchover", "cause": "Switchover", "durationMs": 300.0,
              "time": "2026-11-25T20:05:00Z"}  # fmt: skip
    m.observe_status(KEY, {"phase": "FailingOver"}, {"phase": "Syncing", "lastFailover": switch})
    assert sample(m, "colo_operator_transitions_total", kind="Switchover", cause="Switchover") == 1.0


def test_a_restarted_operator_does_not_count_its_predecessors_transitions() -> None:
    m = OperatorMetrics(CollectorRegistry())
    old = {"phase": "Protected", "lastFailover": FAILOVER}
    m.observe_status(KEY, old, old)
    assert sample(m, "colo_operator_transitions_total", kind="Failover", cause="NodeNotReady") == 0.0


def test_phases_per_vm_and_in_total_and_forgotten_on_delete() -> None:
    m = OperatorMetrics(CollectorRegistry())
    m.observe_status(KEY, {}, {"phase": "Syncing"})
    m.observe_status(("ns", "other"), {}, {"phase": "Syncing"})
    assert sample(m, "colo_operator_vms", phase="Syncing") == 2.0
    m.observe_status(KEY, {}, {"phase": "Protected"})
    assert sample(m, "colo_operator_vms", phase="Syncing") == 1.0
    assert sample(m, "colo_operator_vms", phase="Protected") == 1.0
    assert sample(m, "colo_operator_vm_phase", namespace="ns", name="vm", phase="Protected") == 1.0
    assert sample(m, "colo_operator_vm_phase", namespace="ns", name="vm", phase="Syncing") == 0.0
    m.forget(KEY)
    assert sample(m, "colo_operator_vm_phase", namespace="ns", name="vm", phase="Protected") is None
    assert sample(m, "colo_operator_vms", phase="Protected") == 0.0


def test_reconcile_errors_by_reason() -> None:
    m = OperatorMetrics(CollectorRegistry())
    m.reconcile_failed(ReconcileError.ACTION)
    m.reconcile_failed(ReconcileError.ACTION)
    assert sample(m, "colo_operator_reconcile_errors_total", reason="action") == 2.0
    assert sample(m, "colo_operator_reconcile_errors_total", reason="exception") == 0.0
