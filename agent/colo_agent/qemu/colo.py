"""The two sides of a QEMU COLO pair, as the agent drives them.

`ColoPrimary` runs the guest, serves it, and protects it whenever a
secondary is ready: disk copied to the secondary (drive-mirror over NBD),
block replication attached, the COLO proxy added, the x-colo migration
started. When its secondary is lost it yanks the COLO sockets, tears the
replication and proxy down and runs on unprotected; a later `protect()`
starts over with a new secondary.

`ColoSecondary` creates its parent, hidden and active disks, starts QEMU
waiting for the migration, exports its parent disk, and on `failover()`
takes over: the guest continues from the last checkpoint and the object
becomes the new primary (`ColoPrimary.adopt`).

Heartbeat, fencing and the decision to fail over belong to the agent; this
module only carries them out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colo_agent.qemu import plan
from colo_agent.qemu.checkpoints import Checkpoint, CheckpointLog
from colo_agent.qemu.command import (
    Endpoint,
    GuestSpec,
    PrimaryPorts,
    RunDir,
    SecondaryPorts,
    primary_argv,
    secondary_argv,
)
from colo_agent.qemu.process import QemuError, QemuProcess, qemu_img_create

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Binaries:
    qemu: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"


@dataclass
class ColoFigures:
    """What QEMU reports about a pair, for the agent's status and metrics."""

    mode: str = "none"  # query-colo-status: primary, secondary or none
    last_mode: str = "none"
    exit_reason: str = "none"  # why COLO last ended: request (failover), error, none
    migration: str = "none"  # query-migrate status: setup, active, colo, completed, failed, ...
    checkpoints: int = 0
    mismatches: int = 0
    last_pause_ms: float = 0.0
    recent: list[Checkpoint] = field(default_factory=list)


class ColoPrimary:
    def __init__(
        self, binaries: Binaries, spec: GuestSpec, run: RunDir, ports: PrimaryPorts, checkpoint_delay_ms: int,
        process: QemuProcess | None = None, has_rewriter: bool = False,
    ) -> None:
        self.binaries = binaries
        self.spec = spec
        self.run = run
        self.ports = ports
        self.checkpoint_delay_ms = checkpoint_delay_ms
        self.process = process
        self.has_rewriter = has_rewriter  # a promoted secondary keeps its filter-rewriter
        self.protected = False
        self.figures = ColoFigures()
        self._trace = CheckpointLog(checkpoint_delay_ms / 1000.0)
        self._trace_offset = 0
        self._serving: Endpoint | None = None

    @classmethod
    def adopt(cls, secondary: ColoSecondary, ports: PrimaryPorts, checkpoint_delay_ms: int) -> ColoPrimary:
        assert secondary.process is not None
        primary = cls(secondary.binaries, secondary.spec, secondary.run, ports, checkpoint_delay_ms,
                      process=secondary.process, has_rewriter=True)
        primary._trace_offset = _size(secondary.run.trace)
        return primary

    @property
    def qemu(self) -> QemuProcess:
        if self.process is None:
            raise QemuError("the primary's QEMU is not running")
        return self.process

    def spawn(self, disk: Path) -> None:
        """Boot the guest; QMP connects at the first `ready()`."""
        argv = primary_argv(self.binaries.qemu, self.spec, self.run, disk)
        self.process = QemuProcess(argv, self.run, "primary")
        self.process.spawn()

    async def ready(self) -> None:
        await self.qemu.connect()

    async def start(self, disk: Path) -> None:
        self.spawn(disk)
        await self.ready()

    async def serve(self, client: Endpoint) -> None:
        """Open the guest's service on `client` (the agent holds the lease)."""
        if self._serving == client:
            return
        await self.qemu.run_plan([plan.serve(client, self.spec.guest_port)])
        self._serving = client

    async def unserve(self) -> None:
        if self._serving is not None:
            await self.qemu.run_plan([plan.unserve(self._serving)])
            self._serving = None

    async def protect(self, secondary: SecondaryPorts, timeout: float = 120.0) -> None:
        """Bring a prepared secondary in sync and start COLO; on failure run on unprotected."""
        q = self.qemu
        started = time.monotonic()
        try:
            await q.run_plan(plan.primary_proxy(self.ports, self.run, self.has_rewriter))
            since = time.monotonic()
            await self._start_disk_sync(secondary, timeout)
            await q.wait_event("BLOCK_JOB_READY", since, timeout,
                               lambda e: e.data.get("device") == plan.RESYNC_JOB)
            await q.execute("stop")
            since = time.monotonic()
            await q.run_plan(plan.primary_attach_replication(secondary.nbd)[:1])
            await q.wait_event("BLOCK_JOB_COMPLETED", since, timeout,
                               lambda e: e.data.get("device") == plan.RESYNC_JOB)
            await q.run_plan(plan.primary_attach_replication(secondary.nbd)[1:])
            self._trace_offset = _size(self.run.trace)
            await q.run_plan(plan.primary_migrate(secondary.migration, self.checkpoint_delay_ms))
            await q.wait_until(self._in_colo, "COLO", timeout)
        except (QemuError, asyncio.CancelledError):
            log.warning("protection failed after %.1fs; running unprotected", time.monotonic() - started)
            await self.lose_secondary()
            raise
        self.protected = True
        log.info("protected in %.1fs", time.monotonic() - started)

    async def _start_disk_sync(self, secondary: SecondaryPorts, timeout: float) -> None:
        # A promoted secondary's replication driver still merges its active and
        # hidden disks for a while after the failover, in a job QMP does not
        # list; the disk copy can start only once that job is done.
        cmd = plan.primary_disk_sync(secondary.nbd)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.qemu.execute(cmd.name, dict(cmd.args))
                return
            except QemuError as exc:
                if "is busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                log.info("disk busy after the failover; copy waits: %s", exc)
                await asyncio.sleep(0.5)

    async def _in_colo(self) -> bool:
        info = await self.qemu.execute("query-migrate")
        status = str(info.get("status", "none"))
        if status in ("failed", "cancelled"):
            raise QemuError(f"COLO migration {status}: {info.get('error-desc', '')}")
        return status == "colo"

    async def yank(self) -> None:
        """Shut down every COLO socket (migration, NBD, proxy) so nothing waits on a hung peer."""
        q = self.qemu
        try:
            instances = await q.execute("query-yank")
        except QemuError as exc:
            log.info("query-yank: %s", exc)
            return
        wanted = [
            i for i in instances
            if i["type"] in ("migration", "block-node")
            or (i["type"] == "chardev" and i.get("id") in plan.PROXY_CHARDEVS)
        ]
        if wanted:
            await q.run_plan([plan.Command("yank", {"instances": wanted}, tolerant=True)])

    async def lose_secondary(self) -> None:
        """The secondary is gone: leave COLO and run on alone (the agent has written the epoch floor)."""
        q = self.qemu
        await self.yank()
        await q.run_plan(plan.primary_failover())
        await q.wait_until(self._left_colo, "end of COLO", 30.0)
        if await q.run_state() != "running":
            await q.execute("cont")
        self.protected = False

    async def _left_colo(self) -> bool:
        colo = await self.qemu.execute("query-colo-status")
        migrate = await self.qemu.execute("query-migrate")
        return colo["mode"] == "none" and migrate.get("status") != "colo"

    async def refresh(self) -> ColoFigures:
        f = self.figures
        colo = await self.qemu.execute("query-colo-status")
        f.mode, f.last_mode, f.exit_reason = colo["mode"], colo["last-mode"], colo["reason"]
        f.migration = str((await self.qemu.execute("query-migrate")).get("status", "none"))
        new = self._read_trace()
        if new:
            f.checkpoints += len(new)
            f.mismatches += sum(1 for c in new if c.cause == "mismatch")
            f.last_pause_ms = new[-1].pause * 1000.0
            f.recent = (f.recent + new)[-256:]
        return f

    def _read_trace(self) -> list[Checkpoint]:
        try:
            with self.run.trace.open("r", errors="replace") as fh:
                fh.seek(self._trace_offset)
                text = fh.read()
                self._trace_offset = fh.tell()
        except OSError:
            return []
        return self._trace.feed(text)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.kill()


