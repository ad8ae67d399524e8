#!/usr/bin/env python3
"""Client latency of a protected VM: unprotected vs checkpoint mode vs lockstep mode.

One run, one accelerator, one firmware, three setups served to the same
redis-benchmark (`-t set,get -c 10 --csv`):

1. unprotected: `colo-agent vm run`, a single micro-VM, no replication;
2. checkpoint: a primary + secondary pair of `colo-agent run --mode
   checkpoint` on loopback (interval 100 ms by default); a reply leaves only
   once the epoch that produced it is acknowledged;
3. lockstep: the same pair with `--mode lockstep` (interval 2000 ms by
   default); a reply leaves as soon as the secondary's guest produced the
   same bytes.

Each protected pair is benchmarked once its primary reports the secondary
synced, through the primary's client port. Around the measured window the
primary's control API gives checkpoints by cause (`GET /v1/status`), checkpoint
pause and duration (histograms of `GET /metrics`) and, in lockstep mode,
bytes released on match vs on acknowledgement
(`colo_lockstep_released_bytes_total`). CPU time of every agent process over
the window is read from /proc. A short unmeasured warm-up comes first in
every setup, so the tcg translation cache is equally warm for all three.

    .venv/bin/python benchmarks/lockstep.py [--accel tcg|kvm|auto] [--requests N]
        [--checkpoint-requests N] [--modes unprotected,checkpoint,lockstep]

Prints a table and writes benchmarks/results/lockstep.json (with the exact
commands; the secret, passed in COLO_SECRET, is not recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The agent-process harness of the integration tests: one way to start, watch and kill agents.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

from _common import free_port, machine_info, redis_benchmark, require_tool, wait_for_port, write_results
from agents import AgentGroup, AgentProcess, HarnessError, wait_protected

from colo_agent.microvm.config import kvm_unavailable_reason

MODES = ("unprotected", "checkpoint", "lockstep")
TESTS = ("set", "get")
# The agent's own default: a benchmark on a shared, loaded machine must not
# stall output because a renewal of a tighter demo lease came late.
LEASE_DURATION_MS = 2000
START_TIMEOUT = 120.0
# Allowed for one redis-benchmark run; a pair that stops releasing output
# would otherwise hang the whole benchmark.
BENCH_TIMEOUT = 600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- measurements around a window ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads), or NaN once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass(frozen=True)
class Scrape:
    """What the primary's control API says at one instant."""

    at: float
    by_cause: dict[str, int]
    checkpoints: int
    synced: bool
    released: dict[str, float]  # how -> bytes (lockstep)
    pause_sum: float
    pause_count: float
    duration_sum: float
    duration_count: float


def scrape(agent: AgentProcess) -> Scrape:
    status = agent.status()
    if status is None:
        raise HarnessError(f"{agent.name} does not answer GET /v1/status:\n{agent.tail()}")
    r = httpx.get(f"{agent.control_url}/metrics", timeout=10.0)
    r.raise_for_status()
    released: dict[str, float] = {}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == "colo_lockstep_released_bytes_total":
                released[sample.labels["how"]] = sample.value
            elif sample.name in ("colo_checkpoint_pause_seconds_sum", "colo_checkpoint_pause_seconds_count",
                                 "colo_checkpoint_duration_seconds_sum",
                                 "colo_checkpoint_duration_seconds_count"):
                sums[sample.name] = sample.value
    return Scrape(
        at=time.monotonic(),
        by_cause=dict(status.totals.checkpoints_by_cause),
        checkpoints=status.totals.checkpoints,
        synced=status.synced,
        released=released,
        pause_sum=sums.get("colo_checkpoint_pause_seconds_sum", 0.0),
        pause_count=sums.get("colo_checkpoint_pause_seconds_count", 0.0),
        duration_sum=sums.get("colo_checkpoint_duration_seconds_sum", 0.0),
        duration_count=sums.get("colo_checkpoint_duration_seconds_count", 0.0),
    )


