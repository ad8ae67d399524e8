"""QEMU as a `colo_agent.guest` backend: `--backend qemu`.

The guest replicates itself (`MigrationStream`): QEMU's COLO streams the
checkpoints, colo-compare releases the output, the quorum + replication
drivers copy the disk. The agent pairs, heartbeats, fences and promotes.
The guest has its own network device (QEMU's user-mode network; the
service is a host forward opened on the primary only), so there is no
`client_nic()`, and no `mirrored_nic()`: lockstep is what COLO itself does.
COLO runs single-stream: multifd with x-colo does not work in QEMU 10.0.

Configuration beyond `GuestOptions` comes from the environment, the same in
a pod spec and on a command line:

| variable | meaning | default |
|---|---|---|
| `COLO_QEMU_KERNEL`, `COLO_QEMU_INITRD` | the guest's kernel and initramfs | required |
| `COLO_QEMU_DISK` | the primary's disk image (qcow2), e.g. on a PVC | required on a primary |
| `COLO_QEMU_DISK_SIZE` | disk size in bytes (a primary without an image: empty) | from `COLO_QEMU_DISK` |
| `COLO_QEMU_RUN_DIR` | QMP socket, console, trace, the secondary's disks | `/tmp/colo-qemu` |
| `COLO_QEMU_BINARY`, `COLO_QEMU_IMG` | QEMU and qemu-img | from `PATH` |
| `COLO_QEMU_VCPUS`, `COLO_QEMU_NIC` | vCPUs; `e1000` or `virtio-net-pci` | 1, `e1000` |
| `COLO_QEMU_SERVE` | HOST:PORT of the service (`colo-agent run`: `--host`/`--port`) | `0.0.0.0:6379` |
| `COLO_QEMU_GUEST_PORT` | the service's port inside the guest | 6379 |
| `COLO_QEMU_PEER_HOST` | the primary's host, for a secondary's redirectors | host of `--peer` |
| `COLO_QEMU_LISTEN` | address QEMU's COLO ports listen on | `0.0.0.0` |
| `COLO_QEMU_ADVERTISE` | this agent's host as its peer reaches it | `127.0.0.1` |
| `COLO_QEMU_PORTS` | MIRROR,COMPARE,MIGRATION,NBD ports | `7711,7712,7713,7714` |
| `COLO_QEMU_CHECKPOINT_MS` | QEMU's `x-checkpoint-delay` | 200 |
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from colo_agent.guest import (
    ClientNic,
    Guest,
    GuestOptions,
    MigrationStream,
    MirroredNic,
    PageLog,
    StreamCheckpoint,
    StreamFigures,
)
from colo_agent.qemu.colo import Binaries, ColoPrimary, ColoSecondary
from colo_agent.qemu.command import (
    Accel,
    Endpoint,
    GuestSpec,
    NicModel,
    PrimaryPorts,
    RunDir,
    SecondaryPorts,
)
from colo_agent.qemu.process import QemuError

MIB = 1024 * 1024


@dataclass(frozen=True)
class QemuSettings:
    binaries: Binaries
    spec: GuestSpec
    run_dir: Path
    disk: Path | None
    disk_size: int | None
    serve: Endpoint
    peer_host: str | None
    listen: str
    advertise: str
    ports: tuple[int, int, int, int]  # mirror, compare, migration, nbd
    checkpoint_ms: int

    @classmethod
    def from_env(cls, options: GuestOptions, env: Mapping[str, str]) -> QemuSettings:
        def need(name: str) -> str:
            value = env.get(name)
            if not value:
                raise ValueError(f"{name} is required by the qemu backend")
            return value

        def number(name: str, default: int) -> int:
            text = env.get(name, str(default))
            if not text.isdigit():
                raise ValueError(f"{name}={text!r} is not a number")
            return int(text)

        ports_text = env.get("COLO_QEMU_PORTS", "7711,7712,7713,7714").split(",")
        if len(ports_text) != 4 or not all(p.isdigit() and 0 < int(p) < 65536 for p in ports_text):
            raise ValueError("COLO_QEMU_PORTS must be MIRROR,COMPARE,MIGRATION,NBD ports")
        ports = (int(ports_text[0]), int(ports_text[1]), int(ports_text[2]), int(ports_text[3]))
        try:
            nic = NicModel(env.get("COLO_QEMU_NIC", "e1000"))
        except ValueError:
            raise ValueError(f"COLO_QEMU_NIC must be one of {', '.join(m.value for m in NicModel)}") from None
        accel = Accel.KVM if options.accel == "kvm" else Accel.TCG
        spec = GuestSpec(
            kernel=Path(need("COLO_QEMU_KERNEL")), initrd=Path(need("COLO_QEMU_INITRD")),
            memory_mib=max(1, options.memory // MIB), vcpus=number("COLO_QEMU_VCPUS", 1), nic=nic,
            accel=accel, guest_port=number("COLO_QEMU_GUEST_PORT", 6379),
        )
        serve_host, _, serve_port = env.get("COLO_QEMU_SERVE", "0.0.0.0:6379").rpartition(":")
        if not serve_port.isdigit():
            raise ValueError("COLO_QEMU_SERVE must be HOST:PORT")
        peer = (env.get("COLO_QEMU_PEER_HOST") or options.peer_host
                or env.get("COLO_PEER", "").rpartition(":")[0] or None)
        disk = Path(env["COLO_QEMU_DISK"]) if env.get("COLO_QEMU_DISK") else None
        size = number("COLO_QEMU_DISK_SIZE", 0) or None
        default = Binaries()
        binaries = Binaries(env.get("COLO_QEMU_BINARY", default.qemu),
                            env.get("COLO_QEMU_IMG", default.qemu_img))
        return cls(
            binaries=binaries, spec=spec, run_dir=Path(env.get("COLO_QEMU_RUN_DIR", "/tmp/colo-qemu")),
            disk=disk, disk_size=size,
            serve=Endpoint(serve_host or "0.0.0.0", int(serve_port)), peer_host=peer,
            listen=env.get("COLO_QEMU_LISTEN", "0.0.0.0"),
            advertise=env.get("COLO_QEMU_ADVERTISE", "127.0.0.1"), ports=ports,
            checkpoint_ms=number("COLO_QEMU_CHECKPOINT_MS", 200),
        )

    def primary_ports(self, host: str) -> PrimaryPorts:
        return PrimaryPorts(mirror=Endpoint(host, self.ports[0]), compare=Endpoint(host, self.ports[1]))

    def secondary_ports(self, host: str) -> SecondaryPorts:
        return SecondaryPorts(migration=Endpoint(host, self.ports[2]), nbd=Endpoint(host, self.ports[3]))


def parse_secondary(address: str) -> SecondaryPorts:
    """`HOST:MIGRATION:NBD`, what a secondary's `listen()` returns."""
    host, _, rest = address.partition(":")
    migration, _, nbd = rest.partition(":")
    if not host or not migration.isdigit() or not nbd.isdigit():
        raise ValueError(f"{address!r} is not HOST:MIGRATION_PORT:NBD_PORT")
    return SecondaryPorts(migration=Endpoint(host, int(migration)), nbd=Endpoint(host, int(nbd)))


