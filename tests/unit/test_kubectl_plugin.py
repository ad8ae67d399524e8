"""kubectl colo: formatting of status and checkpoints, the switchover handshake, helpful errors."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kubernetes
import pytest
from rich.console import Console

from colo_operator import constants as c
from colo_operator.kube import Kube
from colo_operator.kubectl_plugin import (
    PluginError,
    build_parser,
    checkpoint_line,
    cmd_checkpoints,
    cmd_status,
    cmd_switchover,
    cmd_upgrade,
    condition_lines,
    lag,
    list_table,
    status_tables,
    switchover_outcome,
)

NOW = dt.datetime(2026, 11, 25, 20, 0, 30, tzinfo=dt.UTC)
STATUS: dict[str, Any] = {
    "phase": "Protected",
    "term": 3,
    "epoch": 812,
    "failovers": 1,
    "primary": {"pod": "vm-2", "node": "n2", "address": "10.0.0.12", "state": "running", "synced": False},
    "secondary": {"pod": "vm-3", "node": "n3", "address": "10.0.0.13", "state": "paused", "synced": True},
    "lastCheckpoint": {
        "epoch": 812,
        "pauseMs": 1.234,
        "pages": 40,
        "bytes": 163840,
        "durationMs": 4.5,
        "cause": "interval",
        "observedAt": "2026-11-25T20:00:28Z",
        "ackAgeMs": 87.4,
    },
    "checkpoints": {"total": 9000, "perSecond": 9.8, "sampledAt": "2026-11-25T20:00:27Z"},
    "lastFailover": {
        "kind": "Failover",
        "cause": "NodeUnknown",
        "durationMs": 812.0,
        "time": "2026-11-25T19:58:30Z",
        "from": "vm-0",
        "to": "vm-2",
    },
    "conditions": [{"type": "Protected", "status": "True", "reason": "SecondarySynced", "message": "ok"}],
}


def vm(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": "vm", "namespace": "ns"},
        "spec": {},
        "status": STATUS if status is None else status,
    }


def render(*tables: Any) -> str:
    console = Console(record=True, width=160)
    for table in tables:
        console.print(table)
    return console.export_text()


def test_status_table_shows_roles_nodes_and_figures() -> None:
    text = render(*status_tables(vm(), NOW))
    assert "ColoVM ns/vm: Protected" in text
    assert "primary" in text and "vm-2" in text and "n2" in text
    assert "secondary" in text and "vm-3" in text and "yes" in text
    for figure in ("812", "9.8", "1.23 ms", "87 ms (3s ago)", "Failover NodeUnknown 812 ms, 2m ago"):
        assert figure in text, figure
    assert condition_lines(vm()) == ["Protected=True (SecondarySynced): ok"]


def test_status_table_shows_a_qemu_vms_stream_and_nothing_of_it_for_a_micro_vm() -> None:
    stream = {"state": "colo", "channels": 1, "mismatches": 7}
    qemu = render(*status_tables(vm({**STATUS, "stream": stream}), NOW))
    assert "STREAM" in qemu and "colo, single-stream, 7 mismatches" in qemu
    assert "STREAM" not in render(*status_tables(vm(), NOW))


def test_status_of_a_fresh_vm_does_not_crash() -> None:
    text = render(*status_tables(vm({}), NOW))
    assert "Unknown" in text and "none" in text


def test_lag_is_the_primarys_ack_age_at_the_last_sample_not_the_age_of_the_status() -> None:
    # The status was written 3 s ago; the secondary trailed by 87 ms then, not by 3 s.
    assert lag(vm(), NOW) == "87 ms (3s ago)"
    assert lag(vm({**STATUS, "phase": "Degraded"}), NOW) == "unprotected"
    older_agent = {**STATUS, "lastCheckpoint": {k: v for k, v in STATUS["lastCheckpoint"].items()
                                                if k != "ackAgeMs"}}  # fmt: skip
    assert lag(vm(older_agent), NOW) == "-"
    assert lag(vm({}), NOW) == "unprotected"


def test_list_table_one_row_per_vm_sorted_by_namespace_and_name() -> None:
    other = {**vm({"phase": "Syncing"}), "metadata": {"name": "a", "namespace": "zz"}}
    text = render(list_table([other, vm()], NOW))
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0].split() == ["NAMESPACE", "NAME", "PHASE", "PRIMARY", "SECONDARY", "TERM", "EPOCH",
                                "CKPT/S", "PAUSE", "LAG", "FAILOVERS", "AGE"]  # fmt: skip
    assert lines[1].split()[:5] == ["ns", "vm", "Protected", "n2", "n3"] and "87 ms (3s ago)" in lines[1]
    assert lines[2].split()[:3] == ["zz", "a", "Syncing"] and "unprotected" in lines[2]


def test_checkpoint_line() -> None:
    line = checkpoint_line(vm())
    assert line is not None and "epoch 812" in line and "pause 1.23 ms" in line and "rate 9.8/s" in line
    assert checkpoint_line(vm({})) is None


def test_switchover_outcomes() -> None:
    asked = "2026-11-25T20:00:00.250000Z"
    assert switchover_outcome(vm({"switchoverHandled": "older"}), asked) is None
    pending = {"switchoverHandled": asked, "transition": {"kind": "Switchover"}}
    assert switchover_outcome(vm(pending), asked) is None
    done = {
        "switchoverHandled": asked,
        "term": 4,
        "lastFailover": {
            "kind": "Switchover",
            "time": "2026-11-25T20:00:00Z",
            "durationMs": 310,
            "from": "a",
            "to": "b",
        },
    }
    ok, message = switchover_outcome(vm(done), asked) or (False, "")
    assert ok and "a -> b in 310 ms, term 4" in message
    refused = {"switchoverHandled": asked, "phase": "Syncing", "message": "first sync"}
    ok, message = switchover_outcome(vm(refused), asked) or (True, "")
    assert not ok and "wait for phase Protected" in message


# --------------------------------------------------------------------------- against an API server


@pytest.fixture
async def kube(kmock: kmock.KubernetesEmulator) -> AsyncIterator[Kube]:
    kmock.resources["colo.dev/v1alpha1/colovms"] = {}
    configuration = kubernetes.client.Configuration()
    configuration.host = str(kmock.url).rstrip("/")
    client = Kube(kubernetes.client.ApiClient(configuration))
    yield client
    client.close()


def args(*argv: str) -> argparse.Namespace:
    parsed = build_parser().parse_args(argv)
    parsed.namespace = "ns"
    return parsed


async def test_status_command(kube: Kube) -> None:
    await kube.create(vm())
    console = Console(record=True, width=160)
    assert await cmd_status(kube, args("status", "vm"), console) == 0
    assert "vm-3" in console.export_text()


async def test_missing_vm_says_how_to_list_them(kube: Kube) -> None:
    with pytest.raises(PluginError, match=r"kubectl get cvm -n ns"):
        await cmd_status(kube, args("status", "nope"), Console(record=True))


async def test_switchover_refused_locally_unless_protected(kube: Kube) -> None:
    await kube.create(vm({"phase": "Syncing"}))
    with pytest.raises(PluginError, match=r"not Protected.*--force"):
        await cmd_switchover(kube, args("switchover", "vm"), Console(record=True))


async def test_switchover_annotates_and_waits_for_the_operator(kube: Kube) -> None:
    await kube.create(vm())

    async def operator() -> None:
        # Plays the operator: picks up the request and reports the completed switchover.
        while True:
            body = await kube.get_vm("ns", "vm")
            asked = ((body or {}).get("metadata", {}).get("annotations") or {}).get(c.ANNOTATION_SWITCHOVER)
            if asked:
                record = {
                    "kind": "Switchover",
                    "time": asked[:19] + "Z",
                    "durationMs": 250,
                    "from": "vm-2",
                    "to": "vm-3",
                }
                await kube.patch_vm_status(
                    "ns", "vm", {"switchoverHandled": asked, "lastFailover": record, "term": 4}
                )
                return
            await asyncio.sleep(0.05)

    console = Console(record=True, width=160)
    task = asyncio.create_task(operator())
    assert await cmd_switchover(kube, args("switchover", "vm", "--timeout", "20"), console) == 0
    await task
    assert "switched over: vm-2 -> vm-3 in 250 ms, term 4" in console.export_text()


async def test_checkpoints_once(kube: Kube) -> None:
    await kube.create(vm())
    console = Console(record=True, width=200)
    assert await cmd_checkpoints(kube, args("checkpoints", "vm"), console) == 0
    assert "epoch 812" in console.export_text()


async def test_upgrade_approves_and_restart_also_changes_the_template(kube: Kube) -> None:
    await kube.create(vm())
    assert await cmd_upgrade(kube, args("upgrade", "vm"), Console(record=True)) == 0
    marks = ((await kube.get_vm("ns", "vm")) or {})["metadata"]["annotations"]
    assert c.ANNOTATION_UPGRADE in marks and c.ANNOTATION_RESTARTED_AT not in marks
    assert await cmd_upgrade(kube, args("restart", "vm"), Console(record=True)) == 0
    after = ((await kube.get_vm("ns", "vm")) or {})["metadata"]["annotations"]
    assert after[c.ANNOTATION_RESTARTED_AT] == after[c.ANNOTATION_UPGRADE] != marks[c.ANNOTATION_UPGRADE]
    with pytest.raises(PluginError, match=r"kubectl get cvm -n ns"):
        await cmd_upgrade(kube, args("restart", "nope"), Console(record=True))