class ColoSecondary:
    def __init__(
        self, binaries: Binaries, spec: GuestSpec, run: RunDir, primary: PrimaryPorts, ports: SecondaryPorts
    ) -> None:
        self.binaries = binaries
        self.spec = spec
        self.run = run
        self.primary = primary
        self.ports = ports
        self.process: QemuProcess | None = None

    @property
    def qemu(self) -> QemuProcess:
        if self.process is None:
            raise QemuError("the secondary's QEMU is not running")
        return self.process

    async def start(self, disk_size: int) -> None:
        """Fresh disks of the primary's size, QEMU waiting for the migration, parent disk exported."""
        self.run.path.mkdir(parents=True, exist_ok=True)
        for disk in (self.run.parent_disk, self.run.hidden_disk, self.run.active_disk):
            disk.unlink(missing_ok=True)
            await qemu_img_create(self.binaries.qemu_img, disk, disk_size)
        argv = secondary_argv(self.binaries.qemu, self.spec, self.run, self.primary, self.ports)
        self.process = QemuProcess(argv, self.run, "secondary")
        await self.process.start()
        await self.process.run_plan(plan.secondary_prepare(self.ports))

    async def colo_mode(self) -> str:
        return str((await self.qemu.execute("query-colo-status"))["mode"])

    async def wait_protected(self, timeout: float = 120.0) -> None:
        async def in_colo() -> bool:
            return await self.colo_mode() == "secondary"

        await self.qemu.wait_until(in_colo, "COLO secondary mode", timeout)

    async def failover(self) -> None:
        """The primary is lost: the guest continues here from the last checkpoint."""
        q = self.qemu
        await q.run_plan(plan.secondary_failover())

        async def running() -> bool:
            return await self.colo_mode() == "none" and await q.run_state() == "running"

        await q.wait_until(running, "the guest running after failover", 30.0, every=0.02)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.kill()


async def disk_size(qemu_img: str, disk: Path) -> int:
    """Virtual size of an image: the secondary's disks must have exactly this size."""
    proc = await asyncio.create_subprocess_exec(
        qemu_img, "info", "--output=json", "-U", str(disk),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise QemuError(f"qemu-img info {disk}: {out.decode(errors='replace').strip()}")
    info: dict[str, Any] = json.loads(out)
    return int(info["virtual-size"])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