def replication_figures(before: Scrape, after: Scrape) -> dict[str, Any]:
    window = after.at - before.at
    causes = sorted(set(before.by_cause) | set(after.by_cause))
    delta = {c: after.by_cause.get(c, 0) - before.by_cause.get(c, 0) for c in causes}
    n = after.pause_count - before.pause_count
    released = {how: after.released.get(how, 0.0) - before.released.get(how, 0.0)
                for how in sorted(set(before.released) | set(after.released))}
    return {
        "window_s": window,
        "checkpoints": after.checkpoints - before.checkpoints,
        "checkpoints_by_cause": delta,
        "checkpoints_per_s_by_cause": {c: d / window for c, d in delta.items()},
        "checkpoints_per_s": (after.checkpoints - before.checkpoints) / window,
        "mean_pause_ms": (after.pause_sum - before.pause_sum) / n * 1e3 if n else None,
        "mean_duration_ms": (after.duration_sum - before.duration_sum) / n * 1e3 if n else None,
        "released_bytes": {how: int(v) for how, v in released.items()},
        "synced_before": before.synced,
        "synced_after": after.synced,
    }


def warm_up(port: int, args: argparse.Namespace, requests: int) -> int:
    """An unmeasured run of a tenth of the requests (at most --warmup); returns how many."""
    warmup = min(args.warmup, requests // 10)
    if warmup:
        redis_benchmark(port, TESTS, requests=warmup, clients=args.clients, timeout=BENCH_TIMEOUT)
    return warmup


def measure(port: int, args: argparse.Namespace, requests: int, processes: dict[str, int]) -> dict[str, Any]:
    """One measured redis-benchmark run, and the CPU `processes` spent during it."""
    cpu0 = {name: cpu_seconds(pid) for name, pid in processes.items()}
    t0 = time.monotonic()
    tests = redis_benchmark(port, TESTS, requests=requests, clients=args.clients, timeout=BENCH_TIMEOUT)
    wall = time.monotonic() - t0
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in processes.items()}
    return {
        "requests": requests,
        "wall_s": wall,
        "tests": tests,
        "cpu_s": cpu,
        "cpu_ms_per_request": {name: s / (requests * len(TESTS)) * 1e3 for name, s in cpu.items()},
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
    }


# -- the three setups --------------------------------------------------------------------------------


def agent_command(argv: Sequence[str]) -> str:
    return "COLO_SECRET=<secret> " + shlex.join(argv)


@contextlib.contextmanager
def unprotected_vm(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[int, int, list[str]]]:
    """`colo-agent vm run` in its own process group; yields (client port, pid, argv)."""
    port = free_port()
    argv = [sys.executable, "-m", "colo_agent", "--log-level", "WARNING", "vm", "run",
            "--accel", args.accel, "--memory", args.memory, "--port", str(port)]
    log_path = workdir / "vm.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        try:
            wait_for_port("127.0.0.1", port, timeout=START_TIMEOUT)
        except TimeoutError:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise HarnessError(f"vm run did not listen on {port}:\n{tail}") from None
        yield port, proc.pid, argv
    finally:
        # SIGINT lets it stop the guest and remove its RAM file; the group kill
        # after it leaves nothing behind even if it hung.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_unprotected(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with unprotected_vm(args, workdir) as (port, pid, argv):
        warmup = warm_up(port, args, args.requests)
        figures = measure(port, args, args.requests, {"vm": pid})
    return {"commands": {"vm": shlex.join(argv)}, "warmup_requests": warmup, **figures}