class QemuGuest:
    """One QEMU guest; a primary from `start()`, a secondary from `listen()`."""

    def __init__(self, settings: QemuSettings) -> None:
        self.settings = settings
        self.primary: ColoPrimary | None = None
        self.secondary: ColoSecondary | None = None
        self._paused = False
        self._serve = settings.serve  # where the primary opens the guest's service

    # --- Guest
    @property
    def accelerator(self) -> str:
        return self.settings.spec.accel.value

    @property
    def ram_size(self) -> int:
        return self.settings.spec.memory_mib * MIB

    @property
    def running(self) -> bool:
        side = self.primary or self.secondary
        return side is not None and side.process is not None and side.process.returncode is None \
            and not self._paused

    def start(self) -> None:
        """Boot the guest as a primary (a promoted secondary is already running)."""
        if self.primary is not None:
            self.resume()
            return
        s = self.settings
        if s.disk is None:
            raise QemuError("a primary needs COLO_QEMU_DISK, its disk image")
        if not s.disk.exists():
            if s.disk_size is None:
                raise QemuError(f"COLO_QEMU_DISK {s.disk} does not exist "
                                "(with COLO_QEMU_DISK_SIZE the agent creates an empty one)")
            _create_empty_disk(s.binaries.qemu_img, s.disk, s.disk_size)
        run = RunDir(s.run_dir / "primary")
        self.primary = ColoPrimary(s.binaries, s.spec, run, s.primary_ports(s.listen), s.checkpoint_ms)
        self.primary.spawn(s.disk)

    def stop(self) -> None:
        for side in (self.primary, self.secondary):
            if side is not None and side.process is not None:
                side.process.kill_now()

    def pause(self) -> None:
        self._paused = True
        self._monitor("stop")

    def resume(self) -> None:
        self._paused = False
        self._monitor("cont")

    def _monitor(self, command: str) -> None:
        # The engine calls pause/resume synchronously from its event loop: they go
        # to QEMU's second monitor, so the asynchronous one stays free.
        side = self.primary or self.secondary
        if side is not None and side.process is not None and side.process.returncode is None:
            qmp_sync(side.run.qmp_sync, command)

    def page_log(self) -> PageLog | None:
        return None

    def migration_stream(self) -> MigrationStream | None:
        return self

    def client_nic(self) -> ClientNic | None:
        return None

    def mirrored_nic(self) -> MirroredNic | None:
        return None

    # --- MigrationStream
    async def listen(self) -> str:
        s = self.settings
        if s.peer_host is None:
            raise QemuError("a secondary needs its primary's host (COLO_PEER or COLO_QEMU_PEER_HOST)")
        size = s.disk_size
        if size is None:
            if s.disk is None:
                raise QemuError("a secondary needs COLO_QEMU_DISK_SIZE or COLO_QEMU_DISK")
            from colo_agent.qemu.colo import disk_size

            size = await disk_size(s.binaries.qemu_img, s.disk)
        run = RunDir(s.run_dir / "secondary")
        self.secondary = ColoSecondary(s.binaries, s.spec, run, s.primary_ports(s.peer_host),
                                       s.secondary_ports(s.listen))
        await self.secondary.start(size)
        ports = s.secondary_ports(s.advertise)
        return f"{s.advertise}:{ports.migration.port}:{ports.nbd.port}"

    async def serve(self, host: str, port: int) -> None:
        if self.primary is None:
            raise QemuError("serve() needs a running primary")
        self._serve = Endpoint(host, port)
        await self.primary.ready()
        await self.primary.serve(self._serve)

    async def protect(self, secondary: str) -> None:
        if self.primary is None:
            raise QemuError("protect() needs a running primary")
        await self.primary.ready()
        await self.primary.serve(self._serve)
        await self.primary.protect(parse_secondary(secondary))

    async def continue_alone(self) -> None:
        if self.primary is not None:
            await self.primary.ready()
            await self.primary.lose_secondary()

    async def take_over(self) -> None:
        if self.secondary is None:
            raise QemuError("take_over() needs a secondary")
        await self.secondary.failover()
        s = self.settings
        self.primary = ColoPrimary.adopt(self.secondary, s.primary_ports(s.listen), s.checkpoint_ms)
        self.secondary = None

    async def figures(self) -> StreamFigures:
        if self.primary is None:
            return StreamFigures(protected=False, checkpoints=0)
        await self.primary.ready()
        f = await self.primary.refresh()
        recent = tuple(StreamCheckpoint(c.pause * 1000.0, c.cause.value) for c in f.recent[-16:])
        return StreamFigures(
            protected=f.mode == "primary" and f.migration == "colo", checkpoints=f.checkpoints, recent=recent,
            mismatches=f.mismatches, state=f.migration, channels=1,
        )

    @property
    def checkpoints(self) -> int:
        return self.primary.figures.checkpoints if self.primary is not None else 0


def _create_empty_disk(qemu_img: str, path: Path, size: int) -> None:
    """A fresh guest without a disk image gets an empty one (qcow2, sparse)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), str(size)],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise QemuError(f"qemu-img create {path}: {(out.stdout + out.stderr).strip()}")


def qmp_sync(path: Path, command: str, timeout: float = 10.0) -> object:
    """One QMP command over a fresh connection, blocking (a few milliseconds)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        stream = sock.makefile("rw")
        stream.readline()  # greeting
        reply: dict[str, object] = {}
        for name in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": name}) + "\n")
            stream.flush()
            while True:  # events may come first
                reply = json.loads(stream.readline() or "{}")
                if "return" in reply or "error" in reply or not reply:
                    break
            if "error" in reply or not reply:
                raise QemuError(f"{command}: {reply.get('error', 'connection closed')}")
        return reply["return"]


def create_guest(options: GuestOptions) -> Guest:
    return QemuGuest(QemuSettings.from_env(options, os.environ))
