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

The machine is shared and its background load drifts, so the three setups
are measured in several rounds (fresh processes every time, the order
rotating) and the table shows medians; the JSON keeps every round, and the
p99 ratios are also given round by round.

    .venv/bin/python benchmarks/lockstep.py [--accel tcg|kvm|auto] [--rounds 3]
        [--requests N] [--checkpoint-requests N] [--modes unprotected,checkpoint,lockstep]

Prints a table and writes benchmarks/results/lockstep.json (with the exact
commands; the secret, passed in COLO_SECRET, is not recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import statistics
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import free_port, redis_benchmark, require_tool, wait_for_port, write_results
from support.agents import AgentGroup, AgentProcess, HarnessError, wait_protected

from colo_agent.microvm.config import choose_accelerator
from colo_agent.microvm.kvm import kvm_unavailable_reason

# "+tls": the same pair over mutual TLS 1.3, as the operator runs it by default.
MODES = ("unprotected", "checkpoint", "lockstep", "checkpoint+tls", "lockstep+tls")
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
    r = httpx.get(f"{agent.control_url}/metrics", timeout=10.0, verify=agent.tls or True)
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
    """Counts over the window between two scrapes; `summarise_replication` turns them into rates."""
    causes = sorted(set(before.by_cause) | set(after.by_cause))
    return {
        "window_s": after.at - before.at,
        "checkpoints_by_cause": {c: after.by_cause.get(c, 0) - before.by_cause.get(c, 0) for c in causes},
        "pause_s_sum": after.pause_sum - before.pause_sum,
        "pause_count": int(after.pause_count - before.pause_count),
        "duration_s_sum": after.duration_sum - before.duration_sum,
        "duration_count": int(after.duration_count - before.duration_count),
        "released_bytes": {how: int(after.released.get(how, 0.0) - before.released.get(how, 0.0))
                           for how in sorted(set(before.released) | set(after.released))},
        "synced_throughout": before.synced and after.synced,
    }


def summarise_replication(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rates over all measured windows of one mode taken together."""
    window = sum(w["window_s"] for w in windows)
    by_cause: dict[str, int] = {}
    released: dict[str, int] = {}
    for w in windows:
        for cause, n in w["checkpoints_by_cause"].items():
            by_cause[cause] = by_cause.get(cause, 0) + n
        for how, n in w["released_bytes"].items():
            released[how] = released.get(how, 0) + n
    pauses = sum(w["pause_count"] for w in windows)
    acks = sum(w["duration_count"] for w in windows)
    return {
        "window_s": window,
        "checkpoints_by_cause": by_cause,
        "checkpoints_per_s_by_cause": {c: n / window for c, n in sorted(by_cause.items())},
        "checkpoints_per_s": sum(by_cause.values()) / window,
        "mean_pause_ms": sum(w["pause_s_sum"] for w in windows) / pauses * 1e3 if pauses else None,
        "mean_ack_ms": sum(w["duration_s_sum"] for w in windows) / acks * 1e3 if acks else None,
        "released_bytes": released,
        "synced_throughout": all(w["synced_throughout"] for w in windows),
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
        "command": benchmark_command(port, requests, args.clients),
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
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise HarnessError(f"vm run exited with {proc.returncode}:\n{tail}")
            try:
                wait_for_port("127.0.0.1", port, timeout=0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    why = f"vm run did not listen on {port} in {START_TIMEOUT:.0f} s"
                    raise HarnessError(f"{why}:\n{tail}") from None
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


def _tls(workdir: Path, vm: str) -> tuple[Path, Path, Any]:
    """Certificate directories for both agents and the operator's client context."""
    import datetime as dt

    from colo_agent.api.identity import OPERATOR_IDENTITY, vm_identity
    from colo_operator import certs

    now = dt.datetime.now(dt.UTC)
    ca = certs.new_ca(now)
    namespace, _, name = vm.partition("/")
    dirs = [certs.write_dir(workdir / f"tls-{who}", ca, certs.issue(ca, vm_identity(namespace, name), now))
            for who in ("primary", "secondary")]  # fmt: skip
    operator = certs.write_dir(workdir / "tls-operator", ca, certs.issue(ca, OPERATOR_IDENTITY, now))
    return dirs[0], dirs[1], certs.client_context(operator)


def bench_pair(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    mode, _, secure = mode.partition("+")
    interval = args.checkpoint_interval_ms if mode == "checkpoint" else args.lockstep_interval_ms
    extra = ["--mode", mode]
    if interval is not None:
        extra += ["--interval-ms", str(interval)]
    vm = f"bench/{mode}"
    group = AgentGroup(workdir, accel=args.accel, vm=vm, lease_duration_ms=LEASE_DURATION_MS)
    tls: dict[str, Any] = {}
    if secure:
        pdir, sdir, client = _tls(workdir, vm)
        tls = {"primary": {"tls_dir": pdir, "tls_client": client},
               "secondary": {"tls_dir": sdir, "tls_client": client}}  # fmt: skip
    try:
        primary = group.spawn("primary", "primary", memory=args.memory, extra=extra, **tls.get("primary", {}))
        primary.wait_for("serving as primary", lambda s: s.role == "primary", START_TIMEOUT)
        secondary = group.spawn("secondary", "secondary", peer=primary, memory=args.memory, extra=extra,
                                **tls.get("secondary", {}))  # fmt: skip
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


def benchmark_command(port: int | str, requests: int, clients: int) -> str:
    """What `_common.redis_benchmark` runs."""
    return shlex.join(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", ",".join(TESTS),
                       "-n", str(requests), "-c", str(clients), "--csv"])


def summarise_mode(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One mode over its successful rounds: medians of the per-round figures."""
    tests: dict[str, dict[str, Any]] = {}
    for test in entries[0]["tests"]:
        runs = [e["tests"][test] for e in entries if test in e["tests"]]
        tests[test] = {key: statistics.median(r[key] for r in runs) for key in ("rps", "p50_ms", "p99_ms")}
        tests[test]["p99_ms_by_round"] = [r["p99_ms"] for r in runs]
    out: dict[str, Any] = {
        "rounds": len(entries),
        "requests_per_round": entries[0]["requests"],
        "tests": tests,
        "cpu_ms_per_request": {name: statistics.median(e["cpu_ms_per_request"][name] for e in entries)
                               for name in entries[0]["cpu_ms_per_request"]},
    }
    if "replication" in entries[0]:
        out["replication"] = summarise_replication([e["replication"] for e in entries])
    return out


def p99_ratios(rounds: Sequence[dict[str, Any]], modes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """p99 of each protected mode over unprotected's, per test: of the medians, and round by round
    (both setups measured minutes apart at most, under the same background load)."""
    out: dict[str, dict[str, Any]] = {}
    base = modes.get("unprotected", {}).get("tests")
    for mode in MODES[1:]:
        tests = modes.get(mode, {}).get("tests")
        if not base or not tests:
            continue
        ratios: dict[str, Any] = {}
        for test in tests:
            if test not in base:
                continue
            paired = [r[mode]["tests"][test]["p99_ms"] / r["unprotected"]["tests"][test]["p99_ms"]
                      for r in rounds if "tests" in r.get(mode, {}) and "tests" in r.get("unprotected", {})]
            ratios[test] = {"of_medians": tests[test]["p99_ms"] / base[test]["p99_ms"], "by_round": paired}
        out[f"{mode}_p99_over_unprotected"] = ratios
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
                          f"guest RAM {results['memory']}: medians of {results['rounds']} round(s)")
    columns = ("mode", "test", "requests", "ops/s", "p50 ms", "p99 ms", "p99 vs unprotected", "p99 by round")
    for col in columns:
        latency.add_column(col, justify="left" if col in ("mode", "test") else "right")
    for mode, entry in modes.items():
        if "tests" not in entry:
            latency.add_row(mode, "-", "-", "-", "-", "-", "-", "[red]failed in every round")
            continue
        for test, fig in entry["tests"].items():
            b = base.get(test, {}).get("p99_ms")
            ratio = f"{fig['p99_ms'] / b:.2f}x" if b else "-"
            by_round = " ".join(f"{v:.2f}" for v in fig["p99_ms_by_round"])
            requests = f"{entry['requests_per_round']} x {entry['rounds']}"
            latency.add_row(mode, test, requests, f"{fig['rps']:,.0f}", f"{fig['p50_ms']:.3f}",
                            f"{fig['p99_ms']:.3f}", ratio, by_round)
    console.print(latency)

    repl = Table(title="replication over the measured windows (primary's control API), CPU per request")
    for col in ("mode", "checkpoints/s by cause", "mean pause ms", "mean ack ms", "released on match / ack",
                "CPU ms/request", "protected"):
        repl.add_column(col, justify="left" if col in ("mode", "checkpoints/s by cause") else "right")
    for mode, entry in modes.items():
        if "tests" not in entry:
            continue
        cpu = ", ".join(f"{name} {ms:.3f}" for name, ms in entry["cpu_ms_per_request"].items())
        r = entry.get("replication")
        if r is None:
            repl.add_row(mode, "-", "-", "-", "-", cpu, "no")
            continue
        causes = ", ".join(f"{c} {v:.2f}" for c, v in r["checkpoints_per_s_by_cause"].items() if v) or "none"
        released = r["released_bytes"]
        rel = f"{released.get('match', 0):,} B / {released.get('ack', 0):,} B" if mode == "lockstep" else "-"
        synced = "yes" if r["synced_throughout"] else "[red]NO: secondary lost during a run"
        pause = "-" if r["mean_pause_ms"] is None else f"{r['mean_pause_ms']:.2f}"
        ack = "-" if r["mean_ack_ms"] is None else f"{r['mean_ack_ms']:.1f}"
        repl.add_row(mode, causes, pause, ack, rel, cpu, synced)
    console.print(repl)
    for name, by_test in results["ratios"].items():
        console.print(f"{name}: " + ", ".join(
            f"{t} {v['of_medians']:.2f}x (by round: {' '.join(f'{x:.2f}' for x in v['by_round'])})"
            for t, v in by_test.items()))


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"colo-bench-{mode}-") as tmp:
        if mode == "unprotected":
            return bench_unprotected(args, Path(tmp))
        return bench_pair(mode, args, Path(tmp))


def parse_args() -> argparse.Namespace:
    """The command line, checked; `args.modes` becomes a list."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accel", choices=("tcg", "kvm", "auto"), default="tcg",
                    help="accelerator of every guest (default: %(default)s; nested kvm here runs guest "
                         "code about 20x slower than tcg)")
    ap.add_argument("--requests", type=int, default=10000,
                    help="redis-benchmark -n for unprotected and lockstep, per round (default: %(default)s)")
    ap.add_argument("--checkpoint-requests", type=int, default=1000,
                    help="redis-benchmark -n in checkpoint mode, where every reply waits for an "
                         "acknowledged epoch, per round (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=10, help="redis-benchmark -c (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="every mode is set up, measured and torn down this many times, the order "
                         "rotating, so background load drifting on a shared machine hits all "
                         "modes alike (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=500,
                    help="unmeasured requests per test before each measured run, at most a tenth of "
                         "the run (default: %(default)s)")
    ap.add_argument("--memory", default="64Mi", help="guest RAM of every VM (default: %(default)s)")
    ap.add_argument("--checkpoint-interval-ms", type=int, default=None,
                    help="--interval-ms of the checkpoint pair (default: the agent's, 100)")
    ap.add_argument("--lockstep-interval-ms", type=int, default=None,
                    help="--interval-ms of the lockstep pair (default: the agent's, 2000)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of %(default)s")
    ap.add_argument("--output", default="lockstep",
                    help="results file name under benchmarks/results/, without .json (default: %(default)s)")
    args = ap.parse_args()
    modes = args.modes = [m for m in args.modes.split(",") if m]
    if unknown := sorted(set(modes) - set(MODES)):
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if not modes:
        ap.error("--modes is empty")
    for name in ("requests", "checkpoint_requests", "clients", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must not be negative")
    if args.accel == "auto":
        args.accel = choose_accelerator("auto")
    elif args.accel == "kvm" and (reason := kvm_unavailable_reason()) is not None:
        ap.error(f"--accel kvm: {reason}")
    return args


def run_rounds(modes: list[str], args: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    """Every mode once per round, the order rotating; the rounds, and whether any run failed."""
    rounds: list[dict[str, Any]] = []
    failed = False
    for i in range(args.rounds):
        this: dict[str, Any] = {}
        for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
            print(f"round {i + 1}/{args.rounds}: {mode} ...", flush=True)
            try:
                entry = run_mode(mode, args)
            except (HarnessError, RuntimeError, TimeoutError, subprocess.TimeoutExpired,
                    httpx.HTTPError) as exc:
                print(f"{mode} failed: {exc}", file=sys.stderr)
                entry = {"error": str(exc)[:4000]}
                failed = True
            this[mode] = entry
            if "tests" in entry:
                summary = ", ".join(f"{t} {f['rps']:,.0f} ops/s, p50 {f['p50_ms']:.3f}, "
                                    f"p99 {f['p99_ms']:.3f} ms" for t, f in entry["tests"].items())
                print(f"  {summary}", flush=True)
        rounds.append(this)
    return rounds, failed


def main() -> int:
    args = parse_args()
    modes: list[str] = args.modes
    require_tool("redis-benchmark", "redis-tools")
    load_at_start = Path("/proc/loadavg").read_text().split()[:3]
    rounds, failed = run_rounds(modes, args)
    summaries: dict[str, Any] = {}
    for mode in modes:
        ok = [r[mode] for r in rounds if "tests" in r[mode]]
        summaries[mode] = summarise_mode(ok) if ok else {"error": "failed in every round"}
    results: dict[str, Any] = {
        "loadavg_at_start": load_at_start,
        "accel": args.accel,
        "memory": args.memory,
        "clients": args.clients,
        "rounds": args.rounds,
        "redis_benchmark": {
            "unprotected": benchmark_command("PORT", args.requests, args.clients),
            "checkpoint": benchmark_command("PORT", args.checkpoint_requests, args.clients),
            "lockstep": benchmark_command("PORT", args.requests, args.clients),
        },
        "modes": summaries,
        "ratios": p99_ratios(rounds, summaries),
        "by_round": rounds,
    }
    path = write_results(args.output, results)
    print_tables(results)
    print(f"results: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
