"""QEMU command lines for the two sides of a COLO pair (pure).

Both sides run the same machine (memory, vCPUs, NIC model and MAC, kernel)
so that the secondary can load the primary's state. The guest's disk is a
quorum node `colo-disk0` with one child, the local image; protection adds
the replication child at run time (see `plan.py`). The network is QEMU's
user-mode network with `restrict=on`: the guest reaches nothing outside
its own QEMU, and the one way in is the host forward that the agent adds
on the primary only (`plan.serve`).

A primary starts as a plain guest and gets its COLO chardevs and filters
through QMP when a secondary joins, so initial protection, re-protection
after a failover and a promoted secondary that protects itself again all
take the same path. A secondary starts with everything on its command line
and waits for the incoming migration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class NicModel(StrEnum):
    E1000 = "e1000"
    VIRTIO = "virtio-net-pci"


class Accel(StrEnum):
    TCG = "tcg"
    KVM = "kvm"


# One MAC on both sides: the secondary's guest must look the same to the network.
GUEST_MAC = "52:54:00:c0:10:01"
# colo-disk0 is the quorum node; these are the node and object ids the QMP plans refer to.
DISK_ID = "colo-disk0"
NETDEV_ID = "hn0"


@dataclass(frozen=True)
class GuestSpec:
    """What the user's VM is: the same on both sides."""

    kernel: Path
    initrd: Path
    memory_mib: int = 256
    vcpus: int = 1
    nic: NicModel = NicModel.E1000
    accel: Accel = Accel.TCG
    append: str = "console=ttyS0 panic=-1 quiet"
    guest_port: int = 6379

    def __post_init__(self) -> None:
        if self.memory_mib < 64:
            raise ValueError(f"memory must be at least 64 MiB, got {self.memory_mib}")
        if not 1 <= self.vcpus <= 64:
            raise ValueError(f"vCPUs must be between 1 and 64, got {self.vcpus}")
        if not 1 <= self.guest_port <= 65535:
            raise ValueError(f"guest port {self.guest_port} is not a TCP port")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PrimaryPorts:
    """Where the primary's COLO proxy listens for its secondary's redirectors."""

    mirror: Endpoint  # client input mirrored to the secondary (filter-mirror)
    compare: Endpoint  # the secondary's output, into colo-compare


@dataclass(frozen=True)
class SecondaryPorts:
    """Where the secondary listens for its primary."""

    migration: Endpoint  # the x-colo migration stream
    nbd: Endpoint  # block replication and the disk's first sync


@dataclass(frozen=True)
class RunDir:
    """Files of one QEMU instance: QMP socket, console, local proxy sockets, disks."""

    path: Path

    @property
    def qmp(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def qmp_sync(self) -> Path:
        return self.path / "qmp-sync.sock"

    @property
    def console(self) -> Path:
        return self.path / "console.log"

    @property
    def log(self) -> Path:
        return self.path / "qemu.log"

    @property
    def trace(self) -> Path:
        return self.path / "colo-trace.log"

    @property
    def compare_in(self) -> Path:
        return self.path / "compare-in.sock"

    @property
    def compare_out(self) -> Path:
        return self.path / "compare-out.sock"

    # The secondary's images: parent (the replicated copy), hidden and active (its overlays).
    @property
    def parent_disk(self) -> Path:
        return self.path / "parent.qcow2"

    @property
    def hidden_disk(self) -> Path:
        return self.path / "hidden.qcow2"

    @property
    def active_disk(self) -> Path:
        return self.path / "active.qcow2"

    def check_paths(self) -> None:
        # A unix socket path is limited to 107 bytes by the kernel.
        socks = (self.qmp, self.qmp_sync, self.compare_in, self.compare_out)
        longest = max(len(os.fsencode(p)) for p in socks)
        if longest > 107:
            raise ValueError(f"run directory {self.path} is too long for unix sockets")


def _machine(spec: GuestSpec, name: str, run: RunDir) -> list[str]:
    cpu = "qemu64" if spec.accel is Accel.TCG else "host"
    return [
        "-name", name, "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "pc", "-accel", spec.accel.value, "-cpu", cpu,
        "-m", f"{spec.memory_mib}M", "-smp", str(spec.vcpus),
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.append,
        "-serial", f"file:{run.console}",
        "-qmp", f"unix:{run.qmp},server=on,wait=off",
        "-qmp", f"unix:{run.qmp_sync},server=on,wait=off",
        "-msg", "timestamp=on",
        "-trace", f"enable=colo_vm_state_change,file={run.trace}",
    ]


def _nic(spec: GuestSpec) -> list[str]:
    return [
        "-netdev", f"user,id={NETDEV_ID},restrict=on",
        "-device", f"{spec.nic.value},netdev={NETDEV_ID},mac={GUEST_MAC}",
    ]


def primary_argv(binary: str, spec: GuestSpec, run: RunDir, disk: Path) -> list[str]:
    """A plain guest whose disk is a one-child quorum, ready to gain a replication child."""
    quorum = (
        f"if=none,id={DISK_ID},driver=quorum,read-pattern=fifo,vote-threshold=1,"
        f"children.0.file.filename={disk},children.0.driver=qcow2"
    )
    return [
        binary, *_machine(spec, "colo-primary", run), *_nic(spec),
        "-drive", quorum, "-device", f"virtio-blk-pci,drive={DISK_ID}",
    ]


def secondary_argv(
    binary: str, spec: GuestSpec, run: RunDir, primary: PrimaryPorts, ports: SecondaryPorts
) -> list[str]:
    """A secondary waiting for the COLO migration: redirectors, rewriter, replication disk."""
    drives = [
        f"if=none,id=parent0,driver=qcow2,file.filename={run.parent_disk}",
        (
            "if=none,id=childs0,driver=replication,mode=secondary,file.driver=qcow2,"
            f"top-id={DISK_ID},file.file.filename={run.active_disk},"
            f"file.backing.driver=qcow2,file.backing.file.filename={run.hidden_disk},"
            "file.backing.backing=parent0"
        ),
        f"if=none,id={DISK_ID},driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0",
    ]
    mirror, compare = primary.mirror, primary.compare
    return [
        binary, *_machine(spec, "colo-secondary", run), *_nic(spec),
        "-chardev", f"socket,id=red0,host={mirror.host},port={mirror.port},reconnect-ms=200",
        "-chardev", f"socket,id=red1,host={compare.host},port={compare.port},reconnect-ms=200",
        "-object", f"filter-redirector,id=f1,netdev={NETDEV_ID},queue=tx,indev=red0",
        "-object", f"filter-redirector,id=f2,netdev={NETDEV_ID},queue=rx,outdev=red1",
        "-object", f"filter-rewriter,id=rew0,netdev={NETDEV_ID},queue=all",
        *[a for d in drives for a in ("-drive", d)],
        "-device", f"virtio-blk-pci,drive={DISK_ID}",
        "-incoming", f"tcp:{ports.migration}",
    ]
