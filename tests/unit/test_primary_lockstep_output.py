"""Which way a lockstep primary's output goes while a secondary pairs, and in what order it
leaves when the pairing is lost."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from colo_agent.engine.compare import OutputComparator, Release
from colo_agent.engine.output import OutputChunk, OutputGate
from colo_agent.engine.primary import PrimaryRole


class _Mirror:
    def __init__(self) -> None:
        self.comparator = OutputComparator(0.1, 1 << 20)
        self.closed = False

    def primary_output(self, conn: int, offset: int, data: bytes, closed: bool) -> None:
        self.comparator.primary_output(conn, data, closed, 0.0, offset=offset)

    async def close(self) -> None:
        self.closed = True


def _role(released: list[tuple[bytes, bool]]) -> Any:
    """Only what lockstep output and losing a pairing touch."""
    role: Any = PrimaryRole.__new__(PrimaryRole)
    role.gate = OutputGate()
    role.mirror = _Mirror()
    role.protected = False
    role.sender = None
    role._floor_ok = True
    role._release_event = asyncio.Event()
    role.parts = SimpleNamespace(metrics=SimpleNamespace(set_peer=lambda **_: None))

    def release(out: list[OutputChunk | Release], *, alone: bool) -> None:
        released.extend((o.data, alone) for o in out)

    role._release = release
    role._release_mirrored = lambda out, *, alone=False: release(out, alone=alone)
    return role


async def test_output_during_a_secondarys_first_sync_leaves_unprotected_not_held_for_it() -> None:
    # The secondary's guest runs none of our input before its first commit: nothing it could
    # match, and a checkpoint the comparator asks for meanwhile waits for the end of the sync.
    # Held for it, a reply waited as long as the sync took (a stalled one: for good).
    released: list[tuple[bytes, bool]] = []
    role = _role(released)
    loop = asyncio.create_task(role._release_loop())
    try:
        role._lockstep_output(7, 0, b"+OK\r\n", False)
        for _ in range(5):
            await asyncio.sleep(0)
        assert released == [(b"+OK\r\n", True)]
        assert role.mirror.comparator.pending_bytes == 0
        # From the first epoch's pause on (`protected`), the comparator has it.
        role.protected = True
        role._lockstep_output(7, 5, b":1\r\n", False)
        for _ in range(5):
            await asyncio.sleep(0)
        assert released == [(b"+OK\r\n", True)]
        assert role.mirror.comparator.pending_bytes == 4
    finally:
        loop.cancel()


async def test_a_pairing_lost_before_its_first_acknowledgement_releases_in_production_order() -> None:
    released: list[tuple[bytes, bool]] = []
    role = _role(released)
    floors: list[int] = []

    async def raise_floor() -> None:
        floors.append(1)

    role._raise_floor = raise_floor
    role.gate.hold(7, b"a", False)  # produced before the first epoch's pause
    role.gate.seal()
    role.protected = True
    role._lockstep_output(7, 1, b"b", False)  # after it: the comparator's
    mirror = role.mirror
    await role._unprotect("lost")
    role._lockstep_output(7, 2, b"c", False)  # unprotected again
    role._release(role.gate.release_all(), alone=True)
    assert [d for d, _ in released] == [b"a", b"b", b"c"]
    assert floors == [1] and mirror.closed and role.mirror is None
