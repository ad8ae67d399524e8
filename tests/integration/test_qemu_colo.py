"""The qemu backend behind the guest seam, with QEMU's COLO and a real Linux guest running redis.

A primary QEMU boots the guest and serves redis on loopback; a secondary
QEMU listens (`MigrationStream.listen`), the primary protects it (disk
copied over NBD, block replication, COLO proxy, x-colo migration); a client
writes through colo-compare; the primary is killed with SIGKILL; the
secondary takes over; every acknowledged write is there, in RAM and in the
append-only file on the replicated disk; a third QEMU protects the promoted
primary again. TCG: these machines cannot run QEMU guests under KVM.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from support.qemu import QemuTools, Writer, free_port, missing, qemu_tools, reload_from_disk, wait_redis

from colo_agent.guest import Capabilities, GuestOptions
from colo_agent.qemu.backend import QemuGuest, QemuSettings
from colo_agent.qemu.command import Endpoint

pytestmark = pytest.mark.timeout(1200)
BOOT_TIMEOUT = 300.0  # about 6 s on an idle machine; this one is shared
MEMORY = 192 * 1024 * 1024


def _settings(tools: QemuTools, run: Path, disk: Path, ports: str, client: int) -> QemuSettings:
    env = {
        "COLO_QEMU_KERNEL": str(tools.guest / "vmlinuz"), "COLO_QEMU_INITRD": str(tools.guest / "initrd.img"),
        "COLO_QEMU_DISK": str(disk), "COLO_QEMU_RUN_DIR": str(run), "COLO_QEMU_BINARY": tools.binaries.qemu,
        "COLO_QEMU_IMG": tools.binaries.qemu_img, "COLO_QEMU_SERVE": f"127.0.0.1:{client}",
        "COLO_PEER": "127.0.0.1:7700", "COLO_QEMU_PORTS": ports, "COLO_QEMU_CHECKPOINT_MS": "200",
        "COLO_QEMU_LISTEN": "127.0.0.1",
    }
    return QemuSettings.from_env(GuestOptions(memory=MEMORY, accel="tcg"), env)


async def test_failover_keeps_every_acknowledged_write_and_reprotects(tmp_path: Path) -> None:
    tools = qemu_tools()
    disk = tools.disk_copy(tmp_path / "disk.qcow2")
    ports = ",".join(str(free_port()) for _ in range(4))
    port = free_port()
    client = Endpoint("127.0.0.1", port)
    guests = [QemuGuest(_settings(tools, tmp_path / name, disk, ports, port)) for name in ("a", "b", "c")]
    primary, secondary, third = guests
    try:
        caps = Capabilities.of(primary)
        assert caps.stream is primary and caps.pages is None and caps.clients is None

        primary.start()
        assert primary.primary is not None
        await primary.primary.ready()
        await primary.primary.serve(client)
        boot = await wait_redis(client, BOOT_TIMEOUT)
        print(f"guest booted and redis answered after {boot:.1f}s")
        before = Writer(client, "before")
        await before.run(asyncio.Event(), 50)
        assert len(before.acked) == 50

        # pause/resume go through QEMU's second monitor, synchronously.
        primary.pause()
        assert not primary.running
        primary.resume()
        assert primary.running

        started = time.monotonic()
        address = await secondary.listen()
        await primary.protect(address)
        assert secondary.secondary is not None
        await secondary.secondary.wait_protected()
        print(f"protected in {time.monotonic() - started:.1f}s")

        during = Writer(client, "during")
        await during.run(asyncio.Event(), 200, pause=0.005)
        assert len(during.acked) == 200 and during.errors == 0
        figures = await primary.primary.refresh()
        assert figures.mode == "primary" and figures.migration == "colo"
        assert primary.checkpoints >= 1, figures
        print(f"{figures.checkpoints} checkpoints, last pause {figures.last_pause_ms:.0f} ms")

        # Writes still going when the primary dies.
        stop = asyncio.Event()
        late = Writer(client, "late")
        writing = asyncio.create_task(late.run(stop, 100_000, pause=0.01))
        await asyncio.sleep(2.0)
        primary.stop()  # SIGKILL
        killed = time.monotonic()
        await secondary.take_over()
        await secondary.serve(client.host, client.port)
        took_over = time.monotonic() - killed
        await wait_redis(client, 60.0)
        answered = time.monotonic() - killed
        print(f"failover: took over {took_over:.2f}s, first answer {answered:.2f}s after the kill")
        stop.set()  # the writer stopped at its first failed write (the kill), or stops now
        await asyncio.wait_for(writing, 30.0)
        assert late.acked, "no write was acknowledged before the kill"

        # Re-protection at once: a new secondary for the promoted primary (whose
        # disk is still merging its failover overlays).
        address = await third.listen()
        await secondary.protect(address)
        assert third.secondary is not None
        await third.secondary.wait_protected()
        for w in (before, during, late):
            assert await missing(client, w.prefix, w.acked) == [], w.prefix
        await reload_from_disk(client)
        for w in (before, during, late):
            assert await missing(client, w.prefix, w.acked) == [], f"{w.prefix} after reload from disk"

        after = Writer(client, "after")
        await after.run(asyncio.Event(), 100, pause=0.005)
        assert len(after.acked) == 100
        assert secondary.primary is not None
        figures = await secondary.primary.refresh()
        assert figures.mode == "primary" and figures.checkpoints >= 1, figures

        # The new secondary is lost: the primary goes on alone and keeps serving.
        third.stop()
        await secondary.continue_alone()
        alone = Writer(client, "alone")
        await alone.run(asyncio.Event(), 20)
        assert len(alone.acked) == 20
        figures = await secondary.primary.refresh()
        assert figures.mode == "none"
    finally:
        for g in guests:
            g.stop()
        for g in guests:
            for side in (g.primary, g.secondary):
                if side is not None:
                    await side.stop()
    assert not list(tmp_path.rglob("*.sock")), "a stopped QEMU left its sockets behind"
