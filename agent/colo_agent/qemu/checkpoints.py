"""Checkpoint figures from QEMU's COLO trace (pure: lines in, checkpoints out).

QEMU reports no per-checkpoint figures over QMP. Its `colo_vm_state_change`
trace event marks the primary's pause ('run' => 'stop') and resume
('stop' => 'run') of every checkpoint; the log backend prefixes each line
with `pid@seconds.micros:` when QEMU runs with `-msg timestamp=on`.

Cause: the checkpoint timer fires `x-checkpoint-delay` after the previous
checkpoint was requested, and colo-compare requests one at once on an output
mismatch (and restarts the timer). A checkpoint that starts clearly before
the delay has passed since the previous one was therefore forced by
colo-compare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

TRACE_EVENT = "colo_vm_state_change"
_LINE = re.compile(r"^\d+@(\d+\.\d+):colo_vm_state_change Change '(\w+)' => '(\w+)'")
# A timer checkpoint can come a little early relative to the previous pause
# (the timer is armed when the request is made, the pause follows it).
_EARLY = 0.8


class Cause(StrEnum):
    INTERVAL = "interval"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Checkpoint:
    paused_at: float  # wall-clock seconds
    pause: float  # seconds the primary's guest was stopped
    cause: Cause


class CheckpointLog:
    """Feed it the trace file's text as it grows; it returns finished checkpoints."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._partial = ""
        self._paused_at: float | None = None
        self._previous_pause: float | None = None

    def feed(self, text: str) -> list[Checkpoint]:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        done: list[Checkpoint] = []
        for line in lines:
            m = _LINE.match(line)
            if m is None:
                continue
            at, old, new = float(m.group(1)), m.group(2), m.group(3)
            if (old, new) == ("run", "stop"):
                self._paused_at = at
            elif (old, new) == ("stop", "run") and self._paused_at is not None:
                started = self._paused_at
                prev = self._previous_pause
                early = prev is not None and started - prev < _EARLY * self.delay
                done.append(Checkpoint(started, at - started, Cause.MISMATCH if early else Cause.INTERVAL))
                self._previous_pause = started
                self._paused_at = None
        return done