def bench_pair(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    interval = args.checkpoint_interval_ms if mode == "checkpoint" else args.lockstep_interval_ms
    extra = ["--mode", mode]
    if interval is not None:
        extra += ["--interval-ms", str(interval)]
    group = AgentGroup(workdir, accel=args.accel, vm=f"bench/{mode}", lease_duration_ms=LEASE_DURATION_MS)
    try:
        primary = group.spawn("primary", "primary", memory=args.memory, extra=extra)
        primary.wait_for("serving as primary", lambda s: s.role == "primary", START_TIMEOUT)
        secondary = group.spawn("secondary", "secondary", peer=primary, memory=args.memory, extra=extra)
        wait_protected(primary, secondary)
        requests = args.checkpoint_requests if mode == "checkpoint" else args.requests
        processes = {"primary": primary.proc.pid, "secondary": secondary.proc.pid}
        warmup = warm_up(primary.client_port, args, requests)
        before = scrape(primary)
        figures = measure(primary.client_port, args, requests, processes)
        after = scrape(primary)
        for agent in (primary, secondary):
            if agent.proc.poll() is not None:
                raise HarnessError(f"{agent.name} exited with {agent.proc.returncode} during the "
                                   f"benchmark:\n{agent.tail()}")
        commands = {a.name: agent_command([str(x) for x in a.proc.args]) for a in (primary, secondary)}
        return {"commands": commands, "warmup_requests": warmup, **figures,
                "replication": replication_figures(before, after)}
    finally:
        group.close()




# -- report ---------------------------------------------------------------------------------------


def benchmark_command(requests: int, clients: int) -> str:
    return shlex.join(["redis-benchmark", "-h", "127.0.0.1", "-p", "<client port>", "-t", ",".join(TESTS),
                       "-n", str(requests), "-c", str(clients), "--csv"])


def p99_ratios(modes: dict[str, Any]) -> dict[str, dict[str, float]]:
    """p99 of each protected mode over unprotected's, per test."""
    base = modes.get("unprotected", {}).get("tests")
    out: dict[str, dict[str, float]] = {}
    if not base:
        return out
    for mode in ("checkpoint", "lockstep"):
        tests = modes.get(mode, {}).get("tests")
        if tests:
            out[f"{mode}_p99_over_unprotected"] = {
                t: tests[t]["p99_ms"] / base[t]["p99_ms"] for t in tests if t in base and base[t]["p99_ms"]
            }
    return out


def print_tables(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    # Piped output would default to 80 columns and fold every cell.
    console.width = max(console.width, 132)
    modes = results["modes"]
    base = modes.get("unprotected", {}).get("tests", {})
    latency = Table(title=f"redis-benchmark -c {results['clients']}, accelerator {results['accel']}, "
                          f"guest RAM {results['memory']}")
    for col in ("mode", "test", "requests", "ops/s", "p50 ms", "p99 ms", "p99 vs unprotected"):
        latency.add_column(col, justify="left" if col in ("mode", "test") else "right")
    for mode, entry in modes.items():
        if "error" in entry:
            latency.add_row(mode, "-", "-", "-", "-", "-", f"[red]failed: {entry['error'][:60]}")
            continue
        for test, fig in entry["tests"].items():
            b = base.get(test, {}).get("p99_ms")
            ratio = f"{fig['p99_ms'] / b:.2f}x" if b else "-"
            latency.add_row(mode, test, str(entry["requests"]), f"{fig['rps']:,.0f}", f"{fig['p50_ms']:.3f}",
                            f"{fig['p99_ms']:.3f}", ratio)
    console.print(latency)

    repl = Table(title="replication over the measured window (primary's control API)")
    for col in ("mode", "checkpoints/s by cause", "mean pause ms", "mean ack ms", "released match / ack",
                "CPU ms/request", "synced"):
        repl.add_column(col, justify="left" if col in ("mode", "checkpoints/s by cause") else "right")
    for mode, entry in modes.items():
        if "error" in entry:
            continue
        cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in entry["cpu_ms_per_request"].items())
        r = entry.get("replication")
        if r is None:
            repl.add_row(mode, "-", "-", "-", "-", cpu, "-")
            continue
        causes = ", ".join(f"{c} {v:.2f}" for c, v in r["checkpoints_per_s_by_cause"].items() if v) or "none"
        released = r["released_bytes"]
        rel = f"{released.get('match', 0):,} / {released.get('ack', 0):,}" if mode == "lockstep" else "-"
        synced = "yes" if r["synced_before"] and r["synced_after"] else "[red]NO: not protected throughout"
        pause = "-" if r["mean_pause_ms"] is None else f"{r['mean_pause_ms']:.2f}"
        ack = "-" if r["mean_duration_ms"] is None else f"{r['mean_duration_ms']:.1f}"
        repl.add_row(mode, causes, pause, ack, rel, cpu, synced)
    console.print(repl)
    for name, by_test in results["ratios"].items():
        console.print(f"{name}: " + ", ".join(f"{t} {v:.2f}x" for t, v in by_test.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accel", choices=("tcg", "kvm", "auto"), default="tcg",
                    help="accelerator of every guest (default: %(default)s; nested kvm here runs guest "
                         "code about 20x slower than tcg)")
    ap.add_argument("--requests", type=int, default=10000,
                    help="redis-benchmark -n for unprotected and lockstep (default: %(default)s)")
    ap.add_argument("--checkpoint-requests", type=int, default=2000,
                    help="redis-benchmark -n in checkpoint mode, where every reply waits for an "
                         "acknowledged epoch (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=10, help="redis-benchmark -c (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=500,
                    help="unmeasured requests per test before each measured run, at most a tenth of "
                         "the run (default: %(default)s)")
    ap.add_argument("--memory", default="64Mi", help="guest RAM of every VM (default: %(default)s)")
    ap.add_argument("--checkpoint-interval-ms", type=int, default=None,
                    help="--interval-ms of the checkpoint pair (default: the agent's, 100)")
    ap.add_argument("--lockstep-interval-ms", type=int, default=None,
                    help="--interval-ms of the lockstep pair (default: the agent's, 2000)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma-separated subset of %(default)s, run in this order")
    ap.add_argument("--output", default="lockstep",
                    help="results file name under benchmarks/results/, without .json (default: %(default)s)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := sorted(set(modes) - set(MODES)):
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    for name in ("requests", "checkpoint_requests", "clients"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must not be negative")
    if args.accel == "auto":
        args.accel = "kvm" if kvm_unavailable_reason() is None else "tcg"
    elif args.accel == "kvm" and (reason := kvm_unavailable_reason()) is not None:
        ap.error(f"--accel kvm: {reason}")
    require_tool("redis-benchmark", "redis-tools")

    results: dict[str, Any] = {
        "accel": args.accel,
        "memory": args.memory,
        "clients": args.clients,
        "machine_at_start": machine_info(),
        "redis_benchmark": {
            "unprotected": benchmark_command(args.requests, args.clients),
            "checkpoint": benchmark_command(args.checkpoint_requests, args.clients),
            "lockstep": benchmark_command(args.requests, args.clients),
        },
        "modes": {},
    }
    failed = False
    for mode in modes:
        print(f"{mode} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"colo-bench-{mode}-") as tmp:
            try:
                if mode == "unprotected":
                    entry = bench_unprotected(args, Path(tmp))
                else:
                    entry = bench_pair(mode, args, Path(tmp))
            except (HarnessError, RuntimeError, TimeoutError, subprocess.TimeoutExpired,
                    httpx.HTTPError) as exc:
                print(f"{mode} failed: {exc}", file=sys.stderr)
                entry = {"error": str(exc)[:4000]}
                failed = True
        results["modes"][mode] = entry
        if "tests" in entry:
            summary = ", ".join(f"{t} {f['rps']:,.0f} ops/s, p50 {f['p50_ms']:.3f}, p99 {f['p99_ms']:.3f} ms"
                                for t, f in entry["tests"].items())
            print(f"  {summary}", flush=True)
    results["ratios"] = p99_ratios(results["modes"])
    path = write_results(args.output, results)
    print_tables(results)
    print(f"results: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
