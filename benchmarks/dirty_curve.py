#!/usr/bin/env python3
"""Checkpoint cost against guest RAM and against the dirty rate: it should follow the dirty set.

A micro-VM (tcg by default) runs the firmware's steady dirtying load
(`--dirty-rate`, pages per second) and is protected by a real
`CheckpointSender` streaming to a secondary's receiver in another process
(over loopback). Each epoch is taken as the
primary engine takes it: pause, collect the dirty set, stage it, save the
device state, resume (the *pause*), then stream it and wait for the ACK (the
*epoch*, pause included). Also measured: the first sync (iterative pre-copy
while the guest runs), the vCPU-free CPU time of the pause on the calling
thread (hardly moved by other load, unlike wall time), and the secondary's
commit.

1. RAM sweep: guests of 64 MiB, 256 MiB and 1 GiB at the same dirty rate.
2. Dirty-set sweep: one guest whose epochs carry from 0 pages up to the
   secondary's cache limit (`--cache-mib`). A tcg guest on a busy machine
   cannot dirty pages that fast, so these pages are dirtied by the host
   while the guest is paused before each epoch (random pages above the
   first 16 MiB, logged like a device's writes), outside the timed pause.

An epoch whose dirty set exceeds the cache sends the first cache-full of
pages and carries the rest into the next epoch (counted as `overflows`):
the figures stay about cost, and the receiver does not check contents.

    .venv/bin/python benchmarks/dirty_curve.py [--sizes 64,256,1024] [--epochs 40]

Needs the benchmark extras (`pip install -e '.[bench]'`, matplotlib).
Prints a table, writes benchmarks/results/dirty_curve.json and
benchmarks/results/dirty_curve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, percentile, write_results

from colo_agent.microvm.abi import PAGE_SIZE as PAGE
from colo_agent.microvm.machine import Machine
from colo_agent.replication.cache import StagingBuffer, page_view
from colo_agent.replication.transport import CheckpointSender, Listener

SECRET = b"benchmark-secret-not-for-production"
VM = "bench/dirty-curve"
# A vCPU thread under tcg competes for the GIL with the sender's event loop; on
# a loaded machine a heartbeat may come late. This is about cost, not failover.
HEARTBEAT_TIMEOUT = 30.0


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


async def _receiver(ram_mib: int, cache_mib: int, port: int) -> None:
    """The secondary, in its own process: a checkpoint-mode cache and its receiver."""
    from colo_agent.replication.cache import ColoCache
    from colo_agent.replication.session import CommitEpoch
    from colo_agent.replication.transport import CheckpointReceiver

    cache = ColoCache(bytearray(ram_mib << 20), capacity=cache_mib * 256)
    commit_s: list[float] = []

    def timed_commit(a: CommitEpoch) -> None:
        t = time.perf_counter()
        cache.commit(a.term, a.epoch, a.device_state)
        commit_s.append(time.perf_counter() - t)

    rx = CheckpointReceiver(cache, secret=SECRET, vm=VM, term=1, on_commit=timed_commit,
                            heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=0.5)  # fmt: skip
    await rx.dial("127.0.0.1", port)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps({"commit_s": commit_s}), flush=True)
    await rx.close()


class Receiver:
    """A secondary's receiver in a process of its own that dials the primary's `port`,
    as in production."""

    def __init__(self, ram_mib: int, cache_mib: int, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", f"{ram_mib},{cache_mib},{port}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def commit_seconds(self) -> list[float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("figures\n")
        self.proc.stdin.flush()
        figures: list[float] = json.loads(self.proc.stdout.readline())["commit_s"]
        return figures

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _host_dirty(machine: Machine, count: int, rng: np.random.Generator) -> None:
    """Log `count` random pages above the first 16 MiB as written, while paused."""
    if not count:
        return
    first = (16 << 20) // PAGE
    pages = rng.choice(np.arange(first, machine.page_count), size=count, replace=False)
    machine.pause()
    try:
        for page in pages.tolist():
            machine.devices.mark_dirty(page * PAGE, PAGE)
    finally:
        machine.resume()


async def _protect(
    machine: Machine, listener: Listener, host_pages: int, args: argparse.Namespace
) -> dict[str, Any]:
    ram = page_view(machine.ram)
    rng = np.random.default_rng(5)
    sender = await CheckpointSender.accept(
        listener, secret=SECRET, vm=VM, term=1, page_count=machine.page_count,
        channels=args.channels, batch_pages=256, heartbeat_timeout=HEARTBEAT_TIMEOUT, heartbeat_interval=0.5,
        ack_timeout=120.0,
    )  # fmt: skip
    try:
        staging = StagingBuffer(sender.cache_pages)
        capacity = sender.cache_pages
        t0 = time.perf_counter()
        rounds = await sender.sync(ram, machine.collect_dirty)
        carry = sender.take_sync_remainder()
        pause_ms: list[float] = []
        pause_cpu_ms: list[float] = []
        epoch_ms: list[float] = []
        pages: list[int] = []
        overflows = 0
        first_sync_s = 0.0
        for i in range(args.epochs + 1):
            if i:
                _host_dirty(machine, host_pages, rng)
            started = time.perf_counter()
            cpu = time.thread_time()
            machine.pause()
            try:
                dirty: npt.NDArray[np.int64] = machine.collect_dirty()
                if len(carry):
                    dirty = np.union1d(dirty, carry)
                if len(dirty) > capacity:
                    overflows += 1
                    dirty, carry = dirty[:capacity], dirty[capacity:]
                else:
                    carry = carry[:0]
                staged = staging.stage(ram, dirty)
                state = machine.save_device_state()
            finally:
                machine.resume()
            paused = time.perf_counter()
            cpu_used = time.thread_time() - cpu
            await sender.send_epoch(dirty, staged, state)
            done = time.perf_counter()
            if i == 0:
                first_sync_s = done - t0  # the sync closes with its first epoch
            else:
                pause_ms.append((paused - started) * 1e3)
                pause_cpu_ms.append(cpu_used * 1e3)
                epoch_ms.append((done - started) * 1e3)
                pages.append(len(dirty))
            await asyncio.sleep(max(0.0, args.interval - (time.perf_counter() - started)))
    finally:
        await sender.close()
    return {
        "first_sync_s": first_sync_s,
        "sync_rounds": rounds,
        "pause_ms_p50": percentile(pause_ms, 50),
        "pause_ms_p99": percentile(pause_ms, 99),
        "pause_cpu_ms_p50": percentile(pause_cpu_ms, 50),
        "epoch_ms_p50": percentile(epoch_ms, 50),
        "epoch_ms_p99": percentile(epoch_ms, 99),
        "pages_p50": percentile([float(p) for p in pages], 50),
        "cache_pages": capacity,
        "overflows": overflows,
    }


def run_one(
    ram_mib: int, rate: int, cache_mib: int, args: argparse.Namespace, host_pages: int = 0
) -> dict[str, Any]:
    load_before = _loadavg()
    listener = Listener("127.0.0.1", 0)
    rx: Receiver | None = None
    try:
        with Machine.create(f"{ram_mib}Mi", accel=args.accel, dirty_rate=rate) as machine:
            machine.start()
            time.sleep(0.5)  # the firmware sets up its heap and scratch area
            rx = Receiver(ram_mib, cache_mib, listener.port)
            figures = asyncio.run(_protect(machine, listener, host_pages, args))
        commits = rx.commit_seconds()[1:]  # the first commit closes the sync
    finally:
        listener.close()
        if rx is not None:
            rx.close()
    return {
        "ram_mib": ram_mib, "dirty_rate": rate, "host_pages": host_pages, "cache_mib": cache_mib,
        **figures,
        "commit_ms_p50": percentile([c * 1e3 for c in commits], 50),
        "loadavg": [load_before, _loadavg()],
    }  # fmt: skip


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"{'RAM MiB':>7} {'rate p/s':>8} {'host':>5} {'pages':>6} {'pause ms':>8} {'p99':>6} "
          f"{'pause cpu':>9} {'epoch ms':>8} {'p99':>6} {'commit':>6} {'sync s':>6} {'ovf':>4} "
          f"{'load':>10}")  # fmt: skip
    for r in rows:
        load = "{:.0f}-{:.0f}".format(*r["loadavg"])
        print(f"{r['ram_mib']:>7} {r['dirty_rate']:>8} {r['host_pages']:>5} {r['pages_p50']:>6.0f} "
              f"{r['pause_ms_p50']:>8.2f} {r['pause_ms_p99']:>6.1f} {r['pause_cpu_ms_p50']:>9.2f} "
              f"{r['epoch_ms_p50']:>8.2f} {r['epoch_ms_p99']:>6.1f} {r['commit_ms_p50']:>6.2f} "
              f"{r['first_sync_s']:>6.2f} {r['overflows']:>4} {load:>10}")  # fmt: skip
    print("(rate = guest's dirty rate, host = pages dirtied by the host before each epoch;")
    print(" medians over epochs; pause cpu = CPU time of the pausing thread; commit = secondary's, ms;")
    print(" load = 1-minute load average before and after the run)")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_ram, by_rate) = plt.subplots(1, 2, figsize=(12, 4.8))
    ram = results["ram_sweep"]
    mib = [r["ram_mib"] for r in ram]
    for key, label in (("pause_ms_p50", "pause (wall)"), ("pause_cpu_ms_p50", "pause (CPU)"),
                       ("epoch_ms_p50", "epoch"), ("commit_ms_p50", "secondary commit")):  # fmt: skip
        by_ram.plot(mib, [r[key] for r in ram], marker="o", label=label)
    by_ram.set_xscale("log", base=2)
    by_ram.set_xticks(mib, [str(m) for m in mib])
    by_ram.set_xlabel("guest RAM (MiB)")
    by_ram.set_ylabel("ms (median)")
    by_ram.set_title(f"same dirty rate ({ram[0]['dirty_rate']} pages/s)")
    sync = by_ram.twinx()
    sync.plot(mib, [r["first_sync_s"] for r in ram], "k--", marker="s", label="first sync (s, right)")
    sync.set_ylabel("first sync (s)")
    lines = by_ram.get_legend_handles_labels()
    more = sync.get_legend_handles_labels()
    by_ram.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")

    rate = results["dirty_sweep"]
    pages = [r["pages_p50"] for r in rate]
    for key, label in (("pause_ms_p50", "pause (wall)"), ("pause_cpu_ms_p50", "pause (CPU)"),
                       ("epoch_ms_p50", "epoch"), ("commit_ms_p50", "secondary commit")):  # fmt: skip
        by_rate.plot(pages, [r[key] for r in rate], marker="o", label=label)
    by_rate.axvline(rate[0]["cache_pages"], color="grey", linestyle=":", label="cache limit")
    by_rate.set_xlabel("dirty pages per epoch (median)")
    by_rate.set_ylabel("ms (median)")
    by_rate.set_title(f"{rate[0]['ram_mib']} MiB guest, dirty set 0 to the cache limit")
    by_rate.legend(fontsize=8, loc="upper left")
    load = results["machine"].get("loadavg", ["?"])
    fig.suptitle(f"checkpoint cost, {results['config']['accel']} micro-VM, loopback; load average {load[0]} "
                 f"on {results['machine'].get('cpus')} CPUs")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accel", default="tcg", help="micro-VM accelerator (default tcg)")
    ap.add_argument("--sizes", default="64,256,1024", help="guest RAM sizes in MiB for the RAM sweep")
    ap.add_argument("--rate", type=int, default=20000, help="dirty rate of the RAM sweep, pages/s")
    ap.add_argument("--sweep-ram-mib", type=int, default=256, help="guest RAM of the dirty-set sweep")
    ap.add_argument("--fractions", default="0,0.1,0.25,0.5,0.75,1",
                    help="dirty sets of the sweep, as fractions of the cache")  # fmt: skip
    ap.add_argument("--cache-mib", type=int, default=16, help="secondary's cache (epoch limit)")
    ap.add_argument("--interval", type=float, default=0.05, help="checkpoint interval, seconds")
    ap.add_argument("--epochs", type=int, default=40, help="timed epochs per run")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        ram_mib, cache_mib, port = (int(v) for v in args.worker.split(","))
        asyncio.run(_receiver(ram_mib, cache_mib, port))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    cache_pages = args.cache_mib * 256
    counts = [int(float(f) * cache_pages) for f in args.fractions.split(",")]
    results: dict[str, Any] = {
        "config": {
            k: getattr(args, k)
            for k in ("accel", "rate", "sweep_ram_mib", "cache_mib", "interval", "epochs", "channels")
        },
        "machine": machine_info(),
    }
    results["ram_sweep"] = [run_one(mib, args.rate, args.cache_mib, args) for mib in sizes]
    print_table(f"RAM sweep: {args.accel} micro-VM at {args.rate} pages/s, epochs every {args.interval}s",
                results["ram_sweep"])  # fmt: skip
    results["dirty_sweep"] = [run_one(args.sweep_ram_mib, 0, args.cache_mib, args, n) for n in counts]
    print_table(f"dirty-set sweep: {args.sweep_ram_mib} MiB guest, 0 to the cache ({cache_pages} pages)",
                results["dirty_sweep"])  # fmt: skip
    results["machine_after"] = machine_info()
    print(f"\nwrote {write_results('dirty_curve', results)}")
    png = RESULTS_DIR / "dirty_curve.png"
    plot(results, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
