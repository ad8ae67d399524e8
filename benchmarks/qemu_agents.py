#!/usr/bin/env python3
"""The qemu backend under `colo-agent run`: two agent processes, file arbiter, the Linux test guest.

One run, one machine:

1. SET rate of one client against the unprotected primary (the baseline),
   then through colo-compare once a secondary agent protects it;
2. checkpoints per second and the checkpoint pause (from the agent's status,
   which reads QEMU's COLO trace) while that client writes;
3. failover, `--runs` times: kill -9 of the primary agent (its QEMU dies
   with it) -> the secondary reports the loss -> promotion over the control
   API (the Lease's wait included) -> first PING answered; a new secondary
   agent protects the promoted primary before the next run.

    .venv/bin/python benchmarks/qemu_agents.py [--runs 3] [--seconds 10]

Needs `.ci/qemu-build` and `.ci/qemu-guest` (cached). TCG: these machines
cannot run QEMU guests under KVM. COLO runs single-stream. Prints a table
and writes benchmarks/results/qemu_agents.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import machine_info, percentile, write_results
from support.agents import AgentGroup, AgentProcess
from support.qemu import Writer, free_port, qemu_tools, wait_redis

from colo_agent.api.models import PeerState
from colo_agent.qemu.command import Endpoint

LEASE_MS = 2000


def _client(agent: AgentProcess) -> Endpoint:
    return Endpoint("127.0.0.1", agent.client_port)


async def _writes_per_second(agent: AgentProcess, seconds: float, prefix: str) -> float:
    stop = asyncio.Event()
    writer = Writer(_client(agent), prefix)
    task = asyncio.create_task(writer.run(stop, 10**9))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return len(writer.acked) / seconds


async def _checkpoints(agent: AgentProcess, seconds: float) -> dict[str, float]:
    """Checkpoints per second and their pauses while a client writes."""
    first = await asyncio.to_thread(agent.status)
    assert first is not None
    pauses: dict[int, float] = {}
    writing = asyncio.create_task(_writes_per_second(agent, seconds, "load"))
    while not writing.done():
        st = await asyncio.to_thread(agent.status)
        if st is not None and st.last_checkpoint is not None:
            pauses[st.last_checkpoint.epoch] = st.last_checkpoint.pause_ms
        await asyncio.sleep(0.05)
    rate = await writing
    last = await asyncio.to_thread(agent.status)
    assert last is not None
    values = sorted(pauses.values())
    return {
        "checkpoints_s": (last.totals.checkpoints - first.totals.checkpoints) / seconds,
        "pause_ms_p50": percentile(values, 50), "pause_ms_p95": percentile(values, 95),
        "pauses_sampled": len(values), "sets_s": rate,
        "mismatches": last.stream.mismatches if last.stream is not None else 0,
    }


async def _wait(agent: AgentProcess, what: str, check: Any, timeout: float) -> None:
    await asyncio.to_thread(agent.wait_for, what, check, timeout)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tools = qemu_tools()
    results: dict[str, Any] = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="colo-qemu-agents-") as tmp:
        work = Path(tmp)
        disk = tools.disk_copy(work / "disk.qcow2")
        ports = ",".join(str(free_port()) for _ in range(4))
        group = AgentGroup(work, accel="tcg", lease_duration_ms=LEASE_MS)

        def spawn(n: int, role: str, peer: AgentProcess | None = None) -> AgentProcess:
            env = {
                "COLO_QEMU_KERNEL": str(tools.guest / "vmlinuz"),
                "COLO_QEMU_INITRD": str(tools.guest / "initrd.img"),
                "COLO_QEMU_DISK": str(disk), "COLO_QEMU_RUN_DIR": str(work / f"q{n}"),
                "COLO_QEMU_BINARY": tools.binaries.qemu, "COLO_QEMU_IMG": tools.binaries.qemu_img,
                "COLO_QEMU_PORTS": ports, "COLO_QEMU_LISTEN": "127.0.0.1",
                "COLO_QEMU_CHECKPOINT_MS": str(args.delay_ms),
            }
            return group.spawn(f"q{n}", role, peer=peer, memory="192Mi", extra=["--backend", "qemu"], env=env)

        try:
            primary = spawn(0, "primary")
            await _wait(primary, "primary", lambda s: s.role == "primary", 120)
            results["boot_s"] = await wait_redis(_client(primary), 900)
            results["unprotected_sets_s"] = await _writes_per_second(primary, args.seconds, "base")
            term = 1
            for n in range(1, args.runs + 1):
                secondary = spawn(n, "secondary", peer=primary)
                t0 = time.monotonic()
                await _wait(primary, "protected", lambda s: s.synced, 900)
                await _wait(secondary, "promotable", lambda s: s.synced, 120)
                protect_s = time.monotonic() - t0
                if n == 1:
                    results["protect_s"] = protect_s
                    results["colo"] = await _checkpoints(primary, args.seconds)
                st = await asyncio.to_thread(primary.status)
                assert st is not None
                term = st.term
                primary.kill()
                killed = time.monotonic()
                await _wait(secondary, "aware of the loss", lambda s: s.peer.state is PeerState.LOST, 60)
                lost = time.monotonic() - killed
                reply = await asyncio.to_thread(secondary.promote, term + 1, group.secret, 60.0)
                assert reply.status_code == 200, reply.text
                promoted = time.monotonic() - killed
                await wait_redis(_client(secondary), 120)
                answered = time.monotonic() - killed
                results["runs"].append({"protect_s": protect_s, "lost_s": lost, "promoted_s": promoted,
                                        "first_answer_s": answered})
                primary = secondary
        finally:
            group.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="failovers to time (default: 3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per write measurement")
    parser.add_argument("--delay-ms", type=int, default=200, help="x-checkpoint-delay (default: 200)")
    args = parser.parse_args()
    load_before = machine_info().get("loadavg")
    results = asyncio.run(main_async(args))
    results["loadavg_before"] = load_before
    results["loadavg_after"] = machine_info().get("loadavg")
    results["lease_ms"] = LEASE_MS
    path = write_results("qemu_agents", results)

    c = results["colo"]
    print(f"qemu backend under colo-agent run (TCG, single-stream, x-checkpoint-delay {args.delay_ms} ms, "
          f"lease {LEASE_MS} ms); load before {load_before}")
    print(f"  guest boot to first PING        {results['boot_s']:8.1f} s")
    print(f"  protection (pairing to synced)  {results['protect_s']:8.1f} s")
    print(f"  one client's SETs: unprotected {results['unprotected_sets_s']:.1f}/s, through colo-compare "
          f"{c['sets_s']:.1f}/s ({c['sets_s'] / results['unprotected_sets_s']:.2f}x)")
    print(f"  checkpoints/s {c['checkpoints_s']:.1f}, pause p50 {c['pause_ms_p50']:.0f} ms p95 "
          f"{c['pause_ms_p95']:.0f} ms ({c['pauses_sampled']} sampled), forced by mismatch {c['mismatches']}")
    print("  failover run   lost s  promoted s  first answer s")
    for i, r in enumerate(results["runs"], 1):
        print(f"  {i:12d}  {r['lost_s']:6.2f}  {r['promoted_s']:10.2f}  {r['first_answer_s']:14.2f}")
    answers = [r["first_answer_s"] for r in results["runs"]]
    if answers:
        print(f"  first answer median {statistics.median(answers):.2f} s; "
              f"load after {results['loadavg_after']}; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
