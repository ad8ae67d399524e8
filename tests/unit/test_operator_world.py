"""The shared operator world builders describe a consistent cluster."""

from __future__ import annotations

from dataclasses import replace

from support.operator_world import world


def test_default_world_is_consistent() -> None:
    s = world()
    assert s.pod("vm-0") is not None and s.node_of(s.pod("vm-0")) == s.nodes["n1"]
    assert s.agent(s.pod("vm-1")).status is not None
    assert s.agent(replace(s.pods[0], name="other")).status is None
