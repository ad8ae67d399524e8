"""The README's first command, end to end: `colo-agent demo` must find nothing lost and exit 0."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("mode", ["checkpoint", "lockstep"])
def test_demo_loses_nothing_and_says_so(mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "colo_agent", "demo", "--plain", "--accel", "tcg", "--mode", mode,
         "--writes-for", "2", "--clients", "2"],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "no acknowledged write was lost" in out
    assert "missing after failover" in out and "failover (kill -> first write)" in out
