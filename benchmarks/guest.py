"""The micro-VM as a Redis server, against a real redis-server, and its pause cost.

    .venv/bin/python benchmarks/guest.py [--requests N] [--tcg-requests N] [--accel kvm,tcg]

1. redis-benchmark -t set,get (ops/s, p50/p99 latency) against a redis-server
   started here on a free port, then against `colo-agent vm run` on each
   available accelerator (a separate process, as in production).
2. Pause latency, pause() + collect_dirty() + resume(), with 0, 100 and
   10,000 pages dirtied between two pauses, on each accelerator. "guest":
   the firmware dirties them (--dirty-rate), so they come through the
   accelerator's dirty log; "host": one byte of each page is rewritten with
   its own value while paused and logged like a device write.

Prints a table and writes benchmarks/results/guest.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, percentile, redis_benchmark, redis_server, wait_for_port, write_results

from colo_agent.microvm import abi
from colo_agent.microvm.kvm import kvm_unavailable_reason
from colo_agent.microvm.machine import Machine

TESTS = ("set", "get")
DIRTY_COUNTS = (0, 100, 10_000)
PAUSE_ROUNDS = 300
# Between two pauses with the guest dirtying pages: its rate is set to dirty
# the target count in this interval (the guest may fall short; the table
# shows how many pages each collection really held).
GUEST_INTERVAL = 0.02
GUEST_INTERVAL_MAX = 1.0
GUEST_ROUNDS_SLOW = 40
VM_MEMORY = "256Mi"


def bench_redis_server(requests: int) -> dict[str, Any]:
    with redis_server() as port:
        return redis_benchmark(port, TESTS, requests=requests, clients=10)


def bench_vm(accel: str, requests: int) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "colo_agent", "--log-level", "WARNING", "vm", "run",
           "--accel", accel, "--port", str(port), "--memory", VM_MEMORY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port("127.0.0.1", port, timeout=120)
        return redis_benchmark(port, TESTS, requests=requests, clients=10)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            print(f"vm run ({accel}) exited {proc.returncode}: {err[-2000:]}", file=sys.stderr)


def _summary(samples: list[float], collected: list[int]) -> dict[str, Any]:
    return {
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples),
        "dirty_pages_median": float(np.median(collected)),
        "rounds": len(samples),
    }


def _timed_cycle(machine: Machine, samples: list[float], collected: list[int]) -> None:
    start = time.perf_counter()
    machine.pause()
    dirty = machine.collect_dirty()
    machine.resume()
    samples.append((time.perf_counter() - start) * 1e3)
    collected.append(len(dirty))


def bench_pause_host(accel: str) -> dict[str, Any]:
    """Pages dirtied by the host, through the device model's log."""
    out: dict[str, Any] = {}
    with Machine.create(VM_MEMORY, accel=accel) as machine:
        machine.start()
        time.sleep(0.5)  # let the firmware initialise its heap
        ram = machine.ram_array
        # Pages above the first 16 MiB: clear of boot structures, rings and image.
        first = (16 << 20) // abi.PAGE_SIZE
        machine.pause()
        machine.collect_dirty()
        machine.resume()
        for count in DIRTY_COUNTS:
            offsets = np.arange(first, first + count, dtype=np.int64) * abi.PAGE_SIZE
            samples: list[float] = []
            collected: list[int] = []
            for _ in range(PAUSE_ROUNDS):
                if count:
                    # Dirty the pages while paused, so the guest never sees a
                    # byte change under it: each is rewritten with its own
                    # value and logged as a device write would be.
                    machine.pause()
                    ram[offsets] = ram[offsets]
                    machine.devices.mark_dirty(int(offsets[0]), count * abi.PAGE_SIZE)
                    machine.resume()
                time.sleep(0.002)
                _timed_cycle(machine, samples, collected)
            out[str(count)] = _summary(samples, collected)
        del ram
    return out


