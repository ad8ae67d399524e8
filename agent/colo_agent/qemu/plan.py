"""The QMP sequences that drive QEMU's COLO (pure: commands as data).

QEMU supplies the checkpoint stream, the network proxy (filter-mirror,
filter-redirector, colo-compare, filter-rewriter) and block replication
(quorum + replication drivers); it has no heartbeat and no failover of its
own. The agent runs these sequences: each function returns the commands in
the order QEMU needs them, and `tolerant` marks the ones a failover must get
past when the object is already gone (a dead peer may have torn half of the
pair down by itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from colo_agent.qemu.command import DISK_ID, NETDEV_ID, Endpoint, PrimaryPorts, RunDir, SecondaryPorts

# Object ids on the primary's side of the proxy.
PROXY_OBJECTS = ("comp0", "iothread1", "m0", "redire0", "redire1")
PROXY_CHARDEVS = ("mirror0", "compare1", "compare0", "compare0-0", "compare_out", "compare_out0")
REPLICATION_NODE = "replication0"
RESYNC_JOB = "resync"


@dataclass(frozen=True)
class Command:
    name: str
    args: Mapping[str, object] = field(default_factory=dict)
    tolerant: bool = False  # a failure (object already gone) does not stop the sequence


def hmp(line: str, tolerant: bool = False) -> Command:
    """A human-monitor command (drive_add, drive_del, hostfwd_add have no QMP form)."""
    return Command("human-monitor-command", {"command-line": line}, tolerant)


def _socket(host: str, port: int) -> dict[str, object]:
    return {"type": "inet", "data": {"host": host, "port": str(port)}}


def _chardev(cid: str, addr: dict[str, object], server: bool) -> Command:
    data: dict[str, object] = {"addr": addr, "server": server}
    if server:
        data["wait"] = False
    return Command("chardev-add", {"id": cid, "backend": {"type": "socket", "data": data}})


def _unix(path: object) -> dict[str, object]:
    return {"type": "unix", "data": {"path": str(path)}}


def secondary_prepare(ports: SecondaryPorts) -> list[Command]:
    """Secondary, before the primary migrates: COLO on, the parent disk exported over NBD."""
    return [
        Command("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]}),
        Command("nbd-server-start", {"addr": _socket(ports.nbd.host, ports.nbd.port)}),
        Command("nbd-server-add", {"device": "parent0", "writable": True}),
    ]


def primary_proxy(ports: PrimaryPorts, run: RunDir, before_rewriter: bool) -> list[Command]:
    """Primary: the chardevs and filters of the COLO proxy.

    Client input is mirrored to the secondary (m0); the guest's output goes
    through colo-compare against the secondary's (redire1 -> comp0 ->
    redire0) and leaves only when both agree or a checkpoint made them equal.
    A primary that was a secondary keeps its filter-rewriter; its new filters
    go before it.
    """
    where: dict[str, object] = {"insert": "before", "position": "id=rew0"} if before_rewriter else {}

    def filt(kind: str, fid: str, **kw: object) -> Command:
        return Command("object-add", {"qom-type": kind, "id": fid, "netdev": NETDEV_ID, **where, **kw})

    return [
        _chardev("mirror0", _socket(ports.mirror.host, ports.mirror.port), server=True),
        _chardev("compare1", _socket(ports.compare.host, ports.compare.port), server=True),
        _chardev("compare0", _unix(run.compare_in), server=True),
        _chardev("compare0-0", _unix(run.compare_in), server=False),
        _chardev("compare_out", _unix(run.compare_out), server=True),
        _chardev("compare_out0", _unix(run.compare_out), server=False),
        filt("filter-mirror", "m0", queue="tx", outdev="mirror0"),
        filt("filter-redirector", "redire0", queue="rx", indev="compare_out"),
        filt("filter-redirector", "redire1", queue="rx", outdev="compare0"),
        Command("object-add", {"qom-type": "iothread", "id": "iothread1"}),
        Command("object-add", {
            "qom-type": "colo-compare", "id": "comp0", "primary_in": "compare0-0",
            "secondary_in": "compare1", "outdev": "compare_out0", "iothread": "iothread1",
        }),
    ]


def primary_disk_sync(nbd: Endpoint) -> Command:
    """Copy the whole disk into the secondary's parent image while the guest runs."""
    return Command("drive-mirror", {
        "device": DISK_ID, "job-id": RESYNC_JOB, "target": f"nbd://{nbd}/parent0",
        "mode": "existing", "format": "raw", "sync": "full",
    })


def primary_attach_replication(nbd: Endpoint) -> list[Command]:
    """Guest stopped, disk in sync: from now on every write also goes to the secondary."""
    return [
        Command("block-job-cancel", {"device": RESYNC_JOB}),
        hmp(
            f"drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,"
            f"file.host={nbd.host},file.port={nbd.port},file.export=parent0,node-name={REPLICATION_NODE}"
        ),
        Command("x-blockdev-change", {"parent": DISK_ID, "node": REPLICATION_NODE}),
    ]


def primary_migrate(migration: Endpoint, checkpoint_delay_ms: int) -> list[Command]:
    return [
        Command("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]}),
        Command("migrate-set-parameters", {"x-checkpoint-delay": checkpoint_delay_ms}),
        Command("migrate", {"uri": f"tcp:{migration}"}),
    ]


def primary_failover() -> list[Command]:
    """Primary whose secondary is lost: drop replication and proxy, leave COLO, run alone."""
    return [
        Command("x-blockdev-change", {"parent": DISK_ID, "child": "children.1"}, tolerant=True),
        hmp(f"drive_del {REPLICATION_NODE}", tolerant=True),
        *[Command("object-del", {"id": oid}, tolerant=True) for oid in PROXY_OBJECTS],
        Command("x-colo-lost-heartbeat", tolerant=True),
        *[Command("chardev-remove", {"id": cid}, tolerant=True) for cid in PROXY_CHARDEVS],
    ]


def secondary_failover() -> list[Command]:
    """Secondary whose primary is lost: stop replication, take over, unhook the redirectors."""
    return [
        Command("nbd-server-stop", tolerant=True),
        Command("x-colo-lost-heartbeat"),
        Command("object-del", {"id": "f2"}, tolerant=True),
        Command("object-del", {"id": "f1"}, tolerant=True),
        Command("chardev-remove", {"id": "red1"}, tolerant=True),
        Command("chardev-remove", {"id": "red0"}, tolerant=True),
    ]


def serve(client: Endpoint, guest_port: int) -> Command:
    """Open the guest's service: a host forward from the client endpoint to the guest's port."""
    return hmp(f"hostfwd_add {NETDEV_ID} tcp:{client.host}:{client.port}-:{guest_port}")


def unserve(client: Endpoint) -> Command:
    return hmp(f"hostfwd_remove {NETDEV_ID} tcp:{client.host}:{client.port}", tolerant=True)
