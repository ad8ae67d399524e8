"""The agent's registry: counters present from the start, process figures, the ack-age gauge."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest

from colo_agent.api.metrics import AgentMetrics
from colo_agent.api.models import CheckpointCause, CheckpointFigures, Role


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_labelled_counters_exist_at_zero_before_their_first_increment() -> None:
    registry = CollectorRegistry()
    AgentMetrics(registry)
    for cause in CheckpointCause:
        assert registry.get_sample_value("colo_checkpoints_total", {"cause": cause.value}) == 0.0
    for how in ("match", "ack"):
        assert registry.get_sample_value("colo_lockstep_released_bytes_total", {"how": how}) == 0.0


def test_process_and_runtime_figures_are_in_the_agents_own_registry() -> None:
    registry = CollectorRegistry()
    AgentMetrics(registry)
    text = generate_latest(registry).decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "python_info", "python_gc_collections_total"):  # fmt: skip
        assert f"\n{name}" in text or text.startswith(name), name


def test_ack_age_counts_from_the_last_acknowledged_epoch_on_a_primary_only() -> None:
    registry, clock = CollectorRegistry(), Clock()
    metrics = AgentMetrics(registry, clock=clock)

    def age() -> float | None:
        return registry.get_sample_value("colo_ack_age_seconds")

    metrics.set_role(Role.SECONDARY, 0)
    assert math.isnan(age() or 0.0) and metrics.ack_age_ms() is None
    metrics.set_role(Role.PRIMARY, 3)
    clock.now += 2.5
    # No epoch acknowledged yet: the age runs from becoming primary.
    assert age() == 2.5 and metrics.ack_age_ms() == 2500.0
    metrics.checkpoint_acknowledged(CheckpointFigures(1, 0.1, 4, 16384, 3.0, "interval"))
    clock.now += 0.125
    assert age() == 0.125 and metrics.ack_age_ms() == 125.0
    assert registry.get_sample_value("colo_checkpoints_total", {"cause": "interval"}) == 1.0
