#!/usr/bin/env python3
"""Failover time: primary killed with SIGKILL -> first successful write on the new primary.

Two `colo-agent run` processes on loopback (the file arbiter stands in for
the Kubernetes Lease), clients writing through the primary. Each run kills
the primary, promotes the secondary at once through its control API (the
operator's part; its detection delay is not included), then writes until
the new primary answers `+OK`. The new primary is then protected by a fresh
secondary for the next run, and every write acknowledged so far is checked.

Timeouts are the agent's defaults (heartbeat every 100 ms, lost after
500 ms, checkpoint interval 100 ms) except the fencing lease, which is the
demo's 400 ms rather than the 2 s meant for a cluster's API server: the
promotion has to wait for the old primary's lease to run out, so the lease
duration bounds the figure from below.

    .venv/bin/python benchmarks/failover.py [--runs 10] [--accel auto|tcg|kvm]

Prints min/median/max and writes benchmarks/results/failover.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The agent-process harness of the integration tests: one way to start, watch and kill agents.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import percentile, write_results
from support.agents import (
    LEASE_DURATION_MS,
    AgentGroup,
    AgentProcess,
    HarnessError,
    RespClient,
    WriteLog,
    missing_writes,
    wait_protected,
    write_keys,
)

from colo_agent.api.models import PromoteResult
from colo_agent.microvm.config import choose_accelerator

FIRST_WRITE_TIMEOUT = 30.0


def first_write(agent: AgentProcess, started: float) -> float:
    """Seconds from `started` until a SET on `agent` is acknowledged."""
    while True:
        try:
            with RespClient.connect(agent.host, agent.client_port, timeout=5.0) as c:
                if c.call("SET", "after-failover", str(started)) == b"OK":
                    return time.monotonic() - started
        except (OSError, ConnectionError):
            pass
        if time.monotonic() - started > FIRST_WRITE_TIMEOUT:
            raise HarnessError(f"{agent.name} accepted no write within {FIRST_WRITE_TIMEOUT:.0f} s")
        time.sleep(0.002)


def one_failover(group: AgentGroup, primary: AgentProcess, secondary: AgentProcess, term: int,
                 writes: WriteLog, tag: str, args: argparse.Namespace) -> dict[str, Any]:
    stop = threading.Event()
    writers = [threading.Thread(target=write_keys, args=(primary, f"{tag}w{i}", stop.is_set, writes))
               for i in range(args.writers)]
    for t in writers:
        t.start()
    time.sleep(args.write_seconds)
    before = primary.status()
    killed = time.monotonic()
    primary.kill()
    stop.set()
    r = secondary.promote(term + 1, group.secret)
    promoted = time.monotonic() - killed
    if r.status_code != 200:
        raise HarnessError(f"promote refused: {r.status_code} {r.text}\n{secondary.tail()}")
    failover = first_write(secondary, killed)
    for t in writers:
        t.join(60)
    result = PromoteResult.from_json(r.text)
    return {
        "failover_ms": failover * 1e3,
        "promote_ms": promoted * 1e3,
        "resumed_from_epoch": result.resumed_from_epoch,
        "epoch_before_kill": before.last_acked_epoch if before else None,
        "acknowledged_writes": len(writes.acknowledged),
        "lost_writes": len(missing_writes(secondary, writes)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    accel = args.accel
    if accel == "auto":
        accel = choose_accelerator("auto")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="colo-failover-") as tmp:
        group = AgentGroup(Path(tmp), accel=accel, vm="bench/failover",
                           lease_duration_ms=args.lease_duration_ms)
        try:
            primary = group.spawn("agent-0", "primary", memory=args.memory)
            primary.wait_for("serving as primary", lambda s: s.role == "primary")
            secondary = group.spawn("agent-1", "secondary", peer=primary, memory=args.memory)
            term = wait_protected(primary, secondary)
            writes = WriteLog()
            for i in range(args.runs):
                figures = one_failover(group, primary, secondary, term, writes, f"r{i}", args)
                runs.append(figures)
                print(f"run {i + 1:2d}: failover {figures['failover_ms']:7.1f} ms "
                      f"(promote answered after {figures['promote_ms']:7.1f} ms), "
                      f"{figures['acknowledged_writes']} writes acknowledged so far, "
                      f"{figures['lost_writes']} lost", flush=True)
                term += 1
                if i + 1 < args.runs:
                    fresh = group.spawn(f"agent-{i + 2}", "secondary", peer=secondary, memory=args.memory)
                    wait_protected(secondary, fresh)
                    primary, secondary = secondary, fresh
        finally:
            group.close()
    times = [r["failover_ms"] for r in runs]
    return {
        "accel": accel,
        "memory": args.memory,
        "writers": args.writers,
        "timeouts_ms": {"heartbeat_interval": 100, "heartbeat_timeout": 500, "checkpoint_interval": 100,
                        "lease_duration": args.lease_duration_ms},
        "promotion": "immediately after the kill, as the demo does; detection by an operator not included",
        "failover_ms": {"min": min(times), "median": statistics.median(times), "p90": percentile(times, 90),
                        "max": max(times)},
        "lost_writes": sum(r["lost_writes"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto")
    ap.add_argument("--memory", default="64Mi", help="guest RAM of both agents (default: %(default)s)")
    ap.add_argument("--writers", type=int, default=2, help="clients writing until the kill")
    ap.add_argument("--write-seconds", type=float, default=1.0, help="writing before each kill")
    ap.add_argument("--lease-duration-ms", type=int, default=LEASE_DURATION_MS,
                    help="fencing lease of the file arbiter (default: %(default)s, the demo's)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    results = run(args)
    f = results["failover_ms"]
    print(f"\nfailover (SIGKILL -> first acknowledged write), {args.runs} runs, {results['accel']}, "
          f"lease {args.lease_duration_ms} ms: min {f['min']:.0f} ms, median {f['median']:.0f} ms, "
          f"max {f['max']:.0f} ms; acknowledged writes lost: {results['lost_writes']}")
    print(f"written to {write_results('failover', results)}")
    if results["lost_writes"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