def bench_pause_guest(accel: str) -> dict[str, Any]:
    """Pages dirtied by the guest itself (--dirty-rate), through the accelerator's log."""
    out: dict[str, Any] = {}
    for count in DIRTY_COUNTS:
        rate = int(count / GUEST_INTERVAL)
        with Machine.create(VM_MEMORY, accel=accel, dirty_rate=rate) as machine:
            machine.start()
            time.sleep(0.5)
            machine.pause()
            machine.collect_dirty()
            machine.resume()
            samples: list[float] = []
            collected: list[int] = []
            interval = GUEST_INTERVAL
            if count:
                # The guest may not reach the rate (write faults under tcg,
                # slow nested KVM): stretch the interval until a collection
                # holds about `count` pages.
                for _ in range(4):
                    for _ in range(3):
                        time.sleep(interval)
                        _timed_cycle(machine, samples, collected)
                    achieved = max(float(np.median(collected)), 1.0)
                    interval = min(GUEST_INTERVAL_MAX, max(0.005, interval * count / achieved))
                    samples.clear()
                    collected.clear()
            rounds = PAUSE_ROUNDS // 2 if interval <= GUEST_INTERVAL else GUEST_ROUNDS_SLOW
            for _ in range(rounds):
                time.sleep(interval)
                _timed_cycle(machine, samples, collected)
            out[str(count)] = {**_summary(samples, collected), "dirty_rate": rate, "interval_s": interval}
    return out


def available_accels(requested: str | None) -> list[str]:
    if requested:
        return [a for a in requested.split(",") if a]
    accels = ["tcg"]
    if kvm_unavailable_reason() is None:
        accels.insert(0, "kvm")
    return accels


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    serve = Table(title="redis-benchmark -c 10 (set / get)")
    for col in ("target", "test", "requests", "ops/s", "p50 ms", "p99 ms", "vs redis-server"):
        serve.add_column(col, justify="right" if col not in ("target", "test") else "left")
    base = results["serve"].get("redis-server", {}).get("tests", {})
    for target, entry in results["serve"].items():
        for test, fig in entry["tests"].items():
            ratio = fig["rps"] / base[test]["rps"] if test in base and base[test]["rps"] else float("nan")
            serve.add_row(target, test, str(entry["requests"]), f"{fig['rps']:,.0f}", f"{fig['p50_ms']:.3f}",
                          f"{fig['p99_ms']:.3f}", f"{ratio:.2f}x")
    console.print(serve)
    pause = Table(title="pause + collect_dirty + resume")
    for col in ("accelerator, dirtied by", "dirty pages", "p50 ms", "p99 ms", "max ms", "collected (median)"):
        pause.add_column(col, justify="left" if col == "accelerator" else "right")
    for accel, by_count in results["pause"].items():
        for count, fig in by_count.items():
            pause.add_row(
                accel, count, f"{fig['p50_ms']:.3f}", f"{fig['p99_ms']:.3f}", f"{fig['max_ms']:.3f}",
                f"{fig['dirty_pages_median']:.0f}",
            )
    console.print(pause)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000, help="redis-benchmark -n (default 20000)")
    parser.add_argument("--tcg-requests", type=int, default=20000, help="-n under tcg (default 20000)")
    parser.add_argument("--accel", help="comma-separated accelerators (default: every available one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    accels = available_accels(args.accel)

    results: dict[str, Any] = {"serve": {}, "pause": {}}
    results["serve"]["redis-server"] = {"requests": args.requests, "tests": bench_redis_server(args.requests)}
    for accel in accels:
        n = args.tcg_requests if accel == "tcg" else args.requests
        results["serve"][f"micro-VM {accel}"] = {"requests": n, "tests": bench_vm(accel, n)}
    for accel in accels:
        results["pause"][f"{accel} guest"] = bench_pause_guest(accel)
        results["pause"][f"{accel} host"] = bench_pause_host(accel)
    path = write_results("guest", {**results, "cpu_count": os.cpu_count()})
    print_table(results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
