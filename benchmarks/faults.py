#!/usr/bin/env python3
"""Fault campaign over an agent pair: a seeded random schedule of faults under load, and a
checker over what the clients saw.

Real `colo-agent run` processes on loopback (file arbiter, 0.4 s lease),
the secondary dialling its primary through a `LinkProxy`. Clients write
unique keys and one of them INCRs a counter, always through whichever agent
is primary. Each step injects one fault, then does what the operator would
do (promote the secondary with term + 1 over its control API, start a new
secondary) until the VM is protected again, and checks the history:

- every acknowledged write is present, with its value, on the primary;
- the counter lies between the acknowledged and the attempted INCRs;
- no agent acknowledged a request sent after its term was taken
  (split-brain probe: clients stay attached to a frozen primary while its
  secondary is promoted, and it is then thawed).

Faults: kill -9 and SIGSTOP of the primary and of the secondary, a primary
frozen past its lease while the secondary is promoted (`split_brain`), and
the link dropping, corrupting or cutting a frame.

    .venv/bin/python benchmarks/faults.py [--faults 100] [--mode checkpoint|lockstep|both] [--seed 1]
        [--memory 64Mi] [--logs DIR]

Prints one summary line per mode and writes benchmarks/results/faults.json
(faults-<mode>.json for one mode). Every acknowledged key stays in the
guest, so its memory bounds a campaign: 32 MiB filled up (OOM replies)
after about 430,000 writes, some 80 faults in on an idle machine. The
agents inherit the environment (COLO_HEARTBEAT_TIMEOUT_MS, say, for a
machine too loaded for the default); the heartbeat timeout is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import write_results
from _history import History, Tally, client_loop, failed, summary
from support.agents import SYNC_TIMEOUT, AgentGroup, AgentProcess, HarnessError, wait_protected
from support.linkproxy import LinkProxy

from colo_agent.api.models import PromoteResult
from colo_agent.constants import HEARTBEAT_TIMEOUT_MS

KINDS = (
    "kill_primary", "kill_secondary", "stop_primary", "stop_secondary", "split_brain",
    "link_drop", "link_corrupt", "link_cut",
)
MODES = {"checkpoint": ("--mode", "checkpoint"), "lockstep": ("--mode", "lockstep", "--interval-ms", "1000")}
MEMORY = "64Mi"
WRITERS = 2


class Cluster:
    """The agents of one VM and the link in front of its primary."""

    def __init__(self, workdir: Path, mode: str, memory: str = MEMORY) -> None:
        self.group = AgentGroup(workdir)
        self.extra = MODES[mode]
        self.memory = memory
        self.n = 0
        self.primary = self._spawn("primary")
        self.primary.wait_for("serving as primary", lambda s: s.role == "primary")
        self.term = 1
        self.proxy: LinkProxy | None = None
        self.secondary = self._new_secondary()
        self.term = wait_protected(self.primary, self.secondary)
        self.fenced: dict[str, float] = {}  # agent -> when its term was taken

    def _spawn(self, role: str, **kw: Any) -> AgentProcess:
        self.n += 1
        return self.group.spawn(f"agent-{self.n}", role, memory=self.memory, extra=self.extra, **kw)

    def _new_secondary(self) -> AgentProcess:
        if self.proxy is not None:
            self.proxy.close()
        self.proxy = LinkProxy(self.primary.replication_port)
        return self._spawn("secondary", peer_address=self.proxy.address)

    def promote(self, frozen_at: float | None = None) -> bool:
        """The operator's failover: term + 1 to the secondary, which becomes primary.

        `frozen_at`: the old primary was stopped then and is still alive; whatever it runs
        from then on runs after its term was taken. False: it was stopped in the middle of a
        write of the file arbiter and holds its lock, so the store is down until it runs again
        (as an API server outage would be) and no failover is possible."""
        r = self.secondary.promote(self.term + 1, self.group.secret)
        if r.status_code == 503 and frozen_at is not None and "stayed locked" in r.text:
            return False
        if r.status_code != 200:
            raise HarnessError(f"promote refused: {r.status_code} {r.text}\n{self.secondary.tail()}")
        result = PromoteResult.from_json(r.text)
        self.fenced[self.primary.name] = time.monotonic() if frozen_at is None else frozen_at
        self.term = result.term
        self.primary = self.secondary
        return True

    def current(self) -> AgentProcess:
        """The primary now, for the clients."""
        return self.primary

    def reprotect(self) -> None:
        self.secondary = self._new_secondary()
        wait_protected(self.primary, self.secondary)

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        self.group.close()


def _settled(cluster: Cluster) -> None:
    """Protected now: the secondary holds an image and commits epochs. A pairing that the last
    fault broke a moment ago (noticed only after a heartbeat timeout) re-syncs, and until then a
    promotion has nothing to resume from, so the next fault waits for an epoch committed after
    this check."""
    seen = cluster.secondary.wait_for("synced", lambda s: s.synced, SYNC_TIMEOUT).last_acked_epoch
    cluster.secondary.wait_for("committing epochs", lambda s: s.synced and s.last_acked_epoch > seen,
                               SYNC_TIMEOUT)


def _inject(kind: str, cluster: Cluster, rng: random.Random, history: History) -> None:
    lease = cluster.group.lease_duration_ms / 1000
    if kind == "kill_primary":
        cluster.primary.kill()
        cluster.promote()
        cluster.reprotect()
    elif kind == "kill_secondary":
        cluster.secondary.kill()
        cluster.reprotect()
    elif kind in ("stop_primary", "stop_secondary"):
        agent = cluster.primary if kind == "stop_primary" else cluster.secondary
        agent.signal(signal.SIGSTOP)
        time.sleep(rng.uniform(0.1, 1.0))
        agent.signal(signal.SIGCONT)
        wait_protected(cluster.primary, cluster.secondary)
    elif kind == "split_brain":
        old = cluster.primary
        stop = threading.Event()
        # Clients that stay attached to the old primary across its promotion-and-thaw (keys
        # named after it: an agent is probed once, so no key is written by two probes).
        probes = [
            threading.Thread(target=client_loop,
                             args=(cluster.current, f"probe-{old.name}-{i}", history, stop, False, old))
            for i in range(2)
        ]
        for t in probes:
            t.start()
        time.sleep(0.2)
        old.signal(signal.SIGSTOP)
        frozen_at = time.monotonic() + 0.05  # once every thread of it has surely stopped
        time.sleep(lease * 2)
        promoted = cluster.promote(frozen_at)
        old.signal(signal.SIGCONT)
        time.sleep(lease * 3)  # the thawed primary finds itself fenced
        stop.set()
        for t in probes:
            t.join(30)
        if promoted:
            old.kill()
            cluster.reprotect()
        else:  # the store was down while it was frozen: it is still the primary
            with history.lock:
                history.store_blocked += 1
            wait_protected(cluster.primary, cluster.secondary)
    else:
        assert cluster.proxy is not None
        getattr(cluster.proxy, kind.removeprefix("link_"))(1)
        deadline = time.monotonic() + 30
        while cluster.proxy.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        cluster.proxy.disarm()
        wait_protected(cluster.primary, cluster.secondary)


def schedule(seed: int, faults: int) -> list[str]:
    """The seeded order of fault kinds."""
    rng = random.Random(seed)
    return [rng.choice(KINDS) for _ in range(faults)]


def run_campaign(mode: str, faults: int, seed: int, workdir: Path, memory: str = MEMORY) -> dict[str, Any]:
    """One seeded campaign; returns its figures (`lost`, `fenced_acks` and `counter_errors`
    must be empty). The agents' logs stay in `workdir`."""
    kinds = schedule(seed, faults)
    rng = random.Random(seed + 1)  # timings
    cluster = Cluster(workdir, mode, memory)
    history = History()
    stop = threading.Event()
    clients = [threading.Thread(target=client_loop, args=(cluster.current, f"w{i}", history, stop, False))
               for i in range(WRITERS)]
    clients.append(threading.Thread(target=client_loop, args=(cluster.current, "incr", history, stop, True)))
    tally = Tally(mode, faults)
    started = time.monotonic()
    try:
        for t in clients:
            t.start()
        for i, kind in enumerate(kinds):
            time.sleep(rng.uniform(0.3, 1.0))
            t0 = time.monotonic()
            try:
                _settled(cluster)
                _inject(kind, cluster, rng, history)
            except HarnessError as exc:
                tally.failed(i, kind, exc)
                break
            time.sleep(0.3)
            if not tally.after_fault(i, kind, t0, history, lambda: cluster.primary.client(timeout=60.0)):
                break
    finally:
        stop.set()
        for t in clients:
            t.join(30)
        cluster.close()
    heartbeat_timeout_ms = int(os.environ.get("COLO_HEARTBEAT_TIMEOUT_MS", HEARTBEAT_TIMEOUT_MS))
    return {"mode": mode, "seed": seed, "memory": memory, "heartbeat_timeout_ms": heartbeat_timeout_ms,
            **tally.figures(history, cluster.fenced),
            "split_brain_store_blocked": history.store_blocked,
            "seconds": round(time.monotonic() - started, 1)}


