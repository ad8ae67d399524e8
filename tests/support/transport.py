"""A stand-in primary guest (RAM with a dirty log), and pairing as the engine pairs, for the
transport tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from colo_agent.replication import protocol as p
from colo_agent.replication.cache import StagingBuffer, image_digest, page_view
from colo_agent.replication.transport import CheckpointReceiver, CheckpointSender, Listener

SECRET = b"integration-secret-0123456789"
VM = "tests/vm"
PAGES = 2048  # 8 MiB of guest RAM
PAGE = p.PAGE_SIZE


class Guest:
    """Primary-side RAM with a dirty log, standing in for a running guest."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.mem = bytearray(self.rng.integers(0, 256, PAGES * PAGE, dtype=np.uint8).tobytes())
        self.ram = page_view(self.mem)
        self.dirty = np.zeros(PAGES, dtype=bool)
        self.staging = StagingBuffer(PAGES)

    def write(self, k: int) -> None:
        idx = self.rng.integers(0, PAGES, size=k)
        self.ram[idx] = self.rng.integers(0, 256, size=(k, PAGE), dtype=np.uint8)
        self.dirty[idx] = True

    def collect_dirty(self) -> np.ndarray:
        out = np.flatnonzero(self.dirty).astype(np.int64)
        self.dirty[:] = False
        return out

    async def checkpoint(self, sender: CheckpointSender, extra: np.ndarray | None = None) -> tuple[int, str]:
        """Pause, stage, resume, stream; returns (epoch, digest of RAM at the pause)."""
        dirty = self.collect_dirty()
        if extra is not None:
            dirty = np.union1d(dirty, extra).astype(np.int64)
        staged = self.staging.stage(self.ram, dirty)
        digest = image_digest(self.mem)
        epoch = sender.next_epoch
        result = await sender.send_epoch(dirty, staged, f"device-state-{epoch}".encode())
        assert result.epoch == epoch and result.pages == len(dirty)
        return epoch, digest


async def pair(
    rx: CheckpointReceiver,
    *,
    through: Callable[[int], Awaitable[int]] | None = None,
    **options: Any,
) -> CheckpointSender:
    """Pair `rx` with a new primary the way the engine does: the primary listens
    (`CheckpointSender.accept`) and the secondary dials it (`CheckpointReceiver.dial`).

    `through(port)` puts something between them (a proxy forwarding to the
    primary's port) and returns the port the secondary dials instead.
    `options` go to `accept` (secret, VM, term, page count and 2 channels by default).
    """
    options = {"secret": SECRET, "vm": VM, "term": 1, "page_count": PAGES, "channels": 2, **options}
    listener = Listener("127.0.0.1", 0)
    try:
        port = listener.port if through is None else await through(listener.port)
        accepting = asyncio.ensure_future(CheckpointSender.accept(listener, **options))
        try:
            await rx.dial("127.0.0.1", port, mirror=bool(options.get("mirror")))
            return await asyncio.wait_for(accepting, 30)
        finally:
            accepting.cancel()
    finally:
        listener.close()
