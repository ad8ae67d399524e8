"""A lockstep pairing that ends other than by losing the peer releases nothing alone."""

from __future__ import annotations

from typing import Any

from colo_agent.engine.compare import OutputComparator
from colo_agent.engine.primary import PrimaryRole


class _Mirror:
    def __init__(self, comparator: OutputComparator) -> None:
        self.comparator = comparator
        self.closed = False

    async def close(self) -> None:
        self.closed = True


async def test_output_held_for_the_secondary_is_dropped_not_released_alone() -> None:
    comparator = OutputComparator(0.1, 1 << 20)
    comparator.primary_output(7, b"+OK\r\n", False, 0.0, offset=0)
    assert comparator.pending_bytes == 5
    role: Any = PrimaryRole.__new__(PrimaryRole)  # only what ending a pairing touches
    mirror = _Mirror(comparator)
    role.mirror = mirror
    released: list[object] = []
    role._release = lambda out, *, alone: released.extend(out)
    role._release_mirrored = lambda out, *, alone=False: released.extend(out)
    await role._drop_mirror()
    assert released == []
    assert mirror.closed and role.mirror is None
    assert comparator.pending_bytes == 0