def summary_line(r: dict[str, Any]) -> str:
    return summary(r["mode"], r, "split-brain probes with the store held by the frozen primary "
                                 f"{r['split_brain_store_blocked']}; ")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=100, help="faults per mode (default: %(default)s)")
    p.add_argument("--mode", choices=["checkpoint", "lockstep", "both"], default="both")
    p.add_argument("--seed", type=int, default=1, help="schedule seed (default: %(default)s)")
    p.add_argument("--memory", default=MEMORY, help="guest memory (default: %(default)s)")
    p.add_argument("--logs", type=Path, help="keep the agents' logs in DIR/<mode> (default: removed)")
    args = p.parse_args()
    modes = ["checkpoint", "lockstep"] if args.mode == "both" else [args.mode]
    results = []
    for mode in modes:
        if args.logs is not None:
            (args.logs / mode).mkdir(parents=True, exist_ok=True)
            results.append(run_campaign(mode, args.faults, args.seed, args.logs / mode, args.memory))
            continue
        with tempfile.TemporaryDirectory(prefix=f"colo-faults-{mode}-") as tmp:
            results.append(run_campaign(mode, args.faults, args.seed, Path(tmp), args.memory))
    for r in results:
        print(summary_line(r))
    load = os.getloadavg()
    name = "faults" if args.mode == "both" else f"faults-{args.mode}"
    write_results(name, {"load_average": load, "runs": results})
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 1 if any(failed(r) for r in results) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
