#!/usr/bin/env python3
"""The qemu backend's figures: QEMU COLO with the Linux test guest running redis.

One run, one machine, the same guest (TCG here: these machines cannot run
QEMU guests under KVM):

1. redis-benchmark against the unprotected QEMU guest (the baseline);
2. the same through colo-compare once a secondary protects it;
3. checkpoints per second while idle and the checkpoint pause (from QEMU's
   COLO trace) at several client write rates (the guest's dirty rate);
4. failover: SIGKILL of the primary QEMU -> first PING answered by the
   promoted secondary (the backend's `take_over`, the agent's detection
   delay not included), repeated `--runs` times with re-protection between.

    .venv/bin/python benchmarks/qemu_colo.py [--runs 3] [--requests 2000]

Needs `.ci/qemu-build` and `.ci/qemu-guest` (cached). Prints a table and
writes benchmarks/results/qemu.json. (Not `qemu.py`: that name would shadow
the `qemu.qmp` package.) COLO runs single-stream (multifd with
x-colo does not work in QEMU 10.0).
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

from _common import machine_info, percentile, redis_benchmark, write_results
from support.qemu import QemuTools, Writer, free_port, qemu_tools, wait_redis

from colo_agent.guest import GuestOptions
from colo_agent.qemu.backend import QemuGuest, QemuSettings
from colo_agent.qemu.command import Endpoint

MEMORY = 192 * 1024 * 1024


def _guest(tools: QemuTools, run: Path, disk: Path, ports: str, client: int, delay_ms: int) -> QemuGuest:
    env = {
        "COLO_QEMU_KERNEL": str(tools.guest / "vmlinuz"), "COLO_QEMU_INITRD": str(tools.guest / "initrd.img"),
        "COLO_QEMU_DISK": str(disk), "COLO_QEMU_RUN_DIR": str(run), "COLO_QEMU_BINARY": tools.binaries.qemu,
        "COLO_QEMU_IMG": tools.binaries.qemu_img, "COLO_QEMU_SERVE": f"127.0.0.1:{client}",
        "COLO_QEMU_PEER_HOST": "127.0.0.1", "COLO_QEMU_PORTS": ports, "COLO_QEMU_LISTEN": "127.0.0.1",
        "COLO_QEMU_CHECKPOINT_MS": str(delay_ms),
    }
    return QemuGuest(QemuSettings.from_env(GuestOptions(memory=MEMORY, accel="tcg"), env))


def _bench(port: int, requests: int) -> dict[str, dict[str, float]]:
    return redis_benchmark(port, tests=("set", "get"), requests=requests, clients=4, timeout=1200)


async def _pauses_under_load(primary: QemuGuest, client: Endpoint, value_bytes: int, seconds: float
                             ) -> dict[str, Any]:
    """Checkpoint pauses while one client writes values of `value_bytes` as fast as it can."""
    assert primary.primary is not None
    await primary.primary.refresh()
    count0 = primary.primary.figures.checkpoints
    stop = asyncio.Event()
    writer = Writer(client, f"load{value_bytes}")
    started = time.monotonic()
    task = asyncio.create_task(writer.run(stop, 10**9, value=b"x" * value_bytes) if value_bytes else
                               asyncio.sleep(seconds))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    elapsed = time.monotonic() - started
    figures = await primary.primary.refresh()
    fresh = min(figures.checkpoints - count0, len(figures.recent))  # `recent` keeps the last 256
    new = figures.recent[len(figures.recent) - fresh:]
    pauses = [c.pause * 1000 for c in new]
    return {
        "value_bytes": value_bytes,
        "write_mb_s": len(writer.acked) * value_bytes / elapsed / 1e6,
        "writes_s": len(writer.acked) / elapsed,
        "checkpoints_s": (figures.checkpoints - count0) / elapsed,
        "pause_ms_p50": percentile(pauses, 50), "pause_ms_p95": percentile(pauses, 95),
        "mismatch_checkpoints": sum(1 for c in new if c.cause == "mismatch"),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tools = qemu_tools()
    results: dict[str, Any] = {"stream": "single", "accel": "tcg", "checkpoint_delay_ms": args.delay_ms}
    with tempfile.TemporaryDirectory(prefix="colo-qemu-bench-") as tmp:
        base = Path(tmp)
        disk = tools.disk_copy(base / "disk.qcow2")
        ports = ",".join(str(free_port()) for _ in range(4))
        port = free_port()
        client = Endpoint("127.0.0.1", port)
        guests: list[QemuGuest] = []

        def new_guest() -> QemuGuest:
            g = _guest(tools, base / f"g{len(guests)}", disk, ports, port, args.delay_ms)
            guests.append(g)
            return g

        try:
            primary = new_guest()
            primary.start()
            assert primary.primary is not None
            await primary.primary.ready()
            await primary.primary.serve(client)
            results["boot_s"] = await wait_redis(client, 600)
            results["unprotected"] = await asyncio.to_thread(_bench, port, args.requests)

            secondary = new_guest()
            t0 = time.monotonic()
            await primary.protect(await secondary.listen())
            results["protect_s"] = time.monotonic() - t0
            results["colo"] = await asyncio.to_thread(_bench, port, args.requests)
            results["dirty"] = [await _pauses_under_load(primary, client, size, args.seconds)
                                for size in (0, 1024, 16384, 65536)]

            failovers = []
            for _ in range(args.runs):
                primary.stop()
                killed = time.monotonic()
                await secondary.take_over()
                await secondary.serve(client.host, client.port)
                await wait_redis(client, 120)
                failovers.append(time.monotonic() - killed)
                primary, secondary = secondary, new_guest()
                await primary.protect(await secondary.listen())
            results["failover_s"] = failovers
        finally:
            for g in guests:
                g.stop()
            for g in guests:
                for side in (g.primary, g.secondary):
                    if side is not None:
                        await side.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="failovers to time (default: 3)")
    parser.add_argument("--requests", type=int, default=2000, help="redis-benchmark requests per test")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per dirty-rate level")
    parser.add_argument("--delay-ms", type=int, default=200, help="x-checkpoint-delay (default: 200)")
    args = parser.parse_args()
    load_before = machine_info().get("loadavg")
    results = asyncio.run(main_async(args))
    results["loadavg_before"] = load_before
    path = write_results("qemu", results)

    print(f"QEMU COLO (TCG, single-stream, x-checkpoint-delay {args.delay_ms} ms); load before {load_before}")
    print(f"  guest boot to first PING       {results['boot_s']:8.1f} s")
    print(f"  protection (disk copy + COLO)  {results['protect_s']:8.1f} s")
    for test in ("SET", "GET"):
        un, co = results["unprotected"].get(test, {}), results["colo"].get(test, {})
        if un and co:
            ratio = co["rps"] / un["rps"]
            print(f"  redis {test:3} unprotected {un['rps']:8.0f} req/s p99 {un['p99_ms']:6.1f} ms | "
                  f"colo-compare {co['rps']:8.0f} req/s p99 {co['p99_ms']:6.1f} ms ({ratio:.2f}x)")
    print("  value B   write MB/s  checkpoints/s  pause p50 ms  pause p95 ms  forced")
    for d in results["dirty"]:
        print(f"  {d['value_bytes']:7d}  {d['write_mb_s']:10.2f}  {d['checkpoints_s']:13.1f}  "
              f"{d['pause_ms_p50']:12.1f}  {d['pause_ms_p95']:12.1f}  {d['mismatch_checkpoints']:6d}")
    f = results["failover_s"]
    if f:
        print(f"  failover (kill -9 -> first PING) min {min(f):.2f} median {statistics.median(f):.2f} "
              f"max {max(f):.2f} s over {len(f)} runs")
    print(f"  load after {machine_info().get('loadavg')}; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
