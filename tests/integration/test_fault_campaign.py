"""A short seeded fault campaign over an agent pair, both modes (`benchmarks/faults.py`
runs the long one): nothing acknowledged is lost, the counter stays between acknowledged
and attempted increments, and no fenced primary acknowledges anything."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

FAULTS = 10
SEED = 216  # its ten faults cover every kind
MEMORY = "32Mi"  # ten faults write far fewer keys than fill it; the long campaign's guests are larger
_TOOL = Path(__file__).resolve().parents[2] / "benchmarks" / "faults.py"


def _faults() -> ModuleType:
    spec = importlib.util.spec_from_file_location("colo_faults", _TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["colo_faults"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["checkpoint", "lockstep"])
def test_a_seeded_fault_campaign_loses_nothing(tmp_path: Path, mode: str) -> None:
    faults = _faults()
    r = faults.run_campaign(mode, FAULTS, seed=SEED, workdir=tmp_path, memory=MEMORY)
    print(faults.summary_line(r))
    assert r["faults_total"] == FAULTS
    assert r["lost"] == [], r
    assert r["fenced_acks"] == [], r
    assert r["counter_errors"] == [], r
    assert r["unrecovered"] is None, r
    assert r["acknowledged_writes"] > 100 and r["acknowledged_incr"] > 10, r
    assert set(r["faults"]) == set(faults.KINDS), r["faults"]
